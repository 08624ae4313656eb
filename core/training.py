"""A training run (``TrainingRun``): its resumption, epochs, run log, reports and checkpoints."""

import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from tensorboardX import SummaryWriter

from core import distributed
from core.checkpoints import checkpoint_path, save_checkpoint
from core.cli import UserError, check_output_dir
from core.reinforce import Stats, performance_stats
from core.resume import RESUME_FILE, load_resume, save_resume, set_rng_state


class TrainingRun:
    """One training run in ``cv_dir``: its resumption, epochs, run log, reports and checkpoints.

    Epochs: a script trains epochs ``first_epoch..last_epoch``, both included, numbered as the
    original numbers them. Curriculum learning and finetuning count from 0 (or from --load's epoch
    + 1): ``ckpt_E_0`` follows the first epoch. Pretraining counts from 1: ``pk_E_<n>`` is the base
    model after n epochs, as the released ``pk_E_164``. ``end_epoch`` writes ``last.t7`` after
    every epoch; with ``--resume`` the run goes on at the next epoch, with the random state and the
    TensorBoard log as they were. Every process calls every method; the main one prints and writes.
    """

    def __init__(self, args, cv_dir: str | os.PathLike):
        self.args = args
        self.cv_dir = Path(cv_dir)
        self.is_main = distributed.is_main()
        if self.is_main:
            check_output_dir(self.cv_dir, "--cv_dir")  # before any work
        self.resumed = load_resume(args, cv_dir)  # last.t7's dict; None for a new run
        self.resume_path = self.cv_dir / RESUME_FILE
        self._first = self.last_epoch = 0
        self.writer = None
        # entries that every checkpoint of the run carries: the model's name, image folders' data
        self.extra: dict = {"model": args.model}

    def first_epoch(self, new_run: int) -> int:
        """The run's first epoch: ``new_run`` for a new run, the resumed run's own otherwise."""
        return int(self.resumed.get("first_epoch", new_run)) if self.resumed else new_run

    def epochs(self, first_epoch: int, last_epoch: int) -> range:
        """Epochs ``first_epoch..last_epoch``, both included; a resumed run goes on after its last finished one.

        ``first_epoch`` is ``first_epoch(...)``'s, recorded in ``last.t7``. The run's record and log
        open here, and a resumed run's random state is restored.
        """
        self._first, self.last_epoch = first_epoch, last_epoch
        start = self.resumed["epoch"] + 1 if self.resumed else first_epoch
        resumed_at = start if self.resumed else None
        if self.is_main:
            write_run_info(self.cv_dir, self.args, resumed_at)
            self.writer = SummaryWriter(str(self.cv_dir / "log"), purge_step=resumed_at)
        if self.resumed:
            set_rng_state(self.resumed["rng"])  # as it was when the interrupted run saved it (checked on loading)
        return range(start, last_epoch + 1)

    def report(self, split: str, stats: Stats, policies: torch.Tensor, epoch: int) -> None:
        """One epoch's train or test statistics: the original's console line, TensorBoard scalars and histograms."""
        if self.is_main:
            print(stats_line(f"E: {epoch} | " if split == "train" else "TS - ", stats), flush=True)
            log_stats(self.writer, split, stats, epoch)
            log_policies(self.writer, split, policies, epoch)

    def log_scalars(self, epoch: int, **values: float) -> None:
        """TensorBoard scalars by name (pretraining's)."""
        if self.is_main:
            for name, value in values.items():
                self.writer.add_scalar(name, value, epoch)

    def evaluates(self, epoch: int) -> bool:
        """Whether ``epoch`` ends with an evaluation: every ``--eval_every`` epochs, and the last one."""
        return epoch % self.args.eval_every == 0 or epoch == self.last_epoch

    def save_evaluation(self, epoch: int, results, state: dict) -> Stats:
        """Report an evaluation (``evaluate``'s results) and save ``state`` under the original's name."""
        stats = performance_stats(*results)
        self.report("test", stats, results[0], epoch)
        if self.is_main:
            checkpoint = {**state, **self.extra, "epoch": epoch, "reward": stats.reward, "acc": stats.accuracy}
            save_checkpoint(checkpoint, checkpoint_path(self.cv_dir, epoch, stats))
        return stats

    def end_epoch(self, epoch: int, state: dict) -> None:
        """Write ``last.t7``: ``state`` (weights, optimizer) with the epoch and what ``--resume`` needs.

        The last write of an epoch: a run killed before it repeats the epoch, identically.
        """
        if self.is_main:
            save_resume(self.cv_dir, self.args, {**state, **self.extra, "epoch": epoch, "first_epoch": self._first})

    def close(self) -> None:
        """Close the log and leave the process group."""
        if self.writer is not None:
            self.writer.close()
        distributed.cleanup()


def stats_line(prefix: str, stats) -> str:
    """The original's console line: accuracy, reward, blocks used (mean, std), unique policies."""
    accuracy, reward, blocks_mean, blocks_std, policy_set = stats
    return f"{prefix}A: {accuracy:.3f} | R: {reward:.2E} | S: {blocks_mean:.3f} | V: {blocks_std:.3f} | #: {len(policy_set)}"


def log_stats(writer, split: str, stats, epoch: int) -> None:
    """TensorBoard scalars of one epoch's statistics."""
    # The original's tag names: "sparsity" is the mean of the blocks used, "variance" their std.
    for name, value in [
        ("accuracy", stats.accuracy),
        ("reward", stats.reward),
        ("sparsity", stats.blocks_mean),
        ("variance", stats.blocks_std),
        ("unique_policies", len(stats.policy_set)),
    ]:
        writer.add_scalar(f"{split}_{name}", value, epoch)


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


def write_run_info(cv_dir: str | os.PathLike, args, resumed_at: int | None = None) -> None:
    """Record the arguments, the command line and library versions in ``<cv_dir>/args.json``.

    A resumed run writes ``args_resumed_E<epoch>.json`` instead, keeping the original record.
    """
    cv_dir = Path(cv_dir)
    try:
        cv_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create the output folder {cv_dir} ({e.strerror})") from None
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
