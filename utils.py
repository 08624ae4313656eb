"""Everything the BlockDrop scripts share: model table, data, checkpoints, policies, rewards, stats.

Public API kept from the original code: ``get_model``, ``get_dataset``, ``get_transforms``,
``load_weights_to_flatresnet``, ``load_checkpoint``, ``performance_stats``.
"""

import argparse
import gzip
import hashlib
import json
import os
import platform
import random
import re
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from tensorboardX import SummaryWriter
from torch import nn
from torch.distributions import Bernoulli
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

import distributed
from cli import ArgumentParser as ArgumentParser
from cli import UserError as UserError
from cli import drop_probability as drop_probability
from cli import fraction as fraction
from cli import non_negative_float as non_negative_float
from cli import non_negative_int as non_negative_int
from cli import positive_float as positive_float
from cli import positive_int as positive_int
from cli import probability as probability
from cli import run as run
from models.base import BasicBlock, Bottleneck
from models.resnet import FlatResNet, FlatResNet32, FlatResNet224, Policy, Policy32, Policy224

PRETRAINED_DIR = Path("cv/pretrained")
FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------------------------------------
# The model table


@dataclass(frozen=True)
class ModelSpec:
    """Everything that a model name ``R<depth>_<dataset>`` stands for."""

    name: str
    dataset: str  # C10, C100, FMNIST or ImgNet
    num_classes: int
    block: type[nn.Module]
    layer_config: tuple[int, ...]
    pretrained_file: str | None = None  # the released base model, relative to cv/pretrained/<name>
    torchvision_arch: str | None = None  # ImageNet-style models: torchvision's pretrained weights

    @property
    def imagenet(self) -> bool:
        return self.dataset == "ImgNet"

    @property
    def num_blocks(self) -> int:
        return sum(self.layer_config)

    @property
    def input_size(self) -> tuple[int, int, int]:
        return (3, 224, 224) if self.imagenet else (3, 32, 32)


