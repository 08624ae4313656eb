"""Checkpoint files: safe reading (the released Python 2 files too), atomic writing, weight loading."""

import argparse
import math
import os
import re
import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from core.cli import MAX_COUNT, UserError
from models.resnet import FlatResNet, Policy


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
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, an interrupt: no partial file stays behind
        tmp.unlink(missing_ok=True)
        # torch.save reports a failed write of its zip writer as a RuntimeError
        if isinstance(e, OSError) or (isinstance(e, RuntimeError) and "writ" in str(e)):
            reason = e.strerror if isinstance(e, OSError) and e.strerror else "the write failed"
            free = shutil.disk_usage(path.parent).free / 2**20
            raise UserError(
                f"cannot write {path} ({reason}; {free:.0f} MB free there): the previous file, if any, is intact"
            ) from None
        raise
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


def load_weights_to_flatresnet(source_model, target_model: FlatResNet, strict: bool = True, name=None) -> FlatResNet:
    """Copy weights into a flat ResNet from a module, a ``{'state_dict': ...}`` file or a state dict.

    Accepts the flat naming and the ``layer<N>`` naming, with or without a ``module.`` prefix.
    With ``strict=False`` keys the target lacks are ignored (ResNet-18 into the policy network).
    ``name`` names the source in errors (its path).
    """
    source = source_model.state_dict() if isinstance(source_model, nn.Module) else source_model
    if "state_dict" in source:
        source = weights(source["state_dict"], name or "the checkpoint", "state_dict")
    elif not all(torch.is_tensor(v) for v in source.values()):
        raise UserError(f"{name or 'the checkpoint'} holds no 'state_dict' and is not a state dict of tensors")
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


def weights(state, path, key: str) -> dict:
    """``state`` checked as a state dict: names to tensors, the floating ones finite."""
    if not isinstance(state, dict) or not state:
        raise UserError(f"{path}: its {key!r} is not a state dict (names to tensors)")
    for name, value in state.items():
        if not torch.is_tensor(value):
            raise UserError(f"{path}: its {key!r} holds {type(value).__name__} at {name!r}, not a tensor")
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            raise UserError(f"refused {path}: its {key!r} holds NaN or infinite values ({name})")
    return state


def number(value, path, key: str) -> float:
    """A finite number from a checkpoint (a plain number or a one-element tensor, as the legacy files hold)."""
    if torch.is_tensor(value) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise UserError(f"{path}: its {key!r} is {value!r}, not a finite number")
    return float(value)


def epoch_number(value, path, key: str = "epoch") -> int:
    """A checkpoint's epoch: a whole number in [0, MAX_COUNT]."""
    epoch = number(value, path, key)
    if epoch != int(epoch) or not 0 <= epoch <= MAX_COUNT:
        raise UserError(f"{path}: its {key!r} is {value!r}, not a whole number in [0, {MAX_COUNT:,}]")
    return int(epoch)


def check_model(ckpt: dict, path, model: str | None) -> None:
    """Refuse a checkpoint that records another model (files without the name are accepted)."""
    recorded = ckpt.get("model")
    if model is not None and recorded is not None and recorded != model:
        raise UserError(f"{path} is a checkpoint of {recorded}, not of {model}")


def load_agent_state(agent: Policy, ckpt: dict, path, num_blocks: int) -> None:
    agent_state = ckpt.get("agent", ckpt.get("net"))
    if agent_state is None:
        raise UserError(f"{path} is not a BlockDrop checkpoint: it has no 'agent' (keys: {', '.join(map(str, ckpt))})")
    agent_state = strip_prefix(weights(agent_state, path, "agent" if "agent" in ckpt else "net"))
    logit = agent_state.get("logit.weight")
    if logit is None:
        raise UserError(f"{path}: its agent has no 'logit.weight'; it is not a BlockDrop policy network")
    if logit.shape[0] != num_blocks:
        raise UserError(f"{path} holds a policy for {logit.shape[0]} blocks; this model has {num_blocks} blocks")
    try:
        agent.load_state_dict(agent_state)
    except RuntimeError as e:
        raise UserError(f"{path}: its agent does not fit this model ({str(e).strip().splitlines()[0]})") from None


def load_agent(agent: Policy, path: str | os.PathLike, num_blocks: int, model: str | None = None) -> dict:
    """Load only the policy network of a BlockDrop checkpoint (``agent``, or legacy ``net``).

    Returns the file's dict with ``epoch``, ``reward`` and ``acc`` as plain numbers. Contents of
    the wrong type, NaN weights, and (given ``model``) a checkpoint of another model are UserErrors.
    """
    ckpt = load_file(path)
    check_model(ckpt, path, model)
    load_agent_state(agent, ckpt, path, num_blocks)
    if "resnet" in ckpt:  # checked even where only the agent is used
        weights(ckpt["resnet"], path, "resnet")
    if "epoch" in ckpt:
        ckpt["epoch"] = epoch_number(ckpt["epoch"], path)
    for key in ("reward", "acc"):
        if key in ckpt:
            ckpt[key] = number(ckpt[key], path, key)
    return ckpt


def load_checkpoint(rnet: FlatResNet, agent: Policy, load: str | os.PathLike, model: str | None = None) -> dict | None:
    """Load a BlockDrop checkpoint (``agent`` or legacy ``net``, optional ``resnet``) into the models.

    Returns the file's dict with ``epoch``, ``reward`` and ``acc`` as plain numbers; ``'nil'``
    loads nothing and returns None, as in the original. ``model``: refuse another model's file.
    """
    if load == "nil":
        return None
    ckpt = load_agent(agent, load, rnet.num_blocks, model)
    if "resnet" in ckpt:
        try:
            load_weights_to_flatresnet(ckpt["resnet"], rnet)
        except UserError as e:
            raise UserError(f"{load}: {e}") from None
    return ckpt


def checkpoint_path(cv_dir: str | os.PathLike, epoch: int, stats) -> Path:
    """Where an evaluation's checkpoint goes: the original's name built from its statistics."""
    accuracy, reward, blocks, _, policy_set = stats
    return Path(cv_dir) / f"ckpt_E_{epoch}_A_{accuracy:.3f}_R_{reward:.2E}_S_{blocks:.2f}_#_{len(policy_set)}.t7"
