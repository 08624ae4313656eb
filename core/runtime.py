"""Run plumbing: the scripts' shared flags, the device and precision, seeds, NaN guards."""

import argparse
import random
from contextlib import nullcontext
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from core import distributed
from core.cli import (
    ArgumentParser,
    HelpFormatter,
    UserError,
    batch_size,
    non_negative_int,
    path,
    positive_float,
    positive_int,
    probability,
    seed,
)
from core.models import model_spec


def model_name(text: str) -> str:
    """argparse type of ``--model``."""
    try:
        return model_spec(text).name
    except UserError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def common_parser() -> argparse.ArgumentParser:
    """Flags every script shares (a parent parser)."""
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument(
        "--model",
        type=model_name,
        default="R110_C10",
        help="R<depth>_<C10|C100|FMNIST|ImgNet|Folder> (Folder: your own train/ and val/ class folders)",
    )
    p.add_argument(
        "--data_dir",
        type=path,
        default="data/",
        help="dataset folder (CIFAR downloads here; ImageNet needs train/ and val/)",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda when available)")
    p.add_argument("--workers", type=non_negative_int, default=2, help="DataLoader worker processes")
    p.add_argument("--seed", type=seed, default=0, help="random seed")
    p.add_argument(
        "--dummy", type=non_negative_int, default=0, help="use N random images instead of a dataset (0: off)"
    )
    p.add_argument(
        "--subset", type=non_negative_int, default=0, help="train on the first N training images only (0: all)"
    )
    return p


def make_parser(description: str) -> ArgumentParser:
    """A script's parser: common flags as a parent, defaults shown in every help line."""
    return ArgumentParser(description=description, parents=[common_parser()], formatter_class=HelpFormatter)


def add_amp_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--amp",
        action="store_true",
        help="run the networks under bfloat16 autocast (losses and statistics stay in float32)",
    )


def add_schedule_flags(p: argparse.ArgumentParser, epoch_step: int, max_epochs: int) -> None:
    """Output folder, batch size and the epochs and learning-rate steps of cl_training.py and finetune.py."""
    p.add_argument("--cv_dir", type=path, default="cv/tmp/", help="folder for checkpoints and logs")
    p.add_argument("--batch_size", type=batch_size, default=256, help="batch size")
    p.add_argument("--epoch_step", type=positive_int, default=epoch_step, help="epochs between learning-rate decays")
    p.add_argument(
        "--max_epochs", type=non_negative_int, default=max_epochs, help="epochs to run (after the start epoch)"
    )
    p.add_argument("--lr_decay_ratio", type=positive_float, default=0.1, help="learning-rate decay factor")


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


def add_run_flags(p: argparse.ArgumentParser, resume_help: str) -> None:
    """``--parallel`` and ``--resume``, shared by the three training scripts."""
    p.add_argument(
        "--parallel",
        action="store_true",
        help="train on several devices or nodes: one process per device, started by torchrun "
        "(see docs/parallel-and-resume.md); --batch_size counts all processes together",
    )
    p.add_argument("--resume", action="store_true", help=resume_help)


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


@dataclass(frozen=True)
class Runtime:
    """Where and in what precision a run computes, resolved once (``runtime``, ``setup_run``)."""

    device: torch.device
    dtype: torch.dtype | None = None  # autocast's dtype (bfloat16 under --amp); None: float32

    def autocast(self):
        """The context of every forward pass: autocast to ``dtype``, or nothing in float32."""
        return nullcontext() if self.dtype is None else torch.autocast(self.device.type, dtype=self.dtype)


def runtime(device: str, amp: bool = False) -> Runtime:
    """The runtime of ``--device`` and ``--amp`` (bfloat16 autocast)."""
    return Runtime(get_device(device), torch.bfloat16 if amp else None)


def setup_run(args) -> Runtime:
    """Runtime, process group (``--parallel``) and seeds of a training run."""
    rt = runtime(args.device, args.amp)
    rt = Runtime(distributed.setup(args.parallel, rt.device), rt.dtype)  # under torchrun: this process's GPU
    set_seed(args.seed)
    return rt


def check_finite(value: torch.Tensor, what: str, why: str = "") -> None:
    """Stop the run (a UserError) when ``value`` holds a NaN or an infinity; nothing is saved after it.

    ``what`` names the quantity, ``why`` what makes it so. Under ``--parallel`` every process stops
    when any of them sees one (a collective).
    """
    if distributed.any_process(not bool(torch.isfinite(value).all()), value.device):
        raise UserError(
            f"the {what} became NaN or infinite{f' ({why})' if why else ''}: stopped before saving anything "
            f"more, so the checkpoints already written are the last good ones"
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
