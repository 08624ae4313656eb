"""Profile a BlockDrop checkpoint: accuracy, blocks used, FLOPs per image and unique policies.

    python test.py --model R110_C10 --load cv/finetuned/R110_C10_gamma_10/ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_469.t7

Without --load every block runs (the full network's profile, policy network included).
"""

import numpy as np
import torch

import utils


def get_args_parser():
    p = utils.make_parser("Profile a BlockDrop checkpoint with greedy policies.")
    p.add_argument("--load", default=None, help="BlockDrop checkpoint to profile (none: the full network)")
    p.add_argument("--batch_size", type=utils.positive_int, default=256, help="batch size")
    utils.add_amp_flag(p)
    return p


def profile(rnet, agent, loader, device, input_size, full: bool, amp: bool = False):
    """Greedy (or full) policies over the loader; returns the four reported figures."""
    policy_fn = (lambda x: torch.ones(x.shape[0], rnet.num_blocks, device=x.device)) if full else None
    policies, rewards, matches = utils.evaluate(rnet, agent, loader, device, -1.0, policy_fn=policy_fn, amp=amp)
    accuracy, _, sparsity, variance, policy_set = utils.performance_stats(policies, rewards, matches)
    # Per-image FLOPs: the policy network, the parts that always run, and the kept blocks.
    base, per_block = utils.block_flops(rnet, input_size)
    flops = utils.policy_flops(agent, input_size) + base + policies.double() @ per_block  # (N,)
    return accuracy, sparsity, variance, flops.numpy(), policy_set


def main(args):
    device = utils.get_device(args.device)
    utils.set_seed(args.seed)
    rnet, agent, _ = utils.models_for_run(args.model, args.load, args.dummy, init_agent=False)
    _, testset = utils.get_data(args)
    loader = utils.make_loader(testset, args.batch_size, False, args.workers, device)
    rnet.to(device)
    agent.to(device)
    spec = utils.model_spec(args.model)
    accuracy, sparsity, variance, flops, policy_set = profile(
        rnet, agent, loader, device, spec.input_size, full=args.load is None, amp=args.amp
    )
    print(f"Accuracy: {accuracy:.3f}")
    print(f"Block Usage: {sparsity:.3f} \u00b1 {variance:.3f}")
    print(f"FLOPs/img: {np.mean(flops):.2E} \u00b1 {np.std(flops):.2E}")
    print(f"Unique Policies: {len(policy_set)}")


if __name__ == "__main__":
    utils.run(main, get_args_parser())
