"""The REINFORCE core (paper, Sec. 3.2): sampled policies, reward, curriculum, statistics, evaluation."""

from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.distributions import Bernoulli

from core import distributed
from core.loading import epoch_generator, global_batches, progress
from core.runtime import Runtime, check_finite
from models.resnet import Policy

DIVERGED = "its weights diverged: try a lower --lr"
SATURATED = "a keep probability reached 0 or 1: with --alpha 1 nothing bounds them"


def sample_policy(probs: torch.Tensor, alpha: float, generator: torch.Generator | None = None, rows: int = 0):
    """Greedy policy, bounded Bernoulli distribution and a policy sampled from it.

    ``probs`` (B, K) -> ``policy_map`` (B, K) = probs >= 0.5, ``distr`` over
    p' = alpha * p + (1 - alpha) * (1 - p), and ``policy`` (B, K) ~ distr. With a ``generator``
    (``epoch_generator``) and the batch's size over all processes (``rows``), the samples come
    from ``distributed.uniform``: under ``--parallel`` each image gets the numbers it gets in a
    single process.
    """
    probs = probs.float()  # log-probabilities in float32
    policy_map = (probs >= 0.5).float()
    bounded = probs * alpha + (1 - probs) * (1 - alpha)
    distr = Bernoulli(bounded)
    if generator is None:
        return policy_map, distr.sample(), distr
    u = distributed.uniform(generator, rows or probs.shape[0], probs.shape[1])
    return policy_map, (u < bounded.detach()).float(), distr


def sampled_batches(agent, loader, rt: Runtime, alpha: float, seed: int, epoch: int):
    """An epoch's training steps with the agent's policies for each batch (paper, Sec. 3.2).

    Yields (inputs, targets, indices, batch_size, policy_map, policy, distr): the batch, its size
    over every process, the greedy policy, a policy sampled from the bounded distribution, and
    that distribution. The samples depend on (seed, epoch, image) only.
    """
    loader.sampler.set_epoch(epoch)
    generator = epoch_generator(seed, epoch, rt.device)
    for inputs, targets, index, batch_size in global_batches(loader, "train"):
        inputs, targets = inputs.to(rt.device, non_blocking=True), targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            probs, _ = agent(inputs)  # (B, K)
        check_finite(probs, "policy network's output", DIVERGED)
        policy_map, policy, distr = sample_policy(probs.float(), alpha, generator, batch_size)
        yield inputs, targets, index, batch_size, policy_map, policy, distr


def get_reward(preds: torch.Tensor, targets: torch.Tensor, policy: torch.Tensor, penalty: float):
    """R(u) = 1 - (|u|/K)^2 where the prediction is right, else ``penalty``. Returns (B,) reward and match."""
    block_use = policy.sum(1).float() / policy.shape[1]  # (B,)
    match = preds.argmax(1) == targets  # (B,)
    reward = torch.where(match, 1.0 - block_use**2, torch.full_like(block_use, penalty))
    return reward, match.float()


def curriculum_blocks(epoch: int, num_blocks: int, cl_step: int = 1) -> int:
    """Blocks the agent decides at ``epoch``: the original's ``--cl_step`` switch.

    Below ``num_blocks`` (K) the curriculum runs: min(epoch + 1, K) blocks, whatever the value;
    K or more turns it off: all K blocks from the first epoch.
    """
    return min(epoch + 1, num_blocks) if cl_step < num_blocks else num_blocks


def curriculum_mask(num_blocks: int, decided: int, device=None) -> torch.Tensor:
    """(K,) bool, True on the last ``decided`` blocks (those the agent chooses)."""
    mask = torch.zeros(num_blocks, dtype=torch.bool, device=device)
    mask[num_blocks - decided :] = True
    return mask


class Stats(NamedTuple):
    """``performance_stats``' figures; it unpacks as the original's 5-tuple, in the same order."""

    accuracy: float
    reward: float  # the mean reward
    blocks_mean: float  # blocks used per image: the original's "sparsity"
    blocks_std: float  # their standard deviation: the original's "variance"
    policy_set: set[str]  # the distinct policies, each as a string of 0s and 1s