CIFAR_DATASETS = {"C10": 10, "C100": 100, "FMNIST": 10}
CIFAR_DEPTHS = (20, 32, 44, 56, 110)
IMAGENET_LAYERS = {
    18: (BasicBlock, (2, 2, 2, 2)),
    34: (BasicBlock, (3, 4, 6, 3)),
    50: (Bottleneck, (3, 4, 6, 3)),
    101: (Bottleneck, (3, 4, 23, 3)),
    152: (Bottleneck, (3, 8, 36, 3)),
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
    for dataset, classes in CIFAR_DATASETS.items():
        for depth in CIFAR_DEPTHS:
            name = f"R{depth}_{dataset}"
            n = (depth - 2) // 6
            table[name] = ModelSpec(name, dataset, classes, BasicBlock, (n, n, n), RELEASED_BASE_FILES.get(name))
    for depth, (block, layers) in IMAGENET_LAYERS.items():
        name = f"R{depth}_ImgNet"
        table[name] = ModelSpec(name, "ImgNet", 1000, block, layers, RELEASED_BASE_FILES.get(name), f"resnet{depth}")
    return table


MODELS = _build_model_table()


def model_spec(model: str) -> ModelSpec:
    """The table entry of a model name; an unknown name is a UserError listing the valid ones."""
    try:
        return MODELS[model]
    except KeyError:
        raise UserError(f"unknown model {model!r}; valid models: {', '.join(MODELS)}") from None


def build_model(model: str) -> tuple[FlatResNet, Policy]:
    """A randomly initialised ResNet and policy network for a model name."""
    spec = model_spec(model)
    if spec.imagenet:
        rnet = FlatResNet224(spec.block, list(spec.layer_config), num_classes=spec.num_classes)
        agent = Policy224([1, 1, 1, 1], num_blocks=spec.num_blocks)
    else:
        rnet = FlatResNet32(spec.block, list(spec.layer_config), num_classes=spec.num_classes)
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


def load_pretrained_rnet(rnet: FlatResNet, model: str, root: Path = PRETRAINED_DIR) -> str:
    """Load the base ResNet weights of ``model`` into ``rnet``; return where they came from."""
    spec = model_spec(model)
    path = find_pretrained(model, root)
    if path is not None:
        load_weights_to_flatresnet(load_file(path), rnet)
        return str(path)
    if spec.torchvision_arch:
        load_weights_to_flatresnet(_torchvision_weights(spec.torchvision_arch), rnet)
        return f"torchvision {spec.torchvision_arch} ImageNet weights"
    raise UserError(
        f"no pretrained ResNet for {model} in {Path(root) / model}/: "
        f"run `python pretrain.py --model {model}` or download the released checkpoints"
    )


def load_pretrained_agent(agent: Policy, model: str) -> None:
    """ImageNet policy networks start from ResNet-18 (first block of each stage); CIFAR ones do not."""
    if model_spec(model).imagenet:
        load_weights_to_flatresnet(_torchvision_weights("resnet18"), agent.features, strict=False)


def get_model(model: str, pretrained: bool = True) -> tuple[FlatResNet, Policy]:
    """The ResNet and policy network of a model name, the ResNet with its pretrained weights."""
    rnet, agent = build_model(model)
    if pretrained:
        load_pretrained_rnet(rnet, model)
        load_pretrained_agent(agent, model)
    return rnet, agent


# ---------------------------------------------------------------------------------------------
# Checkpoints


def load_file(path: str | os.PathLike) -> dict:
    """Read a checkpoint safely (no code runs), including the released Python 2 / PyTorch 0.3 files."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        # Namespace is the only non-tensor class in the released files (the base models' args).
        with torch.serialization.safe_globals([argparse.Namespace]), warnings.catch_warnings():
            # torch warns that encoding= does not apply with weights_only=True, yet it uses it for legacy files.
            warnings.filterwarnings("ignore", message="pickle_load_args only works")
            warnings.filterwarnings("ignore", message="Detected pickle protocol")  # refused or read: we say which
            obj = torch.load(path, map_location="cpu", weights_only=True, encoding="latin1")
    except PermissionError:
        raise UserError(f"checkpoint {path} is not readable") from None
    except Exception as e:
        text = str(e).strip()
        # torch wraps the unpickler's reason in generic paragraphs: keep the first sentence of the reason.
        boilerplate = ("Weights only load failed", "(1)", "(2)", "Please file an issue", "Check the documentation")
        lines = [line.strip().removeprefix("WeightsUnpickler error:").strip() for line in text.splitlines()]
        lines = [line for line in lines if line and not line.startswith(boilerplate)]
        reason = lines[0].split(". ")[0].rstrip(".") if lines else type(e).__name__
        if re.search(r"global", text, re.IGNORECASE):
            raise UserError(
                f"refused to load {path}: it would import code, not only tensors and numbers ({reason})"
            ) from None
        raise UserError(
            f"checkpoint {path} cannot be read: corrupt, truncated or not a checkpoint ({reason})"
        ) from None
    if not isinstance(obj, dict):
        raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, not a dict")
    return obj


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """Write a checkpoint atomically: a temporary file in the same folder, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def strip_prefix(state: dict, prefix: str = "module.") -> dict:
    """Remove a key prefix (``module.`` from DataParallel/DDP) where every key has it."""
    if state and all(k.startswith(prefix) for k in state):
        return {k[len(prefix) :]: v for k, v in state.items()}
    return dict(state)


def _translate_key(key: str) -> str:
    """Map the layer<N> naming (torchvision, the base CIFAR models) onto the flat naming."""
    m = re.match(r"layer(\d+)\.(\d+)\.downsample\.(.*)", key)
    if m:
        return f"ds.{int(m.group(1)) - 1}.{m.group(3)}"
    m = re.match(r"layer(\d+)\.(.*)", key)
    if m:
        return f"blocks.{int(m.group(1)) - 1}.{m.group(2)}"
    return key


def _describe(state: dict) -> str:
    """Blocks per segment and classes of a flat-named ResNet state dict, for error messages."""
    segments: dict[int, set[int]] = {}
    for key in state:
        m = re.match(r"blocks\.(\d+)\.(\d+)\.", key)
        if m:
            segments.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    layers = [len(segments[s]) for s in sorted(segments)]
    classes = state["fc.weight"].shape[0] if "fc.weight" in state else "?"
    return f"blocks {layers}, {classes} classes"


def load_weights_to_flatresnet(source_model, target_model: FlatResNet, strict: bool = True) -> FlatResNet:
    """Copy weights into a flat ResNet from a module, a ``{'state_dict': ...}`` file or a state dict.

    Accepts the flat naming and the ``layer<N>`` naming, with or without a ``module.`` prefix.
    With ``strict=False`` keys the target lacks are ignored (ResNet-18 into the policy network).
    """
    source = source_model.state_dict() if isinstance(source_model, nn.Module) else source_model
    if "state_dict" in source and isinstance(source["state_dict"], dict):
        source = source["state_dict"]
    state = {_translate_key(k): v for k, v in strip_prefix(source).items()}
    own = target_model.state_dict()
    if not strict:
        state = {k: v for k, v in state.items() if k in own and v.shape == own[k].shape}
        own.update(state)
        state = own
    wanted = {k: v for k, v in own.items() if not k.endswith("num_batches_tracked")}
    mismatch = set(wanted) ^ {k for k in state if not k.endswith("num_batches_tracked")}
    bad_shapes = [k for k in wanted if k in state and state[k].shape != wanted[k].shape]
    if mismatch or bad_shapes:
        raise UserError(
            f"weights do not fit this network: they hold {_describe(state)}, the network has {_describe(own)}"
        )
    target_model.load_state_dict(state)
    return target_model


def _as_float(value) -> float:
    return float(value.item() if torch.is_tensor(value) else value)


def load_agent_state(agent: Policy, ckpt: dict, path, num_blocks: int) -> None:
    agent_state = ckpt.get("agent", ckpt.get("net"))
    if not isinstance(agent_state, dict):
        raise UserError(f"{path} is not a BlockDrop checkpoint: it has no 'agent' (keys: {', '.join(map(str, ckpt))})")
    agent_state = strip_prefix(agent_state)
    logit = agent_state.get("logit.weight")
    if logit is None:
        raise UserError(f"{path}: its agent has no 'logit.weight'; it is not a BlockDrop policy network")
    if logit.shape[0] != num_blocks:
        raise UserError(f"{path} holds a policy for {logit.shape[0]} blocks; this model has {num_blocks} blocks")
    try:
        agent.load_state_dict(agent_state)
    except RuntimeError as e:
        raise UserError(f"{path}: its agent does not fit this model ({str(e).strip().splitlines()[0]})") from None


def load_agent(agent: Policy, path: str | os.PathLike, num_blocks: int) -> dict:
    """Load only the policy network of a BlockDrop checkpoint (``agent``, or legacy ``net``).

    Returns the file's dict with ``epoch``, ``reward`` and ``acc`` as plain numbers.
    """
    ckpt = load_file(path)
    load_agent_state(agent, ckpt, path, num_blocks)
    if "epoch" in ckpt:
        ckpt["epoch"] = int(_as_float(ckpt["epoch"]))
    for key in ("reward", "acc"):
        if key in ckpt:
            ckpt[key] = _as_float(ckpt[key])
    return ckpt


def load_checkpoint(rnet: FlatResNet, agent: Policy, load: str | os.PathLike) -> dict | None:
    """Load a BlockDrop checkpoint (``agent`` or legacy ``net``, optional ``resnet``) into the models.

    Returns the file's dict with ``epoch``, ``reward`` and ``acc`` as plain numbers; ``'nil'``
    loads nothing and returns None, as in the original.
    """
    if load == "nil":
        return None
    ckpt = load_agent(agent, load, rnet.num_blocks)
    if "resnet" in ckpt:
        try:
            load_weights_to_flatresnet(ckpt["resnet"], rnet)
        except UserError as e:
            raise UserError(f"{load}: {e}") from None
    return ckpt


def checkpoint_path(cv_dir: str | os.PathLike, epoch: int, stats) -> Path:
    """Where an evaluation's checkpoint goes: the original's name built from its statistics."""
    accuracy, reward, sparsity, _, policy_set = stats
    return Path(cv_dir) / f"ckpt_E_{epoch}_A_{accuracy:.3f}_R_{reward:.2E}_S_{sparsity:.2f}_#_{len(policy_set)}.t7"


def models_for_run(
    model: str, load: str | None = None, dummy: bool = False, init_agent: bool = True, load_resnet: bool = True
):
    """ResNet and agent for a script: ``load``'s weights where it has them, pretrained ones otherwise.

    With ``load_resnet=False`` only ``load``'s agent (and epoch) is taken; the ResNet is the base model.

    With fake data (``dummy``) missing pretrained weights are replaced by random ones, with a note.
    Returns (rnet, agent, checkpoint dict or {}).
    """
    rnet, agent = build_model(model)
    if not load or load == "nil":  # 'nil': the original's name for no checkpoint
        ckpt = {}
    elif load_resnet:
        ckpt = load_checkpoint(rnet, agent, load)
    else:
        ckpt = load_agent(agent, load, rnet.num_blocks)

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


# ---------------------------------------------------------------------------------------------
# Data


def get_transforms(rnet: str, dset: str) -> tuple[Callable, Callable]:
    """Train and test transforms of ResNet ``rnet`` on dataset key ``dset``.

    ``rnet`` is the depth part of a model name, as the original passes it (``'R32'``), or the whole
    name (``'R32_C10'``): both give the same transforms. Unknown names are errors naming the valid ones.
    """
    datasets = list(dict.fromkeys(spec.dataset for spec in MODELS.values()))
    if dset not in datasets:
        raise UserError(f"unknown dataset {dset!r}; valid datasets: {', '.join(datasets)}")
    depth, _, named = rnet.partition("_")
    depths = [name.split("_")[0] for name, spec in MODELS.items() if spec.dataset == dset]
    if (named and named != dset) or depth not in depths:
        raise UserError(
            f"unknown ResNet {rnet!r} for dataset {dset}; valid: {', '.join(depths)} "
            f"(or the whole model name, e.g. {depths[0]}_{dset})"
        )
    rnet = f"{depth}_{dset}"
    if dset in ("C10", "C100"):
        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        # Only the released R32_C10 base model was trained on normalised inputs.
        norm = [T.Normalize([x / 255.0 for x in (125.3, 123.0, 113.9)], [x / 255.0 for x in (63.0, 62.1, 66.7)])]
        norm = norm if rnet == "R32_C10" else []
        return T.Compose(augment + [T.ToTensor()] + norm), T.Compose([T.ToTensor()] + norm)
    if dset == "FMNIST":
        # 28x28 grey -> 32x32, the grey channel repeated three times, so the CIFAR-style
        # networks (and their FLOP counts) are used unchanged.
        base = [T.Pad(2), T.Grayscale(num_output_channels=3)]
        norm = [T.ToTensor(), T.Normalize([0.286] * 3, [0.353] * 3)]
        augment = [T.RandomCrop(32, padding=2), T.RandomHorizontalFlip()]
        return T.Compose(base + augment + norm), T.Compose(base + norm)
    if dset == "ImgNet":
        norm = [T.ToTensor(), T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
        train = T.Compose([T.Resize(256), T.RandomCrop(224), T.RandomHorizontalFlip()] + norm)
        return train, T.Compose([T.Resize(256), T.CenterCrop(224)] + norm)
    raise AssertionError(dset)  # every dataset of the table has its transforms above


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format), gzipped or not."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"
]  # fmt: skip


