"""Datasets and their transforms: CIFAR, Fashion-MNIST (Debian's files or torchvision), ImageNet folders."""

import gzip
import math
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torch.utils.data import Dataset, Subset, TensorDataset

from core.cli import UserError, check_fits
from core.folders import ClassFolders, FolderData
from core.models import MODELS, model_spec

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")


def get_transforms(rnet: str, dset: str, folder: FolderData | None = None) -> tuple[Callable, Callable]:
    """Train and test transforms of ResNet ``rnet`` on dataset key ``dset``.

    ``rnet`` is the depth part of a model name, as the original passes it (``'R32'``), or the whole
    name (``'R32_C10'``): both give the same transforms. Unknown names are errors naming the valid ones.
    Image folders (``Folder``) need their ``folder`` data (normalisation).
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
    if dset == "Folder" and folder is None:
        raise UserError(f"{rnet}: image folders need their normalisation (a FolderData)")
    imagenet = model_spec(rnet).imagenet
    if dset == "ImgNet" or imagenet:
        mean, std = (folder.mean, folder.std) if folder else ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
        norm = [T.ToTensor(), T.Normalize(mean, std)]
        train = T.Compose([T.Resize(256), T.RandomCrop(224), T.RandomHorizontalFlip()] + norm)
        return train, T.Compose([T.Resize(256), T.CenterCrop(224)] + norm)
    if dset == "Folder":  # CIFAR-style: every image brought to 32x32, then CIFAR's augmentation
        size = [T.Resize(32), T.CenterCrop(32)]
        norm = [T.ToTensor(), T.Normalize(folder.mean, folder.std)]
        augment = [T.RandomCrop(32, padding=4), T.RandomHorizontalFlip()]
        return T.Compose(size + augment + norm), T.Compose(size + norm)
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


def get_dataset(model: str, root: str = "data/", folder: FolderData | None = None):
    """Train and test sets for a model name, with the model's transforms (image folders: with ``folder``'s)."""
    spec = model_spec(model)
    transform_train, transform_test = get_transforms(spec.name, spec.dataset, folder)
    if spec.dataset == "FMNIST":  # Debian's files need no data directory
        return _fashion_mnist(root, transform_train, transform_test)
    _require_dir(root)
    if spec.dataset == "Folder":
        sets = []
        for split, transform in (("train", transform_train), ("val", transform_test)):
            path = Path(root) / split
            if not path.is_dir():
                raise UserError(
                    f"image folder {path} does not exist: --data_dir must hold train/ and val/ class folders"
                )
            sets.append(ClassFolders(path, folder.classes, transform, every_class=split == "train"))
        for split, images in zip(("train", "val"), sets, strict=True):
            if not len(images):
                raise UserError(f"image folder {Path(root) / split} holds no images (of torchvision's image types)")
        return tuple(sets)
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


def get_dummy_dataset(model: str, n: int, seed: int = 0, num_classes: int | None = None):
    """``n`` random images of the model's input size with random labels, as train and test sets."""
    spec = model_spec(model)
    check_fits(n * math.prod(spec.input_size) * 4, f"--dummy {n}: the fake images")
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(n, *spec.input_size, generator=g)
    labels = torch.randint(0, num_classes or spec.num_classes or 10, (n,), generator=g)
    data = TensorDataset(images, labels)
    return data, data


def get_data(args, folder: FolderData | None = None) -> tuple[Dataset, Dataset]:
    """Train and test sets as the common flags ask: fake (``--dummy``), real, or a real subset.

    Image folders (Folder models) need the run's ``folder`` data.
    """
    if args.dummy:
        trainset, testset = get_dummy_dataset(args.model, args.dummy, args.seed, folder and len(folder.classes))
    else:
        trainset, testset = get_dataset(args.model, args.data_dir, folder)
    if args.subset:
        trainset = Subset(trainset, range(min(args.subset, len(trainset))))
    return trainset, testset
