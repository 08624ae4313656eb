"""Training on several processes under torchrun (``--parallel``), computing what one process computes.

One process per device (NCCL on CUDA, Gloo on CPU), started by ``torchrun``; process ``r`` of
``W`` takes positions r, r + W, r + 2W, ... of every batch, which is how DistributedSampler
interleaves a permutation. A W-process run is the 1-process run split up, not an approximation:

- ``--batch_size`` is the batch of all processes together; each process runs 1/W of it. No image
  is repeated to even out the shares: where the last batch has fewer images than there are
  processes, the processes without one take an empty step (``core.loading``: ``EpochSampler``
  shares out the images, ``global_batches`` evens out the steps).
- Random numbers drawn per image (sampled policies, stochastic depth) come from a generator that
  every process seeds alike; each draws the whole batch's numbers and keeps its own rows
  (``uniform``), so image i gets the same numbers whatever W is.
- BatchNorm in training mode normalises over the images of every process (``GlobalBatchNorm2d``).
- DistributedDataParallel averages the gradients; the scripts scale their losses (the sum over
  this process's images, times W, over the batch's size) so that the average is the 1-process
  gradient, whatever the shares.
- Statistics are gathered from every process and ordered by dataset index (``collect``).

So a 2-process run prints the 1-process run's statistics, up to float rounding.
"""

import inspect
import os
import shlex
import sys
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from core.cli import UserError


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def is_main() -> bool:
    """True in the process that prints and writes files (rank 0, or the only process)."""
    return rank() == 0


def _launch_hint(device: torch.device) -> str:
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    procs = gpus if gpus > 0 else "NUM_PROCESSES"
    return f"torchrun --standalone --nproc_per_node={procs} {shlex.join(sys.argv)}"


def setup(parallel: bool, device: torch.device) -> torch.device:
    """Join the process group when ``--parallel`` (under torchrun); returns this process's device.

    On CUDA each process takes ``cuda:LOCAL_RANK``; on the CPU every process uses Gloo.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ
    if not parallel:
        if launched and int(os.environ["WORLD_SIZE"]) > 1:
            raise UserError(
                f"started by torchrun with {os.environ['WORLD_SIZE']} processes but without --parallel: "
                "add --parallel, or start a single process"
            )
        return device
    if not launched:
        raise UserError(f"--parallel runs one process per device, started by torchrun: {_launch_hint(device)}")
    local_rank = int(os.environ["LOCAL_RANK"])
    if device.type == "cuda":
        if device.index is not None:
            raise UserError("with --parallel each process uses cuda:LOCAL_RANK: pass --device cuda (or auto)")
        if local_rank >= torch.cuda.device_count():
            raise UserError(
                f"local rank {local_rank} has no GPU: this node has {torch.cuda.device_count()}; "
                "start at most that many processes per node (--nproc_per_node)",
                every_process=True,
            )
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    return device


def cleanup() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def node_main_first():
    """Run the body in each node's first process before the others (downloads, caches).

    Where a first process fails in the body (bad input: it prints the one line), the others stop
    too, quietly (exit code 2), instead of a traceback at a barrier whose peer is gone.
    """
    if world_size() == 1:
        yield
        return
    first = int(os.environ.get("LOCAL_RANK", "0")) == 0
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if not first:
        if any_process(False, device):  # the barrier, and what happened before it
            raise UserError("another process stopped with an error (printed by the node's first process)")
        yield
        return
    try:
        yield
    except BaseException:
        any_process(True, device)
        raise
    any_process(False, device)


def wrap(module: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel around ``module`` under ``--parallel``; the module itself otherwise.

    Buffers are not broadcast: with ``GlobalBatchNorm2d`` every process updates its running
    statistics identically.
    """
    if not dist.is_initialized():
        return module
    device_ids = [device.index] if device.type == "cuda" else None
    # torch 2.15 renamed broadcast_buffers to forward_sync_buffers.
    no_sync = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
    sync = {"forward_sync_buffers": False} if no_sync else {"broadcast_buffers": False}
    return DistributedDataParallel(module, device_ids=device_ids, **sync)


def uniform(generator: torch.Generator, rows: int, cols: int) -> torch.Tensor:
    """Uniform numbers for this process's images of a batch of ``rows`` images (all processes).

    Every process draws the (rows, cols) numbers of the whole batch from a generator seeded
    alike, and keeps rows r, r + W, ...: the numbers a single process draws for those images.
    """
    u = torch.rand(rows, cols, generator=generator, device=generator.device)
    return u[rank() :: world_size()]