class IdxImages(Dataset):
    """Grey images and labels read from a pair of IDX files (Fashion-MNIST's own format)."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, images: Path, labels: Path, transform: Callable | None = None):
        self.images = _read_idx(images)  # (N, 28, 28) uint8
        self.targets = _read_idx(labels).astype(np.int64)  # (N,)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        img = Image.fromarray(self.images[i], mode="L")
        return (self.transform(img) if self.transform else img), int(self.targets[i])


def _require_dir(root: str) -> None:
    if not os.path.isdir(root):
        raise UserError(f"data directory {root} does not exist")


def _fashion_mnist(root: str, transform_train, transform_test):
    for folder in (FASHION_MNIST_DIR, Path(root) / "fashion-mnist"):
        files = {
            s: folder / f"{s}-idx{d}-ubyte.gz"
            for s, d in [("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1)]
        }
        if all(p.is_file() for p in files.values()):
            train = IdxImages(files["train-images"], files["train-labels"], transform_train)
            test = IdxImages(files["t10k-images"], files["t10k-labels"], transform_test)
            return train, test
    _require_dir(root)
    try:
        train = torchvision.datasets.FashionMNIST(root, train=True, download=True, transform=transform_train)
        test = torchvision.datasets.FashionMNIST(root, train=False, download=True, transform=transform_test)
    except Exception as e:
        raise UserError(
            f"Fashion-MNIST is not installed and could not be downloaded into {root} ({type(e).__name__}): "
            f"install Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or connect to the network"
        ) from None
    return train, test


def _cifar(dset: str, root: str, transform_train, transform_test):
    cls = torchvision.datasets.CIFAR10 if dset == "C10" else torchvision.datasets.CIFAR100
    try:
        train = cls(root, train=True, download=True, transform=transform_train)
        test = cls(root, train=False, download=True, transform=transform_test)
    except Exception as e:
        raise UserError(
            f"{cls.__name__} is not in {root} and could not be downloaded ({type(e).__name__}): "
            f"connect to the network, or put torchvision's {cls.base_folder} folder into {root}"
        ) from None
    return train, test


def get_dataset(model: str, root: str = "data/"):
    """Train and test sets for a model name, with the model's transforms."""
    spec = model_spec(model)
    transform_train, transform_test = get_transforms(spec.name, spec.dataset)
    if spec.dataset == "FMNIST":  # Debian's files need no data directory
        return _fashion_mnist(root, transform_train, transform_test)
    _require_dir(root)
    if spec.dataset == "ImgNet":
        sets = []
        for split, transform in (("train", transform_train), ("val", transform_test)):
            folder = os.path.join(root, split)
            if not os.path.isdir(folder):
                raise UserError(
                    f"ImageNet folder {folder} does not exist: --data_dir must hold train/ and val/ class folders"
                )
            try:
                sets.append(torchvision.datasets.ImageFolder(folder, transform))
            except (FileNotFoundError, OSError) as e:
                raise UserError(f"ImageNet folder {folder} holds no class folders with images ({e})") from None
        return tuple(sets)
    return _cifar(spec.dataset, root, transform_train, transform_test)