def performance_stats(policies, rewards, matches) -> Stats:
    """Accuracy, mean reward, mean and std of blocks used, and the set of distinct policies."""
    policies = torch.cat(list(policies)) if not torch.is_tensor(policies) else policies
    rewards = torch.cat(list(rewards)) if not torch.is_tensor(rewards) else rewards
    matches = torch.cat(list(matches)) if not torch.is_tensor(matches) else matches
    blocks = policies.float().sum(1)  # (N,)
    return Stats(
        accuracy=matches.float().mean().item(),
        reward=rewards.float().mean().item(),
        blocks_mean=blocks.mean().item(),
        blocks_std=blocks.std().item() if len(blocks) > 1 else 0.0,
        policy_set={"".join(str(v) for v in row) for row in policies.int().tolist()},
    )


class EpochPolicies:
    """An epoch's sampled policies, rewards and matches, batch by batch; ``stats`` gathers them."""

    def __init__(self):
        self.indices, self.policies, self.rewards, self.matches = [], [], [], []

    def add(self, index: torch.Tensor, policy: torch.Tensor, reward: torch.Tensor, match: torch.Tensor) -> None:
        """One batch: dataset indices (B,), sampled policies (B, K), rewards and matches (B,)."""
        self.indices.append(index)
        self.policies.append(policy.cpu())
        self.rewards.append(reward.cpu())
        self.matches.append(match.cpu())

    def stats(self) -> tuple[Stats, torch.Tensor]:
        """The epoch's statistics over every process, and its policies (N, K) in dataset order."""
        policies, rewards, matches = distributed.collect(self.indices, self.policies, self.rewards, self.matches)
        return performance_stats(policies, rewards, matches), policies


def greedy_policy(agent: Policy, inputs: torch.Tensor) -> torch.Tensor:
    """The agent's greedy policy (B, K): keep a block where its probability is at least 0.5."""
    probs, _ = agent(inputs)
    return (probs >= 0.5).float()


def baseline_policy(kind: str, num_blocks: int, k: int | None = None, seed: int = 0) -> Callable:
    """A fixed policy rule ``inputs -> (B, K)`` to compare BlockDrop with.

    ``full``: every block; ``first_k``: the first ``k`` blocks; ``random_k``: ``k`` blocks drawn
    per image, from a generator seeded with ``seed`` (the same images in the same order get the
    same blocks).
    """
    if kind == "full":
        return lambda x: torch.ones(x.shape[0], num_blocks, device=x.device)
    if kind == "first_k":
        row = (torch.arange(num_blocks) < k).float()
        return lambda x: row.to(x.device).expand(x.shape[0], -1)
    if kind == "random_k":
        generator = torch.Generator().manual_seed(seed)

        def random_k(x: torch.Tensor) -> torch.Tensor:
            chosen = torch.rand(x.shape[0], num_blocks, generator=generator).argsort(1)[:, :k]  # (B, k)
            return torch.zeros(x.shape[0], num_blocks).scatter_(1, chosen, 1.0).to(x.device)

        return random_k
    raise ValueError(f"unknown baseline policy {kind!r}")


@torch.inference_mode()
def evaluate(
    rnet, agent, loader, rt: Runtime, penalty: float, decided: int | None = None, policy_fn=None, dense: bool = False
):
    """Policies over a loader, in batches: (policies, rewards, matches) on the CPU.

    ``policy_fn(inputs) -> (B, K)`` chooses the policies; by default the agent's greedy ones. With
    ``decided`` set, the first K - decided blocks are forced on (curriculum learning). ``dense``
    runs the original's masked form instead of the sparse one (same numbers, full cost). Batches
    of (inputs, targets, indices), as ``make_loader`` gives, come back in dataset order, gathered
    from every process under ``--parallel``; plain (inputs, targets) batches in the loader's order.
    """
    rnet.eval()
    agent.eval()
    policy_fn = policy_fn or (lambda x: greedy_policy(agent, x))
    indices, policies, rewards, matches = [], [], [], []
    seen = 0
    for inputs, targets, *index in progress(loader, "test"):
        inputs, targets = inputs.to(rt.device, non_blocking=True), targets.to(rt.device, non_blocking=True)
        with rt.autocast():
            policy = policy_fn(inputs).float()  # (B, K)
            if decided is not None:
                policy[:, ~curriculum_mask(policy.shape[1], decided, rt.device)] = 1.0
            preds = rnet(inputs, policy, masked=dense or None).float()
        reward, match = get_reward(preds, targets, policy, penalty)
        indices.append(index[0] if index else torch.arange(seen, seen + len(targets)))
        seen += len(targets)
        policies.append(policy.cpu())
        rewards.append(reward.cpu())
        matches.append(match.cpu())
    return distributed.collect(indices, policies, rewards, matches)
