"""Joint finetuning of the BlockDrop policy network and the ResNet.

    python finetune.py --model R110_C10 --lr 1e-4 --penalty -10 --pretrained <cl checkpoint> \\
        --batch_size 256 --max_epochs 2000 --cv_dir cv/R110_C10_ft_-10/
"""

import torch
import torch.nn.functional as F
from tensorboardX import SummaryWriter
from tqdm import tqdm

import utils


def get_args_parser():
    p = utils.make_parser("Joint finetuning of the policy network and the ResNet.")
    p.add_argument("--lr", type=utils.positive_float, default=1e-4, help="learning rate")
    p.add_argument("--wd", type=utils.non_negative_float, default=0.0, help="weight decay")
    p.add_argument("--load", default=None, help="checkpoint to resume from (ResNet, agent and epoch)")
    p.add_argument(
        "--pretrained",
        default=None,
        help="curriculum-learning checkpoint to start the agent from (ignored with --load)",
    )
    p.add_argument("--cv_dir", default="cv/tmp/", help="folder for checkpoints and logs")
    p.add_argument("--batch_size", type=utils.positive_int, default=256, help="batch size")
    p.add_argument("--epoch_step", type=utils.positive_int, default=1600, help="epochs between learning-rate decays")
    p.add_argument(
        "--max_epochs", type=utils.non_negative_int, default=2000, help="epochs to run (after the start epoch)"
    )
    p.add_argument("--lr_decay_ratio", type=utils.positive_float, default=0.1, help="learning-rate decay factor")
    p.add_argument("--parallel", action="store_true", default=False, help="multi-GPU training (not implemented yet)")
    p.add_argument("--penalty", type=float, default=-5, help="reward of a wrong prediction (gamma)")
    utils.add_policy_training_flags(p)
    return p


def train_epoch(args, rnet, agent, loader, optimizer, device):
    """One epoch of joint training: REINFORCE on the agent plus cross-entropy on the ResNet."""
    agent.train()
    rnet.train()
    policies, rewards, matches = [], [], []
    for inputs, targets in tqdm(loader, desc="train", leave=False, dynamic_ncols=True):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with utils.autocast(device, args.amp):
            probs, _ = agent(inputs)  # (B, K)
        utils.check_finite(probs, "policy network's output")
        policy_map, policy, distr = utils.sample_policy(probs.float(), args.alpha)

        forward = rnet.forward_masked if args.dense else rnet
        with utils.autocast(device, args.amp):
            with torch.no_grad():  # the greedy run is only the baseline of the advantage
                preds_map = forward(inputs, policy_map)
            preds_sample = forward(inputs, policy).float()
        reward_map, _ = utils.get_reward(preds_map, targets, policy_map, args.penalty)
        reward_sample, match = utils.get_reward(preds_sample, targets, policy, args.penalty)
        advantage = reward_sample - reward_map  # (B,)

        # As the original: the policy term is summed over the batch, the cross-entropy averaged.
        loss = (-distr.log_prob(policy).sum(1) * advantage).sum()
        loss = loss + F.cross_entropy(preds_sample, targets)
        utils.check_finite(loss, "loss")

        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        policies.append(policy.cpu())
        rewards.append(reward_sample.cpu())
        matches.append(match.cpu())
    return utils.performance_stats(policies, rewards, matches)


def main(args):
    utils.check_parallel(args)
    device = utils.get_device(args.device)
    utils.set_seed(args.seed)
    rnet, agent, ckpt = utils.models_for_run(args.model, args.load, args.dummy, init_agent=args.pretrained is None)
    if args.load is not None and "resnet" not in ckpt:
        raise utils.UserError(f"{args.load} has no 'resnet': to start from a curriculum checkpoint, use --pretrained")
    if args.pretrained is not None and args.load is None:
        utils.load_agent(agent, args.pretrained, rnet.num_blocks)
    start_epoch = ckpt.get("epoch", -1) + 1
    trainset, testset = utils.get_data(args)
    trainloader = utils.make_loader(trainset, args.batch_size, True, args.workers, device)
    testloader = utils.make_loader(testset, args.batch_size, False, args.workers, device)

    rnet.to(device)
    agent.to(device)
    optimizer = torch.optim.Adam(list(agent.parameters()) + list(rnet.parameters()), lr=args.lr, weight_decay=args.wd)

    utils.write_run_info(args.cv_dir, args)
    writer = SummaryWriter(f"{args.cv_dir.rstrip('/')}/log")
    last_epoch = start_epoch + args.max_epochs
    for epoch in range(start_epoch, last_epoch + 1):
        utils.adjust_learning_rate(optimizer, args.lr, epoch, args.epoch_step, args.lr_decay_ratio)
        stats = train_epoch(args, rnet, agent, trainloader, optimizer, device)
        print(utils.stats_line(f"E: {epoch} | ", stats), flush=True)
        utils.log_stats(writer, "train", stats, epoch)
        if epoch % args.eval_every == 0 or epoch == last_epoch:  # the last epoch is never lost
            stats = utils.performance_stats(
                *utils.evaluate(rnet, agent, testloader, device, args.penalty, dense=args.dense, amp=args.amp)
            )
            print(utils.stats_line("TS - ", stats), flush=True)
            utils.log_stats(writer, "test", stats, epoch)
            state = {
                "agent": agent.state_dict(),
                "resnet": rnet.state_dict(),
                "epoch": epoch,
                "reward": stats[1],
                "acc": stats[0],
            }
            utils.save_checkpoint(state, utils.checkpoint_path(args.cv_dir, epoch, stats))
    writer.close()


if __name__ == "__main__":
    utils.run(main, get_args_parser())