def get_dummy_dataset(model: str, n: int, seed: int = 0):
    """``n`` random images of the model's input size with random labels, as train and test sets."""
    spec = model_spec(model)
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, *spec.input_size, generator=g)
    labels = torch.randint(0, spec.num_classes, (n,), generator=g)
    data = TensorDataset(images, labels)
    return data, data


def get_data(args) -> tuple[Dataset, Dataset]:
    """Train and test sets as the common flags ask: fake (``--dummy``), real, or a real subset."""
    if args.dummy:
        trainset, testset = get_dummy_dataset(args.model, args.dummy, args.seed)
    else:
        trainset, testset = get_dataset(args.model, args.data_dir)
    if args.subset:
        trainset = Subset(trainset, range(min(args.subset, len(trainset))))
    return trainset, testset


def mix_seed(*numbers: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, image index, ...), well mixed (SplitMix64)."""
    value = 0x9E3779B97F4A7C15
    for number in numbers:
        value = (value ^ (number & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value >> 1


class Indexed(Dataset):
    """``dataset[i]`` as (input, target, i), with the random transforms seeded by (seed, epoch, i).

    Keys are (epoch, i) pairs from ``EpochSampler``. Seeding each image makes its augmentation
    independent of worker processes, of how many processes share the data and of restarts,
    so that an interrupted and resumed run, or a run on several processes, sees the same images.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        rng = torch.default_generator
        saved = rng.get_state()  # torchvision's transforms draw from the global generator
        rng.manual_seed(mix_seed(self.seed, epoch, index))
        try:
            inputs, target = self.dataset[index]
        finally:
            rng.set_state(saved)
        return inputs, target, index


class EpochSampler(DistributedSampler):
    """DistributedSampler yielding (epoch, index), without its padding.

    Each epoch permutes the dataset from seed + epoch (as DistributedSampler does) and process r
    takes positions r, r + W, r + 2W, ...: with one process the whole permutation. Unlike
    DistributedSampler no image is repeated to even out the shares, so that W processes train on
    exactly the images one process trains on (``global_batches`` evens out the steps instead).
    Call ``set_epoch`` before each epoch.
    """

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        return ((self.epoch, i) for i in order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, workers: int, device: torch.device, seed: int = 0
) -> DataLoader:
    """A loader of (inputs, targets, indices) batches over this process's share of ``dataset``.

    ``batch_size`` counts the images of all processes together. Shuffled loaders (training)
    reshuffle per epoch from ``seed`` + epoch and need ``batch_size`` to split evenly over the
    processes, so that each global batch is the one a single process would take; unshuffled
    ones (evaluation) keep the dataset's order. Memory is pinned on CUDA.
    """
    world = distributed.world_size()
    if shuffle and batch_size % world:
        raise UserError(f"--batch_size {batch_size} does not split evenly over {world} processes")
    sampler = EpochSampler(dataset, num_replicas=world, rank=distributed.rank(), shuffle=shuffle, seed=seed)
    return DataLoader(
        Indexed(dataset, seed),
        batch_size=-(-batch_size // world),
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),  # worker seeds: the global generator stays untouched
    )


