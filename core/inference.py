"""A trained BlockDrop model as one module: images in, logits and the blocks each image ran out."""

from collections.abc import Callable
from functools import partial

import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch import nn

from core.cli import UserError
from core.data import FASHION_MNIST_CLASSES, get_transforms
from core.folders import FolderData, recorded_folder_data
from core.models import model_spec, models_for_run
from core.reinforce import greedy_policy
from models.resnet import FlatResNet, Policy

CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]

# The size of the dataset's own images, before its test transform; every image is brought to it.
NATIVE = {
    "C10": ("RGB", 32),
    "C100": ("RGB", 32),
    "FMNIST": ("L", 28),
    "ImgNet": ("RGB", None),
    "Folder": ("RGB", None),
}


def class_names(dataset: str, data_dir: str | None = None) -> list[str] | None:
    """The names of a dataset's classes, in label order; None where they are not known here.

    CIFAR-100's come from its files in ``data_dir`` when they are there; ImageNet's from torchvision.
    """
    if dataset == "FMNIST":
        return list(FASHION_MNIST_CLASSES)
    if dataset == "C10":
        return list(CIFAR10_CLASSES)
    if dataset == "ImgNet":
        return list(torchvision.models.ResNet50_Weights.IMAGENET1K_V1.meta["categories"])
    if dataset == "C100" and data_dir:
        try:
            return list(torchvision.datasets.CIFAR100(data_dir, train=False, download=False).classes)
        except (RuntimeError, OSError):
            return None
    return None


def image_transform(model: str, folder: FolderData | None = None) -> Callable[[Image.Image], torch.Tensor]:
    """Any PIL image (grey, colour, palette, with alpha; any size) to the model's input tensor.

    The image is converted to the dataset's mode and, for the 32x32 datasets, its shorter side
    resized to the dataset's size and centre-cropped (an image of that size is left as it is);
    then the dataset's test transform runs (ImageNet's and image folders' resize and crop by
    themselves; image folders need their ``folder`` data).
    """
    spec = model_spec(model)
    mode, size = NATIVE[spec.dataset]
    _, test = get_transforms(spec.name, spec.dataset, folder)
    resize = [T.Resize(size), T.CenterCrop(size)] if size else []
    return T.Compose([partial(Image.Image.convert, mode=mode), *resize, test])  # picklable for workers


class BlockDrop(nn.Module):
    """Policy network and ResNet in eval mode: ``forward(x) -> (logits, policy)``.

    The policy (B, K) is the policy network's greedy one (a block runs where its probability is at
    least 0.5), or every block when the model was loaded without a checkpoint; only the kept blocks
    run. ``transform`` turns a PIL image into an input; ``classes`` names the outputs (or is None).
    """

    def __init__(
        self,
        rnet: FlatResNet,
        agent: Policy | None,
        model: str,
        classes: list[str] | None = None,
        folder: FolderData | None = None,
    ):
        super().__init__()
        self.rnet = rnet
        self.agent = agent
        self.model = model
        self.classes = classes
        self.transform = image_transform(model, folder)
        self.eval()

    @property
    def num_blocks(self) -> int:
        return self.rnet.num_blocks

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.agent is None:
            policy = torch.ones(x.shape[0], self.num_blocks, device=x.device)
        else:
            policy = greedy_policy(self.agent, x)
        return self.rnet(x, policy), policy


def load_blockdrop(
    model: str, checkpoint: str | None = None, device: str | torch.device = "cpu", data_dir: str | None = None
) -> BlockDrop:
    """A BlockDrop checkpoint (``finetune.py``'s or ``cl_training.py``'s) as a ready module in eval mode.

    Without ``checkpoint``: the model's base ResNet with every block (no policy network).
    Bad input (unknown model, unreadable or unsafe file, another model's file) is a UserError.
    """
    spec = model_spec(model)
    folder = None
    if spec.num_classes is None:  # image folders: classes and normalisation as recorded
        folder = recorded_folder_data(spec.name, None, checkpoint)
    if spec.num_classes is None and folder is None:
        raise UserError(f"neither {checkpoint or 'a checkpoint'} nor a base model of {spec.name} records its classes")
    classes = list(folder.classes) if folder else class_names(spec.dataset, data_dir)
    rnet, agent, _ = models_for_run(spec.name, checkpoint, init_agent=False, num_classes=folder and len(classes))
    return BlockDrop(rnet, agent if checkpoint else None, spec.name, classes, folder).to(device)
