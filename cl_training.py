"""Curriculum learning of the BlockDrop policy network on a frozen, pretrained ResNet.

    python cl_training.py --model R110_C10 --cv_dir cv/R110_C10_cl/ --lr 1e-3 --batch_size 2048 --max_epochs 5000

At epoch e the agent decides only the last min(e + 1, K) blocks, the others always run (with
--cl_step below K, the default 1); with --cl_step K or more it decides every block from the start.
"""

import torch

import distributed
import utils


def get_args_parser():
    p = utils.make_parser("Curriculum learning of the policy network (ResNet frozen).")
    p.add_argument("--lr", type=utils.positive_float, default=1e-3, help="learning rate")
    p.add_argument("--beta", type=float, default=1e-1, help="entropy bonus weight")
    p.add_argument("--wd", type=utils.non_negative_float, default=0.0, help="weight decay")
    p.add_argument("--load", default=None, help="checkpoint to resume from (agent and epoch)")
    p.add_argument("--cv_dir", default="cv/tmp/", help="folder for checkpoints and logs")
    p.add_argument("--batch_size", type=utils.positive_int, default=256, help="batch size")
    p.add_argument("--epoch_step", type=utils.positive_int, default=10000, help="epochs between learning-rate decays")
    p.add_argument(
        "--max_epochs", type=utils.non_negative_int, default=10000, help="epochs to run (after the start epoch)"
    )
    p.add_argument("--lr_decay_ratio", type=utils.positive_float, default=0.1, help="learning-rate decay factor")
    p.add_argument(
        "--cl_step",
        type=int,
        default=1,
        help="curriculum switch, as in the original: below the number of blocks K, the agent decides the last "
        "min(epoch + 1, K) blocks at each epoch; K or more: every block from the first epoch (no curriculum)",
    )
    p.add_argument("--penalty", type=float, default=-1, help="reward of a wrong prediction (gamma)")
    utils.add_policy_training_flags(p)
    utils.add_run_flags(
        p,
        "continue the run in --cv_dir from its last.t7 (written after every epoch): agent, optimizer, "
        "learning rate, curriculum and random state, so that it ends as an uninterrupted run would; "
        "starts a new run when there is none",
    )
    return p


def train_epoch(args, rnet, agent, loader, optimizer, device, decided, epoch=0):
    """One epoch of REINFORCE on the agent (paper, Eq. 6-8, with the curriculum mask).

    ``agent`` may be wrapped in DistributedDataParallel; ``rnet`` is frozen. Returns the epoch's
    statistics over every process, and its sampled policies (N, K) in dataset order.
    """
    agent.train()
    rnet.eval()
    loader.sampler.set_epoch(epoch)
    generator = utils.epoch_generator(args.seed, epoch, device)
    mask = utils.curriculum_mask(rnet.num_blocks, decided, device)  # (K,)
    processes = distributed.world_size()
    indices, policies, rewards, matches = [], [], [], []
    for inputs, targets, index, batch_size in utils.global_batches(loader, "train"):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        with utils.autocast(device, args.amp):
            probs, _ = agent(inputs)  # (B, K)
        utils.check_finite(probs, "policy network's output")
        policy_map, policy, distr = utils.sample_policy(probs.float(), args.alpha, generator, batch_size)
        # Curriculum: the first K - decided blocks always run and take no part in the loss.
        policy_map[:, ~mask] = 1.0
        policy[:, ~mask] = 1.0

        with torch.inference_mode(), utils.autocast(device, args.amp):  # the ResNet is frozen
            if args.dense:  # the original's computation: every kept block on every image, masked
                preds_map, preds_sample = rnet(inputs, policy_map, masked=True), rnet(inputs, policy, masked=True)
            elif inputs.is_cuda:  # one pass over both policies: half the kernel launches
                both = rnet(torch.cat([inputs, inputs]), torch.cat([policy_map, policy]))
                preds_map, preds_sample = both.split(inputs.shape[0])
            else:  # on CPU two passes are faster (cache): R110, 256 images, 0.68 s against 0.82 s
                preds_map, preds_sample = rnet(inputs, policy_map), rnet(inputs, policy)
        reward_map, _ = utils.get_reward(preds_map, targets, policy_map, args.penalty)
        reward_sample, match = utils.get_reward(preds_sample, targets, policy, args.penalty)
        advantage = reward_sample - reward_map  # (B,) self-critical baseline

        loss = -distr.log_prob(policy) * advantage[:, None] * mask  # (B, K)
        # One-sided entropy term of the original (not the full Bernoulli entropy).
        bounded = distr.probs.clamp(1e-15, 1 - 1e-15)
        entropy = (-bounded * torch.log(bounded)).sum()
        # The batch mean: DDP averages the processes' gradients, hence the factor.
        loss = (loss.sum() - args.beta * entropy) * processes / batch_size
        utils.check_finite(loss, "loss")

        optimizer.zero_grad(set_to_none=False)  # zeroed, not None, as PyTorch 0.3 did
        loss.backward()
        optimizer.step()

        indices.append(index)
        policies.append(policy.cpu())
        rewards.append(reward_sample.cpu())
        matches.append(match.cpu())
    policies, rewards, matches = distributed.collect(indices, policies, rewards, matches)
    return utils.performance_stats(policies, rewards, matches), policies