def global_batches(loader: DataLoader, desc: str):
    """Yield (inputs, targets, indices, n) for every training step of an epoch, with a progress bar.

    ``n`` is the size of the step's batch over all processes. Every process takes the same number
    of steps (its collectives must pair up): one whose share ends before the last step, because
    the last batch has fewer images than there are processes, gets an empty batch.
    """
    world = distributed.world_size()
    total, size = len(loader.dataset), loader.batch_size * world
    steps = -(-total // size)
    batches = iter(loader)
    for step in progress(range(steps), desc):
        batch = next(batches, None)
        if batch is None:  # nothing left for this process: a batch of no images
            inputs, target, _ = loader.dataset[(0, 0)]
            batch = (inputs[None][:0], torch.as_tensor([target])[:0], torch.zeros(0, dtype=torch.long))
        yield (*batch, min(size, total - step * size))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of an epoch's per-image random numbers, alike in every process and restart."""
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, epoch))
    return generator


def progress(iterable, desc: str):
    """A tqdm bar over batches, shown by the main process only."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=not distributed.is_main())


# ---------------------------------------------------------------------------------------------
# Policies, rewards and statistics (paper, Sec. 3.2)


def sample_policy(probs: torch.Tensor, alpha: float, generator: torch.Generator | None = None, rows: int = 0):
    """Greedy policy, bounded Bernoulli distribution and a policy sampled from it.

    ``probs`` (B, K) -> ``policy_map`` (B, K) = probs >= 0.5, ``distr`` over
    p' = alpha * p + (1 - alpha) * (1 - p), and ``policy`` (B, K) ~ distr. With a ``generator``
    (``epoch_generator``) and the batch's size over all processes (``rows``), the samples come
    from ``distributed.uniform``: under ``--parallel`` each image gets the numbers it gets in a
    single process.
    """
    probs = probs.float()  # log-probabilities in float32
    policy_map = (probs >= 0.5).float()
    bounded = probs * alpha + (1 - probs) * (1 - alpha)
    distr = Bernoulli(bounded)
    if generator is None:
        return policy_map, distr.sample(), distr
    u = distributed.uniform(generator, rows or probs.shape[0], probs.shape[1])
    return policy_map, (u < bounded.detach()).float(), distr


def get_reward(preds: torch.Tensor, targets: torch.Tensor, policy: torch.Tensor, penalty: float):
    """R(u) = 1 - (|u|/K)^2 where the prediction is right, else ``penalty``. Returns (B,) reward and match."""
    block_use = policy.sum(1).float() / policy.shape[1]  # (B,)
    match = preds.argmax(1) == targets  # (B,)
    reward = torch.where(match, 1.0 - block_use**2, torch.full_like(block_use, penalty))
    return reward, match.float()


def curriculum_blocks(epoch: int, num_blocks: int, cl_step: int = 1) -> int:
    """Blocks the agent decides at ``epoch``: the original's ``--cl_step`` switch.

    Below ``num_blocks`` (K) the curriculum runs: min(epoch + 1, K) blocks, whatever the value;
    K or more turns it off: all K blocks from the first epoch.
    """
    return min(epoch + 1, num_blocks) if cl_step < num_blocks else num_blocks


def curriculum_mask(num_blocks: int, decided: int, device=None) -> torch.Tensor:
    """(K,) bool, True on the last ``decided`` blocks (those the agent chooses)."""
    mask = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    mask[num_blocks - decided :] = True
    return mask


def performance_stats(policies, rewards, matches):
    """Accuracy, mean reward, mean and std of blocks used, and the set of distinct policies."""
    policies = torch.cat(list(policies)) if not torch.is_tensor(policies) else policies
    rewards = torch.cat(list(rewards)) if not torch.is_tensor(rewards) else rewards
    matches = torch.cat(list(matches)) if not torch.is_tensor(matches) else matches
    blocks = policies.float().sum(1)  # (N,)
    accuracy = matches.float().mean().item()
    reward = rewards.float().mean().item()
    sparsity = blocks.mean().item()
    variance = blocks.std().item() if len(blocks) > 1 else 0.0
    policy_set = {"".join(str(v) for v in row) for row in policies.int().tolist()}
    return accuracy, reward, sparsity, variance, policy_set


def stats_line(prefix: str, stats) -> str:
    """The original's console line: accuracy, reward, blocks used (mean, std), unique policies."""
    accuracy, reward, sparsity, variance, policy_set = stats
    return f"{prefix}A: {accuracy:.3f} | R: {reward:.2E} | S: {sparsity:.3f} | V: {variance:.3f} | #: {len(policy_set)}"


def log_stats(writer, split: str, stats, epoch: int) -> None:
    """TensorBoard scalars of one epoch's statistics."""
    accuracy, reward, sparsity, variance, policy_set = stats
    for name, value in [
        ("accuracy", accuracy),
        ("reward", reward),
        ("sparsity", sparsity),
        ("variance", variance),
        ("unique_policies", len(policy_set)),
    ]:
        writer.add_scalar(f"{split}_{name}", value, epoch)


