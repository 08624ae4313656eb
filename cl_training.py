"""Curriculum learning of the BlockDrop policy network on a frozen, pretrained ResNet.

    python cl_training.py --model R110_C10 --cv_dir cv/R110_C10_cl/ --lr 1e-3 --batch_size 2048 --max_epochs 5000

At epoch e the agent decides only the last min(e + 1, K) blocks, the others always run (with
--cl_step below K, the default 1); with --cl_step K or more it decides every block from the start.
"""

import torch

import utils
from core import distributed


def get_args_parser():
    p = utils.make_parser("Curriculum learning of the policy network (ResNet frozen).")
    p.add_argument("--lr", type=utils.positive_float, default=1e-3, help="learning rate")
    p.add_argument("--beta", type=utils.finite_float, default=1e-1, help="entropy bonus weight")
    p.add_argument("--wd", type=utils.non_negative_float, default=0.0, help="weight decay")
    p.add_argument("--load", type=utils.path, default=None, help="checkpoint to resume from (agent and epoch)")
    utils.add_schedule_flags(p, epoch_step=10000, max_epochs=10000)
    p.add_argument(
        "--cl_step",
        type=int,
        default=1,
        help="curriculum switch, as in the original: below the number of blocks K, the agent decides the last "
        "min(epoch + 1, K) blocks at each epoch; K or more: every block from the first epoch (no curriculum)",
    )
    p.add_argument("--penalty", type=utils.finite_float, default=-1, help="reward of a wrong prediction (gamma)")
    utils.add_policy_training_flags(p)
    utils.add_run_flags(
        p,
        "continue the run in --cv_dir from its last.t7 (written after every epoch): agent, optimizer, "
        "learning rate, curriculum and random state, so that it ends as an uninterrupted run would; "
        "starts a new run when there is none",
    )
    return p


def train_epoch(args, rnet, agent, loader, optimizer, rt, decided, epoch=0):
    """One epoch of REINFORCE on the agent (paper, Eq. 6-8, with the curriculum mask).

    ``agent`` may be wrapped in DistributedDataParallel; ``rnet`` is frozen. Returns the epoch's
    statistics over every process, and its sampled policies (N, K) in dataset order.
    """
    agent.train()
    rnet.eval()
    mask = utils.curriculum_mask(rnet.num_blocks, decided, rt.device)  # (K,)
    processes = distributed.world_size()
    epoch_policies = utils.EpochPolicies()
    batches = utils.sampled_batches(agent, loader, rt, args.alpha, args.seed, epoch)
    for inputs, targets, index, batch_size, policy_map, policy, distr in batches:
        # Curriculum: the first K - decided blocks always run and take no part in the loss.
        policy_map[:, ~mask] = 1.0
        policy[:, ~mask] = 1.0

        with torch.inference_mode(), rt.autocast():  # the ResNet is frozen
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

        log_prob = distr.log_prob(policy)
        utils.check_finite(log_prob, "log-probability of the sampled policies", utils.SATURATED)
        loss = -log_prob * advantage[:, None] * mask  # (B, K)
        # One-sided entropy term of the original (not the full Bernoulli entropy).
        bounded = distr.probs.clamp(1e-15, 1 - 1e-15)
        entropy = (-bounded * torch.log(bounded)).sum()
        # The batch mean: DDP averages the processes' gradients, hence the factor.
        loss = (loss.sum() - args.beta * entropy) * processes / batch_size
        utils.check_finite(loss, "loss")

        optimizer.zero_grad(set_to_none=False)  # zeroed, not None, as PyTorch 0.3 did
        loss.backward()
        optimizer.step()

        epoch_policies.add(index, policy, reward_sample, match)
    return epoch_policies.stats()


def main(args):
    rt = utils.setup_run(args)
    run = utils.TrainingRun(args, args.cv_dir)
    with distributed.node_main_first():  # downloads once per node
        # --load gives the agent and the epoch only, as in the original (also from a finetuning
        # checkpoint); the frozen ResNet is always the base model, checked again on --resume.
        folder = utils.folder_data(args)  # image folders: the base model's classes and normalisation
        rnet, agent, ckpt = utils.models_for_run(
            args.model, args.load, args.dummy, load_resnet=False, num_classes=folder and len(folder.classes)
        )
        trainset, testset = utils.get_data(args, folder)
    if folder:
        run.extra[utils.FOLDER_KEY] = folder.state()
    resnet_digest = utils.state_digest(rnet)
    if run.resumed:
        if run.resumed.get("resnet_digest") != resnet_digest:
            raise utils.UserError(
                f"cannot resume {args.cv_dir}: the frozen ResNet is not the one the run started with "
                "(its base model file changed, or --load differs)"
            )
        utils.load_agent_state(agent, run.resumed, args.cv_dir, rnet.num_blocks)
    trainloader = utils.make_loader(trainset, args.batch_size, True, args.workers, rt.device, args.seed)
    testloader = utils.make_loader(testset, args.batch_size, False, args.workers, rt.device)

    rnet.to(rt.device).eval()
    for p in rnet.parameters():
        p.requires_grad_(False)
    agent.vnet.requires_grad_(False)  # the value head takes no part in the loss
    agent = distributed.prepare(agent).to(rt.device)
    optimizer = torch.optim.Adam([p for p in agent.parameters() if p.requires_grad], lr=args.lr, weight_decay=args.wd)
    if run.resumed:
        utils.restore(optimizer, run.resumed["optimizer"], run.resume_path, "optimizer")
    trained = distributed.wrap(agent, rt.device)

    first_epoch = run.first_epoch(ckpt.get("epoch", -1) + 1)  # after --load's epoch, as the original
    for epoch in run.epochs(first_epoch, first_epoch + args.max_epochs):
        utils.adjust_learning_rate(optimizer, args.lr, epoch, args.epoch_step, args.lr_decay_ratio)
        decided = utils.curriculum_blocks(epoch, rnet.num_blocks, args.cl_step)
        if run.is_main:
            print(f"training the last {decided} blocks ...", flush=True)
        stats, policies = train_epoch(args, rnet, trained, trainloader, optimizer, rt, decided, epoch)
        run.report("train", stats, policies, epoch)
        utils.check_finite_weights(agent)
        if run.evaluates(epoch):
            results = utils.evaluate(rnet, agent, testloader, rt, args.penalty, decided, dense=args.dense)
            run.save_evaluation(epoch, results, {"agent": agent.state_dict()})
        state = {"agent": agent.state_dict(), "optimizer": optimizer.state_dict(), "resnet_digest": resnet_digest}
        run.end_epoch(epoch, state)
    run.close()


if __name__ == "__main__":
    utils.run(main, get_args_parser())
