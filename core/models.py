"""The model table: what a name ``R<depth>_<dataset>`` stands for, and where its weights come from."""

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision
from torch import nn

from core import distributed
from core.checkpoints import check_model, load_agent, load_checkpoint, load_file, load_weights_to_flatresnet
from core.cli import UserError
from models.base import BasicBlock, Bottleneck
from models.resnet import FlatResNet, FlatResNet32, FlatResNet224, Policy, Policy32, Policy224

PRETRAINED_DIR = Path("cv/pretrained")


@dataclass(frozen=True)
class ModelSpec:
    """Everything that a model name ``R<depth>_<dataset>`` stands for."""

    name: str
    dataset: str  # a key of DATASETS
    num_classes: int | None  # None: as many as the class folders of the data (Folder)
    block: type[nn.Module]
    layer_config: tuple[int, ...]
    style: str = "cifar"  # cifar: 32x32 inputs, three stages; imagenet: 224x224 inputs, four stages
    pretrained_file: str | None = None  # the released base model, relative to cv/pretrained/<name>
    torchvision_arch: str | None = None  # torchvision's ImageNet weights for the base ResNet

    @property
    def imagenet(self) -> bool:
        return self.style == "imagenet"

    @property
    def num_blocks(self) -> int:
        return sum(self.layer_config)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, 224, 224) if self.imagenet else (3, 32, 32)


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset of the model names: its classes and the ResNets (styles) that run on it."""

    key: str
    num_classes: int | None  # None: from the class folders of --data_dir/train
    styles: tuple[str, ...]
    torchvision_weights: bool = False  # torchvision's ImageNet weights fit its base ResNets


DATASETS = {
    d.key: d
    for d in [
        DatasetSpec("C10", 10, ("cifar",)),
        DatasetSpec("C100", 100, ("cifar",)),
        DatasetSpec("FMNIST", 10, ("cifar",)),
        DatasetSpec("ImgNet", 1000, ("imagenet",), torchvision_weights=True),
        DatasetSpec("Folder", None, ("cifar", "imagenet")),
    ]
}


# depth -> (block, blocks per stage), per style
ARCHITECTURES = {
    "cifar": {depth: (BasicBlock, ((depth - 2) // 6,) * 3) for depth in (20, 32, 44, 56, 110)},
    "imagenet": {
        18: (BasicBlock, (2, 2, 2, 2)),
        34: (BasicBlock, (3, 4, 6, 3)),
        50: (Bottleneck, (3, 4, 6, 3)),
        101: (Bottleneck, (3, 4, 23, 3)),
        152: (Bottleneck, (3, 8, 36, 3)),
    },
}


# The base ResNets of the authors' tarball, found without any flag.
RELEASED_BASE_FILES = {
    "R32_C10": "pk_E_164_A_0.923.t7",
    "R110_C10": "pk_E_130_A_0.932.t7",
    "R32_C100": "pk_E_164_A_0.693.t7",
    "R110_C100": "pk_E_160_A_0.723.t7",
    "R101_ImgNet": "ImageNet_R101_224_76.464",
}


def _build_model_table() -> dict[str, ModelSpec]:
    table = {}
    for data in DATASETS.values():
        for style in data.styles:
            for depth, (block, layers) in ARCHITECTURES[style].items():
                name = f"R{depth}_{data.key}"
                arch = f"resnet{depth}" if data.torchvision_weights else None
                table[name] = ModelSpec(
                    name, data.key, data.num_classes, block, layers, style, RELEASED_BASE_FILES.get(name), arch
                )
    return table


MODELS = _build_model_table()


def model_spec(model: str) -> ModelSpec:
    """The table entry of a model name; an unknown name is a UserError listing the valid ones."""
    try:
        return MODELS[model]
    except KeyError:
        raise UserError(f"unknown model {model!r}; valid models: {', '.join(MODELS)}") from None


def build_model(model: str, num_classes: int | None = None) -> tuple[FlatResNet, Policy]:
    """A randomly initialised ResNet and policy network for a model name.

    ``num_classes`` is needed by the models whose data says it (Folder) and replaces the table's otherwise.
    """
    spec = model_spec(model)
    num_classes = num_classes or spec.num_classes
    if num_classes is None:
        raise UserError(f"{spec.name} takes its number of classes from its data, and none was given")
    if spec.imagenet:
        rnet = FlatResNet224(spec.block, list(spec.layer_config), num_classes=num_classes)
        agent = Policy224([1, 1, 1, 1], num_blocks=spec.num_blocks)
    else:
        rnet = FlatResNet32(spec.block, list(spec.layer_config), num_classes=num_classes)
        agent = Policy32([1, 1, 1], num_blocks=spec.num_blocks)
    return rnet, agent


def find_pretrained(model: str, root: Path = PRETRAINED_DIR) -> Path | None:
    """The base ResNet file of a model: the released one, else pretrain.py's newest, else None."""
    spec = model_spec(model)
    folder = Path(root) / spec.name
    if spec.pretrained_file and (folder / spec.pretrained_file).is_file():
        return folder / spec.pretrained_file
    # The most recently written file: the base model the user trained last.
    found = sorted(folder.glob("pk_E_*_A_*.t7"), key=lambda p: (p.stat().st_mtime, p.name))
    return found[-1] if found else None