def open_run_log(cv_dir: str | os.PathLike, args, resumed_at: int | None = None):
    """In the main process, record the run (``write_run_info``) and open its TensorBoard writer in
    ``<cv_dir>/log``, dropping logged steps from ``resumed_at`` on; None in the other processes."""
    if not distributed.is_main():
        return None
    write_run_info(cv_dir, args, resumed_at)
    return SummaryWriter(str(Path(cv_dir) / "log"), purge_step=resumed_at)


def report(writer, split: str, stats, policies: torch.Tensor, epoch: int) -> None:
    """One epoch's train or test statistics: the console line and TensorBoard (main process only)."""
    if not distributed.is_main():
        return
    print(stats_line(f"E: {epoch} | " if split == "train" else "TS - ", stats), flush=True)
    log_stats(writer, split, stats, epoch)
    log_policies(writer, split, policies, epoch)


def log_policies(writer, split: str, policies: torch.Tensor, epoch: int) -> None:
    """TensorBoard histograms of one epoch's policies (N, K).

    ``<split>_blocks_used``: blocks used per image. ``<split>_block_keep_rate``: one bucket per
    block, as high as the share of images that keep it.
    """
    k = policies.shape[1]
    writer.add_histogram(f"{split}_blocks_used", policies.sum(1).double().numpy(), epoch, bins=np.arange(k + 2) - 0.5)
    rates = policies.double().mean(0)  # (K,)
    blocks = torch.arange(k, dtype=torch.float64)
    writer.add_histogram_raw(
        f"{split}_block_keep_rate",
        min=-0.5,  # bucket t spans [t - 0.5, t + 0.5]
        max=k - 0.5,
        num=float(rates.sum()),
        sum=float((rates * blocks).sum()),
        sum_squares=float((rates * blocks**2).sum()),
        bucket_limits=(blocks + 0.5).tolist(),
        bucket_counts=rates.tolist(),
        global_step=epoch,
    )


def autocast(device: torch.device, enabled: bool):
    """bfloat16 autocast on ``device`` when ``enabled`` (``--amp``); a no-op otherwise."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def check_finite(value: torch.Tensor, what: str) -> None:
    """Stop the run (a UserError) when ``value`` holds a NaN or an infinity; nothing is saved after it.

    Under ``--parallel`` every process stops when any of them sees one (a collective).
    """
    if distributed.any_process(not bool(torch.isfinite(value).all()), value.device):
        raise UserError(
            f"the {what} became NaN or infinite: stopped before saving anything more, "
            f"so the checkpoints already written are the last good ones (try a lower --lr)"
        )


def check_finite_weights(*modules: nn.Module) -> None:
    """Stop the run when a parameter or buffer holds a NaN or an infinity: called before each save."""
    bad = [
        name
        for module in modules
        for name, value in module.state_dict().items()
        if value.is_floating_point() and not bool(torch.isfinite(value).all())
    ]
    device = next(modules[0].parameters()).device
    if distributed.any_process(bool(bad), device):
        raise UserError(
            f"the weights became NaN or infinite ({bad[0] if bad else 'in another process'}): stopped before "
            f"saving them, so the checkpoints already written are the last good ones (try a lower --lr)"
        )


def greedy_policy(agent: Policy, inputs: torch.Tensor) -> torch.Tensor:
    """The agent's greedy policy (B, K): keep a block where its probability is at least 0.5."""
    probs, _ = agent(inputs)
    return (probs >= 0.5).float()


def baseline_policy(kind: str, num_blocks: int, k: int | None = None, seed: int = 0) -> Callable:
    """A fixed policy rule ``inputs -> (B, K)`` to compare BlockDrop with.

    ``full``: every block; ``first_k``: the first ``k`` blocks; ``random_k``: ``k`` blocks drawn
    per image, from a generator seeded with ``seed`` (the same images in the same order get the
    same blocks).
    """
    if kind == "full":
        return lambda x: torch.ones(x.shape[0], num_blocks, device=x.device)
    if kind == "first_k":
        row = (torch.arange(num_blocks) < k).float()
        return lambda x: row.to(x.device).expand(x.shape[0], -1)
    if kind == "random_k":
        generator = torch.Generator().manual_seed(seed)

        def random_k(x: torch.Tensor) -> torch.Tensor:
            chosen = torch.rand(x.shape[0], num_blocks, generator=generator).argsort(1)[:, :k]  # (B, k)
            return torch.zeros(x.shape[0], num_blocks).scatter_(1, chosen, 1.0).to(x.device)

        return random_k
    raise ValueError(f"unknown baseline policy {kind!r}")


