"""Resuming a run: ``last.t7`` with the flags that fix its numbers and the random states."""

import hashlib
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core import distributed
from core.checkpoints import epoch_number, load_file, save_checkpoint, weights
from core.cli import UserError


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


def check_resume_contents(state: dict, path) -> None:
    """The parts of a ``last.t7`` that resuming uses, checked before any of it is used."""

    def bad(what: str):
        return UserError(f"cannot resume {path}: its {what} (a damaged or foreign last.t7; start a new run)")

    if not isinstance(state["args"], dict):
        raise bad("'args' are not the run's flags")
    optimizer = state["optimizer"]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= set(optimizer):
        raise bad("'optimizer' is not an optimizer's state")
    rng = state["rng"]
    if not isinstance(rng, dict) or not {"python", "numpy", "torch"} <= set(rng):
        raise bad("'rng' is not the random states")
    current = rng_state()
    try:
        set_rng_state(rng)  # a trial: every part must restore
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError, AttributeError):
        raise bad("'rng' is not the random states") from None
    finally:
        set_rng_state(current)
    for key in ("agent", "resnet", "state_dict"):
        if key in state:
            weights(state[key], path, key)


def restore(target, state, path, what: str) -> None:
    """``target.load_state_dict(state)`` (an optimizer, a schedule): a state that does not fit is one line."""
    try:
        target.load_state_dict(state)
    except (ValueError, KeyError, TypeError, RuntimeError, IndexError) as e:
        raise UserError(f"cannot continue from {path}: its {what} does not fit this run ({type(e).__name__})") from None


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
    check_resume_contents(state, path)
    check_resume_args(state["args"], args, path)
    state["epoch"] = epoch_number(state["epoch"], path)
    if "first_epoch" in state:
        state["first_epoch"] = epoch_number(state["first_epoch"], path, "first_epoch")
    if distributed.is_main():
        print(f"resuming {path}: epoch {state['epoch']} done", flush=True)
    return state