def _torchvision_weights(arch: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of a torchvision ResNet (downloaded into torch's hub cache once)."""
    weights = torchvision.models.get_model_weights(arch).IMAGENET1K_V1
    try:
        return weights.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except Exception as e:
        raise UserError(
            f"could not download torchvision's {arch} ImageNet weights ({type(e).__name__}); "
            f"connect to the network once, or put the file in {torch.hub.get_dir()}/checkpoints"
        ) from None


def torchvision_twin(rnet: FlatResNet224, model: str) -> nn.Module:
    """torchvision's ResNet of an ImageNet-style model, with ``rnet``'s weights (the same function)."""
    spec = model_spec(model)
    if not spec.imagenet:
        raise UserError(f"{model} is not an ImageNet-style ResNet: torchvision has no twin of it")
    twin = torchvision.models.get_model(f"resnet{_depth(spec)}", num_classes=rnet.fc.out_features)
    state = {}
    for key, value in rnet.state_dict().items():
        if key.startswith("ds."):
            segment, rest = key[3:].split(".", 1)
            key = f"layer{int(segment) + 1}.0.downsample.{rest}"
        elif key.startswith("blocks."):
            segment, rest = key[7:].split(".", 1)
            key = f"layer{int(segment) + 1}.{rest}"
        state[key] = value
    twin.load_state_dict(state)
    return twin.to(next(rnet.parameters()).device).train(rnet.training)


def _depth(spec: ModelSpec) -> int:
    return int(spec.name[1:].split("_")[0])


def load_pretrained_rnet(rnet: FlatResNet, model: str, root: Path = PRETRAINED_DIR) -> str:
    """Load the base ResNet weights of ``model`` into ``rnet``; return where they came from."""
    spec = model_spec(model)
    path = find_pretrained(model, root)
    if path is not None:
        ckpt = load_file(path)
        check_model(ckpt, path, spec.name)
        load_weights_to_flatresnet(ckpt, rnet, name=path)
        return str(path)
    if spec.torchvision_arch:
        load_weights_to_flatresnet(_torchvision_weights(spec.torchvision_arch), rnet)
        return f"torchvision {spec.torchvision_arch} ImageNet weights"
    raise UserError(
        f"no pretrained ResNet for {model} in {Path(root) / model}/: "
        f"run `python pretrain.py --model {model}` or download the released checkpoints"
    )


def load_pretrained_agent(agent: Policy, model: str) -> None:
    """ImageNet policy networks start from ResNet-18 (first block of each stage); others do not."""
    if model_spec(model).torchvision_arch:
        load_weights_to_flatresnet(_torchvision_weights("resnet18"), agent.features, strict=False)


def get_model(model: str, pretrained: bool = True) -> tuple[FlatResNet, Policy]:
    """The ResNet and policy network of a model name, the ResNet with its pretrained weights."""
    rnet, agent = build_model(model)
    if pretrained:
        load_pretrained_rnet(rnet, model)
        load_pretrained_agent(agent, model)
    return rnet, agent


def models_for_run(
    model: str,
    load: str | None = None,
    dummy: bool = False,
    init_agent: bool = True,
    load_resnet: bool = True,
    num_classes: int | None = None,
):
    """ResNet and agent for a script: ``load``'s weights where it has them, pretrained ones otherwise.

    With ``load_resnet=False`` only ``load``'s agent (and epoch) is taken; the ResNet is the base model.
    ``num_classes``: of the models whose data says it (Folder).

    With fake data (``dummy``) missing pretrained weights are replaced by random ones, with a note.
    Returns (rnet, agent, checkpoint dict or {}).
    """
    rnet, agent = build_model(model, num_classes)
    if not load or load == "nil":  # 'nil': the original's name for no checkpoint
        ckpt = {}
    elif load_resnet:
        ckpt = load_checkpoint(rnet, agent, load, model)
    else:
        ckpt = load_agent(agent, load, rnet.num_blocks, model)

    def pretrained(what: str, fn: Callable[[], object]) -> None:
        try:
            fn()
        except UserError as e:
            if not dummy:
                raise
            if distributed.is_main():
                print(f"note: {e}; fake data, so {what} keeps random weights", file=sys.stderr, flush=True)

    if "resnet" not in ckpt or not load_resnet:
        pretrained("the ResNet", lambda: load_pretrained_rnet(rnet, model))
    if not load and init_agent:
        pretrained("the policy network", lambda: load_pretrained_agent(agent, model))
    return rnet, agent, ckpt