@torch.inference_mode()
def evaluate(
    rnet,
    agent,
    loader,
    device,
    penalty: float,
    decided: int | None = None,
    policy_fn=None,
    dense: bool = False,
    amp: bool = False,
):
    """Policies over a loader, in batches: (policies, rewards, matches) on the CPU.

    ``policy_fn(inputs) -> (B, K)`` chooses the policies; by default the agent's greedy ones. With
    ``decided`` set, the first K - decided blocks are forced on (curriculum learning). ``dense``
    runs the original's masked form instead of the sparse one (same numbers, full cost); ``amp``
    runs both networks under bfloat16 autocast. Batches of (inputs, targets, indices), as
    ``make_loader`` gives, come back in dataset order, gathered from every process under
    ``--parallel``; plain (inputs, targets) batches in the loader's order.
    """
    rnet.eval()
    agent.eval()
    policy_fn = policy_fn or (lambda x: greedy_policy(agent, x))
    indices, policies, rewards, matches = [], [], [], []
    seen = 0
    for inputs, targets, *index in progress(loader, "test"):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with autocast(device, amp):
            policy = policy_fn(inputs).float()  # (B, K)
            if decided is not None:
                policy[:, ~curriculum_mask(policy.shape[1], decided, device)] = 1.0
            preds = rnet(inputs, policy, masked=dense or None).float()
        reward, match = get_reward(preds, targets, policy, penalty)
        indices.append(index[0] if index else torch.arange(seen, seen + len(targets)))
        seen += len(targets)
        policies.append(policy.cpu())
        rewards.append(reward.cpu())
        matches.append(match.cpu())
    return distributed.collect(indices, policies, rewards, matches)


# ---------------------------------------------------------------------------------------------
# FLOPs (2 x multiply-accumulates of convolutions and linear layers, measured by PyTorch)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call, measured with ``torch.utils.flop_counter``."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def block_flops(rnet: FlatResNet, input_size: tuple[int, ...]) -> tuple[int, torch.Tensor]:
    """FLOPs of one image through the always-run parts (stem, shortcuts, classifier) and per block (K,)."""
    was_training = rnet.training
    rnet.eval()
    x = torch.zeros(1, *input_size, device=next(rnet.parameters()).device)
    inputs = []  # each block's input, in execution order
    hooks = [
        rnet.blocks[s][k].register_forward_pre_hook(lambda m, args: inputs.append((m, args[0])))
        for _, s, k in rnet.block_positions()
    ]
    try:
        total = count_flops(lambda: rnet.forward_full(x))
    finally:
        for h in hooks:
            h.remove()
    per_block = torch.tensor([count_flops(partial(m, a)) for m, a in inputs], dtype=torch.float64)
    rnet.train(was_training)
    return int(total - per_block.sum().item()), per_block


def policy_flops(agent: Policy, input_size: tuple[int, ...]) -> int:
    """FLOPs of the policy network on one image."""
    was_training = agent.training
    agent.eval()
    x = torch.zeros(1, *input_size, device=next(agent.parameters()).device)
    flops = count_flops(lambda: agent(x))
    agent.train(was_training)
    return flops


def profile(rnet, agent, loader, device, input_size, policy_fn=None, count_agent: bool = True, amp: bool = False):
    """test.py's figures for policies over the loader (the agent's greedy ones by default).

    Returns accuracy, mean and std of blocks used, per-image FLOPs (N,) and the set of policies;
    the policy network's FLOPs count when ``count_agent``.
    """
    policies, rewards, matches = evaluate(rnet, agent, loader, device, -1.0, policy_fn=policy_fn, amp=amp)
    accuracy, _, sparsity, variance, policy_set = performance_stats(policies, rewards, matches)
    # Per-image FLOPs: the policy network (when it runs), the parts that always run, the kept blocks.
    base, per_block = block_flops(rnet, input_size)
    flops = base + policies.double() @ per_block  # (N,)
    if count_agent:
        flops = flops + policy_flops(agent, input_size)
    return accuracy, sparsity, variance, flops.numpy(), policy_set


# ---------------------------------------------------------------------------------------------
# Runs: arguments, device, seeds, run records


def model_name(text: str) -> str:
    """argparse type of ``--model``."""
    try:
        return model_spec(text).name
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def common_parser() -> argparse.ArgumentParser:
    """Flags every script shares (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", type=model_name, default="R110_C10", help="R<depth>_<C10|C100|FMNIST|ImgNet>")
    p.add_argument(
        "--data_dir", default="data/", help="dataset folder (CIFAR downloads here; ImageNet needs train/ and val/)"
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda when available)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument(
        "--dummy", type=non_negative_int, default=0, help="use N random images instead of a dataset (0: off)"
    )
    p.add_argument(
        "--subset", type=non_negative_int, default=0, help="train on the first N training images only (0: all)"
    )
    return p


def make_parser(description: str) -> ArgumentParser:
    """A script's parser: common flags as a parent, defaults shown in every help line."""
    return ArgumentParser(
        description=description, parents=[common_parser()], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )


def add_amp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--amp",
        action="store_true",
        help="run the networks under bfloat16 autocast (losses and statistics stay in float32)",
    )


def add_policy_training_flags(p: argparse.ArgumentParser) -> None:
    """Flags that cl_training.py and finetune.py share after their own ones."""
    p.add_argument("--alpha", type=probability, default=0.8, help="probability bound: p' = alpha*p + (1-alpha)*(1-p)")
    p.add_argument("--eval_every", type=positive_int, default=10, help="evaluate and save a checkpoint every N epochs")
    p.add_argument(
        "--dense",
        action="store_true",
        help="run the ResNet in the original's masked form everywhere, also where the sparse form gives the same "
        "numbers (evaluation, the frozen ResNet of curriculum learning): every kept block on every image; slower, "
        "for comparison",
    )
    add_amp_flag(p)


def get_device(name: str) -> torch.device:
    """The device of ``--device``, checked once."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"unsupported device {name!r}; use auto, cpu, cuda or cuda:N")
    return device


def set_seed(seed: int) -> None:
    """Seed Python, NumPy and PyTorch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Python's, NumPy's and PyTorch's random states, in types that ``weights_only`` loading reads."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "kind": str(kind),
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "cached_gaussian": float(cached),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
    }


