"""Your own images (``R<depth>_Folder``): classes from the folders, normalisation from the training
images, both recorded in every checkpoint of the run so that later steps and predict.py use the same."""

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torchvision.transforms as T
from torch.utils.data import DataLoader
from torchvision.datasets import ImageFolder

from core.checkpoints import load_file
from core.cli import UserError
from core.models import find_pretrained, model_spec

FOLDER_KEY = "folder"  # the checkpoints' key of the record


@dataclass(frozen=True)
class FolderData:
    """A Folder run's data: class names in label order, per-channel mean and std of the inputs."""

    classes: tuple[str, ...]
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def state(self) -> dict:
        """The record that checkpoints carry under ``folder``."""
        return {"classes": list(self.classes), "mean": list(self.mean), "std": list(self.std)}

    @classmethod
    def from_state(cls, state, source: str) -> "FolderData":
        def numbers(key):
            values = state.get(key) if isinstance(state, dict) else None
            ok = isinstance(values, list | tuple) and len(values) == 3
            if not ok or not all(isinstance(v, int | float) and math.isfinite(v) for v in values):
                raise UserError(f"{source}: its folder record has no valid {key!r} (three finite numbers)")
            return tuple(float(v) for v in values)

        mean, std = numbers("mean"), numbers("std")
        classes = state.get("classes")
        if not isinstance(classes, list | tuple) or not classes or not all(isinstance(c, str) for c in classes):
            raise UserError(f"{source}: its folder record has no valid 'classes' (a list of names)")
        if min(std) <= 0:
            raise UserError(f"{source}: its folder record has a standard deviation that is not positive")
        return cls(tuple(classes), mean, std)


def class_dirs(folder: str | os.PathLike) -> list[str]:
    """The class folders of a split, sorted as ImageFolder numbers them; hidden folders are not classes."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"image folder {folder} does not exist: --data_dir must hold train/ and val/ class folders")
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir() and not entry.name.startswith("."))
    if not classes:
        raise UserError(f"image folder {folder} holds no class folders")
    return classes


def folder_classes(data_dir: str | os.PathLike) -> list[str]:
    """The classes of ``data_dir/train``."""
    return class_dirs(Path(data_dir) / "train")


def image_stats(data_dir: str | os.PathLike, model: str, workers: int = 0) -> tuple[tuple, tuple]:
    """Per-channel mean and std of the training images as the model's test transform gives them,
    before normalising (CIFAR-style: resized to 32 and cropped; ImageNet-style: resized to 256,
    centre crop 224)."""
    resize, crop = (256, 224) if model_spec(model).imagenet else (32, 32)
    transform = T.Compose([T.Resize(resize), T.CenterCrop(crop), T.ToTensor()])
    images = ClassFolders(Path(data_dir) / "train", folder_classes(data_dir), transform, every_class=True)  # RGB
    if not len(images):
        raise UserError(f"image folder {Path(data_dir) / 'train'} holds no images")
    total = torch.zeros(3, dtype=torch.float64)
    squares = torch.zeros(3, dtype=torch.float64)
    count = 0
    for x, _ in DataLoader(images, batch_size=64, num_workers=workers):
        x = x.double().transpose(0, 1).reshape(3, -1)  # (3, pixels)
        total += x.sum(1)
        squares += (x * x).sum(1)
        count += x.shape[1]
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-3)  # a blank channel divides by 1e-3
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())


def new_folder_data(model: str, data_dir: str, mean=None, std=None, workers: int = 0) -> FolderData:
    """A new base model's data: the classes of ``data_dir/train``, the given mean and std or those of its images."""
    classes = folder_classes(data_dir)
    if mean is None or std is None:
        computed = image_stats(data_dir, model, workers)
        mean, std = mean or computed[0], std or computed[1]
    return FolderData.from_state({"classes": classes, "mean": list(mean), "std": list(std)}, "--mean/--std")


FAKE = FolderData(tuple(f"class {i}" for i in range(10)), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # --dummy's


def recorded_folder_data(model: str, data_dir: str | None, *sources, base: bool = True) -> FolderData | None:
    """What a Folder run's ResNet was trained with: the record of the first source that holds ResNet
    weights (``resnet``, or a base model's ``state_dict``), else of the model's base file (``base``);
    None if there is none. A curriculum checkpoint (agent only) is passed over: its ResNet is the
    base model. Sources are checkpoint dicts or paths (None skipped). Where ``data_dir/train``
    exists, its classes must be the recorded ones.
    """
    spec = model_spec(model)
    found = None
    for source in [*sources, find_pretrained(spec.name) if base else None]:
        if source is None or source == "nil":
            continue
        ckpt = source if isinstance(source, dict) else load_file(source)
        if "resnet" not in ckpt and "state_dict" not in ckpt:
            continue
        if FOLDER_KEY in ckpt:
            found = FolderData.from_state(ckpt[FOLDER_KEY], "the run" if isinstance(source, dict) else str(source))
            break
    if found is not None and data_dir is not None and (Path(data_dir) / "train").is_dir():
        classes = folder_classes(data_dir)
        if tuple(classes) != found.classes:
            raise UserError(
                f"the classes of {Path(data_dir) / 'train'} ({', '.join(classes)}) are not those the model "
                f"was trained on ({', '.join(found.classes)})"
            )
    return found


def folder_data(args, *sources, new: bool = False) -> FolderData | None:
    """The data of a script's run: None for the table's datasets; for image folders, what ``sources``
    or the base model record, else (``new``: a new base model) the folders' classes and statistics.
    """
    if model_spec(args.model).num_classes is not None:
        return None
    data_dir = None if args.dummy else args.data_dir
    found = recorded_folder_data(args.model, data_dir, *sources, base=not new)
    given = new and (args.mean is not None or args.std is not None)
    if found is not None:
        if given and (tuple(args.mean or found.mean), tuple(args.std or found.std)) != (found.mean, found.std):
            raise UserError("--mean/--std: the weights this run starts from were trained with another normalisation")
        return found
    if args.dummy:
        return FAKE  # fake data: any normalisation does
    if new:
        return new_folder_data(args.model, args.data_dir, args.mean, args.std, args.workers)
    raise UserError(
        f"no base model of {args.model} records its classes and normalisation: "
        f"run `python pretrain.py --model {args.model} --data_dir <your folders>` first"
    )


class ClassFolders(ImageFolder):
    """ImageFolder with given classes: a split lacking some of them keeps the others' labels."""

    def __init__(self, root, classes, transform, every_class: bool = False):
        self._given = list(classes)
        super().__init__(root, transform, allow_empty=True)
        if every_class:  # training images: each class needs some
            empty = sorted(set(self._given) - {self._given[label] for label in self.targets})
            if empty:
                raise UserError(
                    f"image folder {root} holds no images of {', '.join(empty)} (of torchvision's image types)"
                )

    def find_classes(self, directory):
        present = set(class_dirs(directory))
        if not present <= set(self._given):
            unknown = ", ".join(sorted(present - set(self._given)))
            raise UserError(f"{directory} has class folders that the training images do not have: {unknown}")
        return self._given, {c: i for i, c in enumerate(self._given)}
