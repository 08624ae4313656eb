"""Measure what the remaining differences from the original code change, for docs/differences.md.

    python docs/differences.py                 # R110_C10 shapes, random weights, fake images (about a minute)
    python docs/differences.py --model R20_FMNIST

1. ``finetune.py --sparse`` against the default (the original's masked form): one finetuning step
   from the same weights, images and sampled policies; relative L2 differences of the ResNet's
   and the agent's gradients and of the BatchNorm running statistics, and predictions that flip.
2. Today's Adam against PyTorch 0.3's (epsilon added before the bias correction of the second
   moment): ``--steps`` finetuning steps of each from the same start; the largest relative
   difference of the weights.
"""

import argparse
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import finetune  # noqa: E402
import utils  # noqa: E402


class Adam03(torch.optim.Optimizer):
    """Adam as PyTorch 0.3 computed it: p -= lr * sqrt(1 - b2^t) / (1 - b1^t) * m / (sqrt(v) + eps)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad + group["weight_decay"] * p if group["weight_decay"] else p.grad
                state = self.state[p]
                if not state:
                    state.update(step=0, exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                state["step"] += 1
                state["exp_avg"].mul_(b1).add_(grad, alpha=1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(grad, grad, value=1 - b2)
                t = state["step"]
                step_size = group["lr"] * math.sqrt(1 - b2**t) / (1 - b1**t)
                p.addcdiv_(state["exp_avg"], state["exp_avg_sq"].sqrt().add_(group["eps"]), value=-step_size)


def relative(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    """||a - b|| / ||b|| over lists of tensors."""
    diff = math.sqrt(sum(float((x - y).double().square().sum()) for x, y in zip(a, b, strict=True)))
    return diff / math.sqrt(sum(float(y.double().square().sum()) for y in b))


def finetuning(args, sparse: bool, optimizer_class, steps: int):
    """``steps`` batches of finetune.train_epoch from seeded weights; returns (rnet, agent)."""
    torch.manual_seed(args.seed)
    rnet, agent = utils.build_model(args.model)
    data = labelled(rnet, args, args.batch_size * steps, args.seed)
    loader = utils.make_loader(data, args.batch_size, False, 0, torch.device("cpu"))
    agent.vnet.requires_grad_(False)
    params = [p for p in [*agent.parameters(), *rnet.parameters()] if p.requires_grad]
    optimizer = optimizer_class(params, lr=args.lr)
    ns = finetune.get_args_parser().parse_args(["--seed", str(args.seed)] + (["--sparse"] if sparse else []))
    finetune.train_epoch(ns, rnet, agent, loader, optimizer, utils.Runtime(torch.device("cpu")))
    return rnet, agent


def labelled(rnet, args, n: int, seed: int):
    """Fake images labelled with the full network's own training-mode predictions, batch by batch
    (the loader keeps their order), so that rewards depend on the policy."""
    data, _ = utils.get_dummy_dataset(args.model, n, seed)
    probe = copy.deepcopy(rnet).train()
    with torch.no_grad():
        labels = [probe.forward_full(x).argmax(1) for x in data.tensors[0].split(args.batch_size)]
    data.tensors = (data.tensors[0], torch.cat(labels))
    return data


def bn_statistics(rnet) -> list[torch.Tensor]:
    return [v for k, v in rnet.state_dict().items() if k.endswith(("running_mean", "running_var"))]


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="R110_C10", help="model shapes (random weights)")
    p.add_argument("--batch_size", type=int, default=128, help="images per step")
    p.add_argument("--steps", type=int, default=20, help="Adam steps compared")
    p.add_argument("--lr", type=float, default=1e-4, help="learning rate (finetune.py's default)")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    args = p.parse_args()

    print(f"{args.model}, random weights, fake images, batch {args.batch_size}")
    (rnet, agent), (srnet, sagent) = (finetuning(args, sparse, torch.optim.Adam, 1) for sparse in (False, True))
    grads = lambda m: [q.grad for q in m.parameters() if q.grad is not None]  # noqa: E731
    # The two training forwards on one batch from the same weights: predictions that differ.
    torch.manual_seed(args.seed)
    start_rnet, _ = utils.build_model(args.model)
    x = labelled(start_rnet, args, args.batch_size, args.seed + 1).tensors[0]
    policy = torch.bernoulli(torch.full((args.batch_size, start_rnet.num_blocks), 0.5))
    with torch.no_grad():
        masked = start_rnet.train()(x, policy).argmax(1)
        sparse = start_rnet(x, policy, masked=False).argmax(1)
    print(
        f"--sparse against the original's masked form, one finetuning step: ResNet gradients differ by "
        f"{relative(grads(srnet), grads(rnet)):.0%}, agent gradients by {relative(grads(sagent), grads(agent)):.0%}, "
        f"BatchNorm running statistics by {relative(bn_statistics(srnet), bn_statistics(rnet)):.0%} (relative L2); "
        f"{(masked != sparse).float().mean():.1%} of the predictions of a batch differ (half the blocks kept)"
    )
    torch.manual_seed(args.seed)
    start = weights(utils.build_model(args.model))
    today = weights(finetuning(args, False, torch.optim.Adam, args.steps))
    old = weights(finetuning(args, False, Adam03, args.steps))
    change = relative(old, start)
    print(
        f"today's Adam against PyTorch 0.3's, {args.steps} finetuning steps at lr {args.lr:g}: the weights differ by "
        f"{relative(today, old):.1e} (relative L2), where the steps changed them by {change:.1e}: "
        f"{relative(today, old) / change:.1%} of the change"
    )


def weights(models) -> list[torch.Tensor]:
    return [q.detach().clone() for m in models for q in m.parameters()]


if __name__ == "__main__":
    main()