def main(args):
    device = utils.setup_run(args)
    main_process = distributed.is_main()
    resume = utils.load_resume(args, args.cv_dir)
    with distributed.node_main_first():  # downloads once per node
        # --load gives the agent and the epoch only, as in the original (also from a finetuning
        # checkpoint); the frozen ResNet is always the base model, checked again on --resume.
        rnet, agent, ckpt = utils.models_for_run(args.model, args.load, args.dummy, load_resnet=False)
        trainset, testset = utils.get_data(args)
    resnet_digest = utils.state_digest(rnet)
    first_epoch = ckpt.get("epoch", -1) + 1
    start_epoch = first_epoch
    if resume:
        if resume.get("resnet_digest") != resnet_digest:
            raise utils.UserError(
                f"cannot resume {args.cv_dir}: the frozen ResNet is not the one the run started with "
                "(its base model file changed, or --load differs)"
            )
        utils.load_agent_state(agent, resume, args.cv_dir, rnet.num_blocks)
        first_epoch, start_epoch = int(resume["first_epoch"]), resume["epoch"] + 1
    trainloader = utils.make_loader(trainset, args.batch_size, True, args.workers, device, args.seed)
    testloader = utils.make_loader(testset, args.batch_size, False, args.workers, device)

    rnet.to(device).eval()
    for p in rnet.parameters():
        p.requires_grad_(False)
    agent.vnet.requires_grad_(False)  # the value head takes no part in the loss
    agent = distributed.prepare(agent).to(device)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.wd)
    if resume:
        optimizer.load_state_dict(resume["optimizer"])
    trained = distributed.wrap(agent, device)

    writer = utils.open_run_log(args.cv_dir, args, start_epoch if resume else None)
    num_blocks = rnet.num_blocks
    last_epoch = first_epoch + args.max_epochs
    if resume:
        utils.set_rng_state(resume["rng"])  # as it was when the interrupted run saved it
    for epoch in range(start_epoch, last_epoch + 1):
        utils.adjust_learning_rate(optimizer, args.lr, epoch, args.epoch_step, args.lr_decay_ratio)
        decided = utils.curriculum_blocks(epoch, num_blocks, args.cl_step)
        if main_process:
            print(f"training the last {decided} blocks ...", flush=True)
        stats, policies = train_epoch(args, rnet, trained, trainloader, optimizer, device, decided, epoch)
        utils.report(writer, "train", stats, policies, epoch)
        utils.check_finite_weights(agent)
        if epoch % args.eval_every == 0 or epoch == last_epoch:  # the last epoch is never lost
            results = utils.evaluate(
                rnet, agent, testloader, device, args.penalty, decided, dense=args.dense, amp=args.amp
            )
            stats = utils.performance_stats(*results)
            utils.report(writer, "test", stats, results[0], epoch)
            if main_process:
                state = {"agent": agent.state_dict(), "epoch": epoch, "reward": stats[1], "acc": stats[0]}
                utils.save_checkpoint(state, utils.checkpoint_path(args.cv_dir, epoch, stats))
        if main_process:  # after the checkpoint: a run killed in between repeats this epoch, identically
            state = {
                "agent": agent.state_dict(),
                "optimizer": optimizer.state_dict(),
                "epoch": epoch,
                "first_epoch": first_epoch,
                "resnet_digest": resnet_digest,
            }
            utils.save_resume(args.cv_dir, args, state)
    if writer is not None:
        writer.close()
    distributed.cleanup()


if __name__ == "__main__":
    utils.run(main, get_args_parser())
