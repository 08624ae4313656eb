"""FLOPs: 2 x multiply-accumulates of convolutions and linear layers, measured by torch.utils.flop_counter."""

from collections.abc import Callable
from functools import partial
from typing import NamedTuple

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from core.reinforce import evaluate, performance_stats
from core.runtime import Runtime
from models.resnet import FlatResNet, Policy


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


class Profile(NamedTuple):
    """test.py's figures; it unpacks as a tuple in this order."""

    accuracy: float
    blocks_mean: float  # blocks used per image
    blocks_std: float
    flops: np.ndarray  # (N,) FLOPs per image
    policy_set: set[str]  # the distinct policies


def profile(rnet, agent, loader, rt: Runtime, input_size, policy_fn=None, count_agent: bool = True) -> Profile:
    """test.py's figures for policies over the loader (the agent's greedy ones by default).

    The policy network's FLOPs count when ``count_agent``.
    """
    policies, rewards, matches = evaluate(rnet, agent, loader, rt, -1.0, policy_fn=policy_fn)
    stats = performance_stats(policies, rewards, matches)
    # Per-image FLOPs: the policy network (when it runs), the parts that always run, the kept blocks.
    base, per_block = block_flops(rnet, input_size)
    flops = base + policies.double() @ per_block  # (N,)
    if count_agent:
        flops = flops + policy_flops(agent, input_size)
    return Profile(stats.accuracy, stats.blocks_mean, stats.blocks_std, flops.numpy(), stats.policy_set)
