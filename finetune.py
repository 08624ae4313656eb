"""Joint finetuning of the BlockDrop policy network and the ResNet.

    python finetune.py --model R110_C10 --lr 1e-4 --penalty -10 --pretrained <cl checkpoint> \\
        --batch_size 256 --max_epochs 2000 --cv_dir cv/R110_C10_ft_-10/
"""

import torch
import torch.nn.functional as F

import distributed
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
    p.add_argument("--penalty", type=float, default=-5, help="reward of a wrong prediction (gamma)")
    utils.add_policy_training_flags(p)
    p.add_argument(
        "--sparse",
        action="store_true",
        help="train with each block run only on the images that keep it (faster when few blocks are kept); "
        "BatchNorm then normalises over those images instead of the whole batch, which changes the numbers "
        "(the README gives the measured effect); not with --dense",
    )
    utils.add_run_flags(
        p,
        "continue the run in --cv_dir from its last.t7 (written after every epoch): ResNet, agent, "
        "optimizer, learning rate and random state, so that it ends as an uninterrupted run would; "
        "starts a new run when there is none",
    )
    return p


def train_epoch(args, rnet, agent, loader, optimizer, device, epoch=0):
    """One epoch of joint training: REINFORCE on the agent plus cross-entropy on the ResNet.

    ``rnet`` and ``agent`` may be wrapped in DistributedDataParallel. Returns the epoch's
    statistics over every process, and its sampled policies (N, K) in dataset order.
    """
    agent.train()
    rnet.train()
    loader.sampler.set_epoch(epoch)
    generator = utils.epoch_generator(args.seed, epoch, device)
    processes = distributed.world_size()
    # FlatResNet.forward's form: the original's masked one in training unless --sparse (--dense: masked everywhere).
    masked = True if args.dense else False if args.sparse else None
    indices, policies, rewards, matches = [], [], [], []
    for inputs, targets, index, batch_size in utils.global_batches(loader, "train"):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with utils.autocast(device, args.amp):
            probs, _ = agent(inputs)  # (B, K)
        utils.check_finite(probs, "policy network's output")
        policy_map, policy, distr = utils.sample_policy(probs.float(), args.alpha, generator, batch_size)

        with utils.autocast(device, args.amp):
            # In training mode, as in the original, both runs update BatchNorm's running statistics.
            with torch.no_grad():  # the greedy run is only the baseline of the advantage
                preds_map = rnet(inputs, policy_map, masked=masked)
            preds_sample = rnet(inputs, policy, masked=masked).float()
        reward_map, _ = utils.get_reward(preds_map, targets, policy_map, args.penalty)
        reward_sample, match = utils.get_reward(preds_sample, targets, policy, args.penalty)
        advantage = reward_sample - reward_map  # (B,)

        # As the original: the policy term is summed over the batch, the cross-entropy averaged.
        # DDP averages the processes' gradients, hence the factors.
        loss = (-distr.log_prob(policy).sum(1) * advantage).sum() * processes
        loss = loss + F.cross_entropy(preds_sample, targets, reduction="sum") * processes / batch_size
        utils.check_finite(loss, "loss")

        # Zeroed, not None (PyTorch 0.3): Adam also steps the parameters that got no gradient in
        # this batch (a block no image kept), from their momentum, as in the original.
        optimizer.zero_grad(set_to_none=False)
        loss.backward()
        optimizer.step()

        indices.append(index)
        policies.append(policy.cpu())
        rewards.append(reward_sample.cpu())
        matches.append(match.cpu())
    policies, rewards, matches = distributed.collect(indices, policies, rewards, matches)
    return utils.performance_stats(policies, rewards, matches), policies


def main(args):
    if args.sparse and args.dense:
        raise utils.UserError("--sparse and --dense are two different forms of the ResNet's forward: give one")
    device = utils.setup_run(args)
    main_process = distributed.is_main()
    resume = utils.load_resume(args, args.cv_dir)
    with distributed.node_main_first():  # downloads once per node
        if resume:  # the ResNet and the agent come from last.t7
            (rnet, agent), ckpt = utils.build_model(args.model), {}
        else:
            init_agent = args.pretrained is None
            rnet, agent, ckpt = utils.models_for_run(args.model, args.load, args.dummy, init_agent=init_agent)
        trainset, testset = utils.get_data(args)
    if args.load is not None and not resume and "resnet" not in ckpt:
        raise utils.UserError(f"{args.load} has no 'resnet': to start from a curriculum checkpoint, use --pretrained")
    if args.pretrained is not None and args.load is None and not resume:
        utils.load_agent(agent, args.pretrained, rnet.num_blocks)
    first_epoch = ckpt.get("epoch", -1) + 1
    start_epoch = first_epoch
    if resume:
        utils.load_agent_state(agent, resume, args.cv_dir, rnet.num_blocks)
        utils.load_weights_to_flatresnet(resume["resnet"], rnet)
        first_epoch, start_epoch = int(resume["first_epoch"]), resume["epoch"] + 1
    trainloader = utils.make_loader(trainset, args.batch_size, True, args.workers, device, args.seed)
    testloader = utils.make_loader(testset, args.batch_size, False, args.workers, device)

    agent.vnet.requires_grad_(False)  # the value head takes no part in the loss
    rnet = distributed.prepare(rnet).to(device)
    agent = distributed.prepare(agent).to(device)
    params = [p for p in list(agent.parameters()) + list(rnet.parameters()) if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=args.lr, weight_decay=args.wd)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
    trained_rnet, trained_agent = distributed.wrap(rnet, device), distributed.wrap(agent, device)

    writer = utils.open_run_log(args.cv_dir, args, start_epoch if resume else None)
    last_epoch = first_epoch + args.max_epochs
    if resume:
        utils.set_rng_state(resume["rng"])  # as it was when the interrupted run saved it
    for epoch in range(start_epoch, last_epoch + 1):
        utils.adjust_learning_rate(optimizer, args.lr, epoch, args.epoch_step, args.lr_decay_ratio)
        stats, policies = train_epoch(args, trained_rnet, trained_agent, trainloader, optimizer, device, epoch)
        utils.report(writer, "train", stats, policies, epoch)
        utils.check_finite_weights(agent, rnet)
        if epoch % args.eval_every == 0 or epoch == last_epoch:  # the last epoch is never lost
            results = utils.evaluate(rnet, agent, testloader, device, args.penalty, dense=args.dense, amp=args.amp)
            stats = utils.performance_stats(*results)
            utils.report(writer, "test", stats, results[0], epoch)
            if main_process:
                state = {
                    "agent": agent.state_dict(),
                    "resnet": rnet.state_dict(),
                    "epoch": epoch,
                    "reward": stats[1],
                    "acc": stats[0],
                }
                utils.save_checkpoint(state, utils.checkpoint_path(args.cv_dir, epoch, stats))
        if main_process:  # after the checkpoint: a run killed in between repeats this epoch, identically
            state = {
                "agent": agent.state_dict(),
                "resnet": rnet.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "first_epoch": first_epoch,
            }
            utils.save_resume(args.cv_dir, args, state)
    if writer is not None:
        writer.close()
    distributed.cleanup()


if __name__ == "__main__":
    utils.run(main, get_args_parser())
