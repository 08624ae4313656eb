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
from torchvision.datasets.folder import find_classes

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


def folder_classes(data_dir: str | os.PathLike) -> list[str]:
    """The class folders of ``data_dir/train``, sorted, as ImageFolder numbers them."""
    train = Path(data_dir) / "train"
    if not train.is_dir():
        raise UserError(f"image folder {train} does not exist: --data_dir must hold train/ and val/ class folders")
    try:
        classes, _ = find_classes(train)
    except FileNotFoundError:
        raise UserError(f"image folder {train} holds no class folders") from None
    return classes


def image_stats(data_dir: str | os.PathLike, size: int, workers: int = 0) -> tuple[tuple, tuple]:
    """Per-channel mean and std of the training images, as the model sees them before normalising."""
    resize = T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])
    images = ImageFolder(Path(data_dir) / "train", resize)  # read as RGB
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
        computed = image_stats(data_dir, model_spec(model).input_size[-1], workers)
        mean, std = mean or computed[0], std or computed[1]
    return FolderData.from_state({"classes": classes, "mean": list(mean), "std": list(std)}, "--mean/--std")


FAKE = FolderData(tuple(f"class {i}" for i in range(10)), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # --dummy's


def recorded_folder_data(model: str, data_dir: str | None, *sources, base: bool = True) -> FolderData | None:
    """What the first source that records it says of a Folder run's data; None if none does.

    Sources are checkpoint dicts or paths (None skipped), then the model's base file (``base``).
    Where ``data_dir/train`` exists, its classes must be the recorded ones.
    """
    spec = model_spec(model)
    found = None
    for source in [*sources, find_pretrained(spec.name) if base else None]:
        if source is None or source == "nil":
            continue
        ckpt = source if isinstance(source, dict) else load_file(source)
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
    if found is not None:
        return found
    if new:
        if args.dummy:
            return FAKE
        return new_folder_data(args.model, args.data_dir, args.mean, args.std, args.workers)
    raise UserError(
        f"no base model of {args.model} records its classes and normalisation: "
        f"run `python pretrain.py --model {args.model} --data_dir <your folders>` first"
    )


class ClassFolders(ImageFolder):
    """ImageFolder with given classes: a split lacking some of them keeps the others' labels."""

    def __init__(self, root, classes, transform):
        self._given = list(classes)
        super().__init__(root, transform, allow_empty=True)

    def find_classes(self, directory):
        present = set(find_classes(directory)[0])
        if not present <= set(self._given):
            unknown = ", ".join(sorted(present - set(self._given)))
            raise UserError(f"{directory} has class folders that the training images do not have: {unknown}")
        return self._given, {c: i for i, c in enumerate(self._given)}
