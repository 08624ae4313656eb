"""Joint finetuning of the BlockDrop policy network and the ResNet.

    python finetune.py --model R110_C10 --lr 1e-4 --penalty -10 --pretrained <cl checkpoint> \\
        --batch_size 256 --max_epochs 2000 --cv_dir cv/R110_C10_ft_-10/
"""

import torch
import torch.nn.functional as F

import utils
from core import distributed


def get_args_parser():
    p = utils.make_parser("Joint finetuning of the policy network and the ResNet.")
    p.add_argument("--lr", type=utils.positive_float, default=1e-4, help="learning rate")
    p.add_argument("--wd", type=utils.non_negative_float, default=0.0, help="weight decay")
    p.add_argument("--load", type=utils.path, default=None, help="checkpoint to resume from (ResNet, agent and epoch)")
    p.add_argument(
        "--pretrained",
        type=utils.path,
        default=None,
        help="curriculum-learning checkpoint to start the agent from (ignored with --load)",
    )
    utils.add_schedule_flags(p, epoch_step=1600, max_epochs=2000)
    p.add_argument("--penalty", type=utils.finite_float, default=-5, help="reward of a wrong prediction (gamma)")
    utils.add_policy_training_flags(p)
    p.add_argument(
        "--sparse",
        action="store_true",
        help="train with each block run only on the images that keep it (faster when few blocks are kept); "
        "BatchNorm then normalises over those images instead of the whole batch, which changes the numbers "
        "(docs/differences.md gives the measured effect); not with --dense",
    )
    utils.add_run_flags(
        p,
        "continue the run in --cv_dir from its last.t7 (written after every epoch): ResNet, agent, "
        "optimizer, learning rate and random state, so that it ends as an uninterrupted run would; "
        "starts a new run when there is none",
    )
    return p


def train_epoch(args, rnet, agent, loader, optimizer, rt, epoch=0):
    """One epoch of joint training: REINFORCE on the agent plus cross-entropy on the ResNet.

    ``rnet`` and ``agent`` may be wrapped in DistributedDataParallel. Returns the epoch's
    statistics over every process, and its sampled policies (N, K) in dataset order.
    """
    agent.train()
    rnet.train()
    processes = distributed.world_size()
    # FlatResNet.forward's form: the original's masked one in training unless --sparse (--dense: masked everywhere).
    masked = True if args.dense else False if args.sparse else None
    epoch_policies = utils.EpochPolicies()
    batches = utils.sampled_batches(agent, loader, rt, args.alpha, args.seed, epoch)
    for inputs, targets, index, batch_size, policy_map, policy, distr in batches:
        with rt.autocast():
            # In training mode, as in the original, both runs update BatchNorm's running statistics.
            with torch.no_grad():  # the greedy run is only the baseline of the advantage
                preds_map = rnet(inputs, policy_map, masked=masked)
            preds_sample = rnet(inputs, policy, masked=masked).float()
        utils.check_finite(preds_sample, "ResNet's output", utils.DIVERGED)
        reward_map, _ = utils.get_reward(preds_map, targets, policy_map, args.penalty)
        reward_sample, match = utils.get_reward(preds_sample, targets, policy, args.penalty)
        advantage = reward_sample - reward_map  # (B,)

        # As the original: the policy term is summed over the batch, the cross-entropy averaged.
        # DDP averages the processes' gradients, hence the factors.
        log_prob = distr.log_prob(policy).sum(1)
        utils.check_finite(log_prob, "log-probability of the sampled policies", utils.SATURATED)
        loss = (-log_prob * advantage).sum() * processes
        loss = loss + F.cross_entropy(preds_sample, targets, reduction="sum") * processes / batch_size
        utils.check_finite(loss, "loss")

        # Zeroed, not None (PyTorch 0.3): Adam also steps the parameters that got no gradient in
        # this batch (a block no image kept), from their momentum, as in the original.
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

        epoch_policies.add(index, policy, reward_sample, match)
    return epoch_policies.stats()


def main(args):
    if args.sparse and args.dense:
        raise utils.UserError("--sparse and --dense are two different forms of the ResNet's forward: give one")
    rt = utils.setup_run(args)
    run = utils.TrainingRun(args, args.cv_dir)
    resume = run.resumed
    with distributed.node_main_first():  # downloads once per node
        folder = utils.folder_data(args, resume, args.load, args.pretrained)  # image folders: classes, normalisation
        classes = folder and len(folder.classes)
        if resume:  # the ResNet and the agent come from last.t7
            (rnet, agent), ckpt = utils.build_model(args.model, classes), {}
        else:
            init_agent = args.pretrained is None
            rnet, agent, ckpt = utils.models_for_run(
                args.model, args.load, args.dummy, init_agent=init_agent, num_classes=classes
            )
        trainset, testset = utils.get_data(args, folder)
    if folder:
        run.extra[utils.FOLDER_KEY] = folder.state()
    if args.load is not None and not resume and "resnet" not in ckpt:
        raise utils.UserError(f"{args.load} has no 'resnet': to start from a curriculum checkpoint, use --pretrained")
    if args.pretrained is not None and args.load is None and not resume:
        utils.load_agent(agent, args.pretrained, rnet.num_blocks, args.model)
    if resume:
        utils.load_agent_state(agent, resume, args.cv_dir, rnet.num_blocks)
        utils.load_weights_to_flatresnet(resume["resnet"], rnet)
    trainloader = utils.make_loader(trainset, args.batch_size, True, args.workers, rt.device, args.seed)
    testloader = utils.make_loader(testset, args.batch_size, False, args.workers, rt.device)

    agent.vnet.requires_grad_(False)  # the value head takes no part in the loss
    rnet = distributed.prepare(rnet).to(rt.device)
    agent = distributed.prepare(agent).to(rt.device)
    params = [p for p in list(agent.parameters()) + list(rnet.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.wd)
    if resume:
        utils.restore(optimizer, resume["optimizer"], run.resume_path, "optimizer")
    trained_rnet, trained_agent = distributed.wrap(rnet, rt.device), distributed.wrap(agent, rt.device)

    first_epoch = run.first_epoch(ckpt.get("epoch", -1) + 1)  # after --load's epoch, as the original
    for epoch in run.epochs(first_epoch, first_epoch + args.max_epochs):
        utils.adjust_learning_rate(optimizer, args.lr, epoch, args.epoch_step, args.lr_decay_ratio)
        stats, policies = train_epoch(args, trained_rnet, trained_agent, trainloader, optimizer, rt, epoch)
        run.report("train", stats, policies, epoch)
        utils.check_finite_weights(agent, rnet)
        weights = {"agent": agent.state_dict(), "resnet": rnet.state_dict()}
        if run.evaluates(epoch):
            results = utils.evaluate(rnet, agent, testloader, rt, args.penalty, dense=args.dense)
            run.save_evaluation(epoch, results, weights)
        run.end_epoch(epoch, {**weights, "optimizer": optimizer.state_dict()})
    run.close()


if __name__ == "__main__":
    utils.run(main, get_args_parser())