def any_process(flag: bool, device: torch.device) -> bool:
    """True when ``flag`` is true in any process."""
    if world_size() == 1:
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def collect(indices, *columns) -> tuple[torch.Tensor, ...]:
    """Per-batch results of every process, concatenated, in dataset-index order, each image once.

    ``indices`` and each of ``columns`` are lists of per-batch CPU tensors with one row per image.
    Returns the columns (on the CPU, in their dtypes).
    """
    idx = torch.cat(list(indices)).long()
    cols = [torch.cat(list(c)) for c in columns]
    if world_size() > 1:
        # One collective: the columns packed into float64 (exact for indices and 0/1 policies),
        # each share padded to the longest with index -1.
        flat = [c.reshape(len(idx), -1) for c in cols]
        packed = torch.cat([idx.double()[:, None]] + [c.double() for c in flat], dim=1)
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
        longest = torch.tensor([len(idx)], device=device)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX)
        padded = torch.full((int(longest.item()), packed.shape[1]), -1.0, dtype=torch.float64, device=device)
        padded[: len(idx)] = packed.to(device)
        parts = [torch.empty_like(padded) for _ in range(world_size())]
        dist.all_gather(parts, padded)
        packed = torch.cat(parts).cpu()
        packed = packed[packed[:, 0] >= 0]
        idx = packed[:, 0].long()
        widths = [f.shape[1] for f in flat]
        pieces = packed[:, 1:].split(widths, dim=1)
        cols = [p.to(c.dtype).reshape(-1, *c.shape[1:]) for p, c in zip(pieces, cols, strict=True)]
    order = idx.argsort(stable=True)
    idx = idx[order]
    first = torch.ones_like(idx, dtype=torch.bool)
    first[1:] = idx[1:] != idx[:-1]  # an image listed twice counts once
    return tuple(c[order][first] for c in cols)


def sum_over_processes(values: list[float], device: torch.device) -> list[float]:
    """Numbers summed over every process (the numbers themselves in a single process)."""
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def sum_tensor(t: torch.Tensor) -> torch.Tensor:
    """A tensor summed over every process (a copy; no gradient)."""
    t = t.clone()
    dist.all_reduce(t)
    return t


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) with its gradient: the sum of every process's gradient of the result."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d whose training statistics cover the images of every process.

    It works on CPU (Gloo) and CUDA (NCCL), and with processes that hold no image for the layer
    (a block that no image of theirs keeps), as long as every process calls every layer in the
    same order: FlatResNet's ``process_sum`` sees to that. Outside training, or with a single
    process, it is BatchNorm2d. The state dict is BatchNorm2d's.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or world_size() == 1:
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        # Sums around the running mean (shared by every process, close to the batch mean) keep
        # E[d^2] - E[d]^2 accurate; one collective carries count, sums and sums of squares.
        tracked = self.running_mean is not None
        shift = self.running_mean.detach().float().view(1, c, 1, 1) if tracked else x.new_zeros(1, c, 1, 1).float()
        d = xf - shift
        count = torch.full((1,), x.numel() // max(c, 1), dtype=torch.float64, device=x.device)
        # float64: counts above 2**24 and long sums stay exact enough
        sums = _SumOverProcesses.apply(torch.cat([count, d.sum((0, 2, 3)).double(), (d * d).sum((0, 2, 3)).double()]))
        n, s1, s2 = sums[0], sums[1 : c + 1], sums[c + 1 :]
        mean_d = s1 / n.clamp(min=1)
        var = (s2 / n.clamp(min=1) - mean_d * mean_d).clamp(min=0).float()  # biased, as BatchNorm normalises
        mean = shift.view(c) + mean_d.float()
        if tracked:
            self._update_running_stats(n, mean.detach(), var.detach())
        y = (xf - mean.view(1, c, 1, 1)) * torch.rsqrt(var + self.eps).view(1, c, 1, 1)
        if self.affine:
            y = y * self.weight.view(1, c, 1, 1) + self.bias.view(1, c, 1, 1)
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running_stats(self, n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> None:
        """BatchNorm's update (unbiased variance); none where no process had an image (n = 0)."""
        used = n > 0
        self.num_batches_tracked.add_(used.long())
        if self.momentum is None:  # cumulative average
            factor = used.float() / self.num_batches_tracked.clamp(min=1).float()
        else:
            factor = used.float() * self.momentum
        unbiased = var * (n / (n - 1).clamp(min=1)).float()
        self.running_mean.lerp_(mean.to(self.running_mean.dtype), factor)
        self.running_var.lerp_(unbiased.to(self.running_var.dtype), factor)


def prepare(module: nn.Module) -> nn.Module:
    """Under ``--parallel`` with several processes: BatchNorm over every process, uniform graphs.

    Replaces each BatchNorm2d by a GlobalBatchNorm2d with the same state, and sets
    ``process_sum`` where the module has it, so every process runs the same layers in the same
    order (each a no-op where it has no image) and skips a block only where no process keeps it. Call it before moving the module or building the
    optimizer. A no-op in a single process.
    """
    if world_size() == 1:
        return module
    for parent in list(module.modules()):
        if hasattr(parent, "process_sum"):
            parent.process_sum = sum_tensor
        for name, child in parent.named_children():
            if type(child) is nn.BatchNorm2d:
                new = GlobalBatchNorm2d(
                    child.num_features, child.eps, child.momentum, child.affine, child.track_running_stats
                )
                new.load_state_dict(child.state_dict())
                setattr(parent, name, new)
    return module
