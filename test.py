"""Profile a BlockDrop checkpoint: accuracy, blocks used, FLOPs per image and unique policies.

    python test.py --model R110_C10 --load cv/finetuned/R110_C10_gamma_10/ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_469.t7

Without --load every block runs (the full network's profile, policy network included). The
baselines --policy first_k/random_k --k K and --policy full run the ResNet without the policy
network, so that BlockDrop can be compared with them at the same number of blocks.
"""

import numpy as np

import utils

POLICIES = ("agent", "full", "first_k", "random_k")


def get_args_parser():
    p = utils.make_parser("Profile a BlockDrop checkpoint with greedy policies, or a baseline policy.")
    p.add_argument(
        "--load", type=utils.path, default=None, help="BlockDrop checkpoint to profile (none: the full network)"
    )
    p.add_argument("--batch_size", type=utils.batch_size, default=256, help="batch size")
    p.add_argument(
        "--policy",
        choices=POLICIES,
        default="agent",
        help="agent: the checkpoint's greedy policies (without --load every block, policy network counted, "
        "as the original); full: every block, no policy network; first_k: the first K blocks; "
        "random_k: K blocks drawn per image (fixed by --seed). Baselines use --load's ResNet if it has one",
    )
    p.add_argument("--k", type=utils.non_negative_int, default=None, help="blocks kept by first_k and random_k")
    utils.add_amp_flag(p)
    return p


def check_policy_args(args, num_blocks: int) -> None:
    if args.policy in ("first_k", "random_k"):
        if args.k is None:
            raise utils.UserError(f"--policy {args.policy} needs --k K (the number of blocks to keep)")
        if args.k > num_blocks:
            raise utils.UserError(f"--k {args.k}: {args.model} has {num_blocks} blocks")
    elif args.k is not None:
        raise utils.UserError(f"--k applies to --policy first_k and random_k, not {args.policy}")


def main(args):
    rt = utils.runtime(args.device, args.amp)
    utils.set_seed(args.seed)
    spec = utils.model_spec(args.model)
    check_policy_args(args, spec.num_blocks)
    folder = utils.folder_data(args, args.load)  # image folders: classes, normalisation
    classes = folder and len(folder.classes)
    rnet, agent, _ = utils.models_for_run(args.model, args.load, args.dummy, init_agent=False, num_classes=classes)
    _, testset = utils.get_data(args, folder)
    loader = utils.make_loader(testset, args.batch_size, False, args.workers, rt.device)
    rnet.to(rt.device)
    agent.to(rt.device)
    if args.policy == "agent":
        full = args.load is None  # the original's profile of the full network: the agent keeps every block
        policy_fn = utils.baseline_policy("full", rnet.num_blocks) if full else None
        count_agent = True
    else:
        policy_fn = utils.baseline_policy(args.policy, rnet.num_blocks, args.k, args.seed)
        count_agent = False
    result = utils.profile(rnet, agent, loader, rt, spec.input_size, policy_fn, count_agent)
    print(f"Accuracy: {result.accuracy:.3f}")
    print(f"Block Usage: {result.blocks_mean:.3f} \u00b1 {result.blocks_std:.3f}")
    print(f"FLOPs/img: {np.mean(result.flops):.2E} \u00b1 {np.std(result.flops):.2E}")
    print(f"Unique Policies: {len(result.policy_set)}")


if __name__ == "__main__":
    utils.run(main, get_args_parser())