def set_rng_state(state: dict) -> None:
    """Restore what ``rng_state`` returned."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        (n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_initialized():
        torch.cuda.set_rng_state(state["cuda"])


RESUME_FILE = "last.t7"
# Flags that may change between an interrupted run and its resumption: they do not change the
# numbers (--max_epochs may extend the run; --parallel gives the same numbers on W processes).
RESUME_FREE_FLAGS = {
    "resume",
    "load",
    "pretrained",
    "max_epochs",
    "workers",
    "device",
    "data_dir",
    "cv_dir",
    "eval_every",
    "parallel",
}


def save_resume(cv_dir: str | os.PathLike, args, state: dict) -> None:
    """Write ``<cv_dir>/last.t7``: ``state`` (weights, optimizer, epoch) with what ``load_resume``
    checks and restores: the script, its flags that fix the numbers, and the random states."""
    record = {"script": Path(sys.argv[0]).name, "args": run_args(args), "rng": rng_state()}
    save_checkpoint({**state, **record}, Path(cv_dir) / RESUME_FILE)


def run_args(args) -> dict:
    """The flags that fix a run's numbers, as a plain dict (stored in resumable checkpoints)."""
    return {k: v for k, v in sorted(vars(args).items()) if k not in RESUME_FREE_FLAGS}


def check_resume_args(saved: dict, args, path) -> None:
    """Refuse to resume ``path`` with flags that would change the numbers of the run."""
    current = run_args(args)
    changed = [k for k in sorted(set(saved) | set(current)) if saved.get(k) != current.get(k)]
    if changed:
        was = ", ".join(f"--{k} {saved[k]}" if k in saved else f"no --{k} (an earlier version)" for k in changed)
        now = ", ".join(f"--{k} {current.get(k)}" for k in changed)
        raise UserError(
            f"cannot resume {path}: it was written with {was}, this command has {now} "
            f"(use the run's flags, or a new --cv_dir)"
        )


def state_digest(module: nn.Module) -> str:
    """SHA-256 of a module's state dict (names, dtypes, shapes and values)."""
    digest = hashlib.sha256()
    for name, value in module.state_dict().items():
        value = value.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_resume(args, cv_dir: str | os.PathLike) -> dict | None:
    """``<cv_dir>/last.t7`` for ``--resume`` (None: nothing to resume, a new run starts)."""
    if not args.resume:
        return None
    path = Path(cv_dir) / RESUME_FILE
    if not path.is_file():
        if distributed.is_main():
            print(f"--resume: nothing to resume in {cv_dir}; starting a new run", flush=True)
        return None
    state = load_file(path)
    script = Path(sys.argv[0]).name
    if state.get("script", script) != script:
        raise UserError(f"cannot resume {path}: {state['script']} wrote it, not {script} (use another --cv_dir)")
    missing = [k for k in ("epoch", "optimizer", "args", "rng") if k not in state]
    if missing:
        raise UserError(f"cannot resume {path}: it has no {', '.join(missing)} (not a resumable checkpoint)")
    check_resume_args(state["args"], args, path)
    state["epoch"] = int(state["epoch"])
    if distributed.is_main():
        print(f"resuming {path}: epoch {state['epoch']} done", flush=True)
    return state


def add_run_flags(p: argparse.ArgumentParser, resume_help: str) -> None:
    """``--parallel`` and ``--resume``, shared by the three training scripts."""
    p.add_argument(
        "--parallel",
        action="store_true",
        help="train on several devices or nodes: one process per device, started by torchrun "
        "(see the README); --batch_size counts all processes together",
    )
    p.add_argument("--resume", action="store_true", help=resume_help)


def setup_run(args) -> torch.device:
    """Device, process group (``--parallel``) and seeds of a training run."""
    device = distributed.setup(args.parallel, get_device(args.device))
    set_seed(args.seed)
    return device


def write_run_info(cv_dir: str | os.PathLike, args, resumed_at: int | None = None) -> None:
    """Record the arguments, the command line and library versions in ``<cv_dir>/args.json``.

    A resumed run writes ``args_resumed_E<epoch>.json`` instead, keeping the original record.
    """
    cv_dir = Path(cv_dir)
    try:
        cv_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {cv_dir} ({e.strerror})") from None
    if not os.access(cv_dir, os.W_OK):
        raise UserError(f"the output folder {cv_dir} is not writable")
    info = {
        "args": vars(args),
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]),
        "started": time.strftime("%Y-%m-%d %H:%M:%S"),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "torchvision": torchvision.__version__,
            "numpy": np.__version__,
        },
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
    }
    name = "args.json" if resumed_at is None else f"args_resumed_E{resumed_at}.json"
    (cv_dir / name).write_text(json.dumps(info, indent=2, default=str) + "\n")


def adjust_learning_rate(
    optimizer: torch.optim.Optimizer, base_lr: float, epoch: int, epoch_step: int, ratio: float
) -> float:
    """lr = base * ratio ** (epoch // epoch_step), set on every parameter group; said at each decay
    (and at epoch 0), as the original's console said it."""
    lr = base_lr * ratio ** (epoch // epoch_step)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if epoch % epoch_step == 0 and distributed.is_main():
        print(f"# setting learning_rate to {lr:.2E}", flush=True)
    return lr
