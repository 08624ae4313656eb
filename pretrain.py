"""Train the base ResNet of a CIFAR-style model or of image folders (SGD with momentum, cosine or step schedule).

    python pretrain.py --model R110_C10 --epochs 164

The result, cv/pretrained/<MODEL>/pk_E_<epoch>_A_<acc>.t7, is where get_model finds it.
"""

import math
from pathlib import Path

import torch
import torch.nn.functional as F

import utils
from core import distributed


def get_args_parser():
    p = utils.make_parser("Train the base ResNet that BlockDrop starts from.")
    p.add_argument("--epochs", type=utils.positive_int, default=164, help="total training epochs")
    p.add_argument("--batch_size", type=utils.batch_size, default=128, help="batch size")
    p.add_argument("--lr", type=utils.positive_float, default=0.1, help="peak learning rate")
    p.add_argument("--momentum", type=utils.non_negative_float, default=0.9, help="SGD momentum")
    p.add_argument("--wd", type=utils.non_negative_float, default=5e-4, help="weight decay")
    p.add_argument(
        "--schedule",
        choices=["cosine", "step"],
        default="cosine",
        help="cosine: warm-up then cosine decay per step; step: x0.1 at 50%% and 75%% of the epochs",
    )
    p.add_argument("--warmup", type=utils.non_negative_float, default=0.5, help="warm-up epochs (cosine schedule)")
    p.add_argument(
        "--drop_rate",
        type=utils.drop_probability,
        default=0.0,
        help="stochastic depth: each training image skips each block with this probability, "
        "so that the base network tolerates dropped blocks (0: off)",
    )
    for name, what in (("mean", "means"), ("std", "standard deviations")):
        p.add_argument(
            f"--{name}",
            type=utils.finite_float,
            nargs=3,
            metavar=("R", "G", "B"),
            default=None,
            help=f"image folders: the per-channel {what} that normalise the inputs, recorded with the "
            "model (default: computed from the training images once)",
        )
    utils.add_amp_flag(p)
    p.add_argument("--cv_dir", type=utils.path, default=None, help="output folder (default: cv/pretrained/<MODEL>/)")
    p.add_argument(
        "--load",
        type=utils.path,
        default=None,
        help="checkpoint to start from: a pk_E file of an unfinished run of this script continues that run, "
        "other files (a finished run's, a released one) give initial weights",
    )
    utils.add_run_flags(
        p,
        "continue the run in the output folder from its last.t7 (written after every epoch): weights, "
        "optimizer, schedule and random state, so that it ends as an uninterrupted run would; starts a new "
        "run when there is none",
    )
    return p


def lr_factor(args, steps_per_epoch: int):
    """Learning-rate multiplier as a function of the optimizer step."""
    total = args.epochs * steps_per_epoch
    warmup = int(args.warmup * steps_per_epoch)

    def factor(step: int) -> float:
        if args.schedule == "step":
            epoch = step // steps_per_epoch
            return 0.1 ** sum(epoch >= m * args.epochs for m in (0.5, 0.75))
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))

    return factor


@torch.no_grad()
def test_accuracy(rnet, loader, device) -> float:
    """Accuracy of the full network over the loader (every process's share)."""
    rnet.eval()
    indices, matches = [], []
    for inputs, targets, index in utils.progress(loader, "test"):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        matches.append((rnet.forward_full(inputs).argmax(1) == targets).float().cpu())
        indices.append(index)
    (matches,) = distributed.collect(indices, matches)
    return matches.mean().item()


def main(args):
    spec = utils.model_spec(args.model)
    if spec.dataset == "ImgNet":
        raise utils.UserError(f"{args.model}: ImageNet models use the released or torchvision's weights")
    if (args.mean or args.std) and spec.dataset != "Folder":
        raise utils.UserError(f"--mean and --std apply to image folders (R<depth>_Folder), not {args.model}")
    cv_dir = args.cv_dir or f"cv/pretrained/{args.model}/"
    rt = utils.setup_run(args)
    device = rt.device
    run = utils.TrainingRun(args, cv_dir)
    ckpt = run.resumed or (utils.load_file(args.load) if args.load else {})
    # image folders: the classes and normalisation of the run (or of --load's), else of the images
    folder = utils.folder_data(args, ckpt, new=True)
    rnet, _ = utils.build_model(args.model, folder and len(folder.classes))
    if ckpt:
        utils.check_model(ckpt, args.load, args.model)  # a file of another model, even of the same shapes
        utils.load_weights_to_flatresnet(ckpt, rnet, name=args.load or "last.t7")
    with distributed.node_main_first():  # downloads once per node
        trainset, testset = utils.get_data(args, folder)
    trainloader = utils.make_loader(trainset, args.batch_size, True, args.workers, device, args.seed)
    testloader = utils.make_loader(testset, 256, False, args.workers, device)

    rnet = distributed.prepare(rnet).to(device)
    optimizer = torch.optim.SGD(
        rnet.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd, nesterov=True
    )
    steps_per_epoch = -(-len(trainset) // args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args, steps_per_epoch))
    first_epoch = 1
    if "optimizer" in ckpt:  # last.t7 or a pk_E file: continue; other files only give initial weights
        source = run.resume_path if run.resumed else args.load
        utils.restore(optimizer, ckpt["optimizer"], source, "optimizer")
        utils.restore(scheduler, ckpt.get("scheduler"), source, "learning-rate schedule")
        first_epoch = int(ckpt["epoch"]) + 1
    trained = distributed.wrap(rnet, device)

    # The base-model file this run wrote last, deleted when a newer one is written; never a --load file.
    previous = Path(cv_dir) / run.resumed["checkpoint"] if run.resumed else None
    for epoch in run.epochs(run.first_epoch(first_epoch), args.epochs):  # epoch n makes pk_E_<n>: from 1
        trained.train()
        trainloader.sampler.set_epoch(epoch)
        generator = utils.epoch_generator(args.seed, epoch, device)
        loss_sum = correct = 0.0
        for inputs, targets, _, batch_size in utils.global_batches(trainloader, f"epoch {epoch}"):
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if args.drop_rate > 0:
                keep = distributed.uniform(generator, batch_size, rnet.num_blocks) >= args.drop_rate  # (B, K)
            else:
                keep = torch.ones(len(inputs), rnet.num_blocks, device=device, dtype=torch.bool)
            with rt.autocast():
                logits = trained(inputs, keep.float())
            logits = logits.float()
            utils.check_finite(logits, "ResNet's output", utils.DIVERGED)
            # The batch mean: DDP averages the processes' gradients, hence the factor.
            loss_total = F.cross_entropy(logits, targets, reduction="sum")
            loss = loss_total * distributed.world_size() / batch_size
            utils.check_finite(loss, "loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss_total.item()
            correct += (logits.argmax(1) == targets).sum().item()
        loss_sum, correct = distributed.sum_over_processes([loss_sum, correct], device)
        acc = test_accuracy(rnet, testloader, device)
        utils.check_finite_weights(rnet)
        seen = len(trainset)
        if run.is_main:
            print(f"E: {epoch} | loss: {loss_sum / seen:.4f} | A: {correct / seen:.3f} | TS - A: {acc:.3f}", flush=True)
        run.log_scalars(epoch, train_loss=loss_sum / seen, train_accuracy=correct / seen, test_accuracy=acc)
        state = {"state_dict": rnet.state_dict(), "epoch": epoch, "acc": acc, "model": args.model}
        if folder:
            state[utils.FOLDER_KEY] = folder.state()
        training = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}
        path = Path(cv_dir) / f"pk_E_{epoch}_A_{acc:.3f}.t7"
        if run.is_main:
            # The run's last file is the base model alone (weights and numbers); earlier ones also hold
            # the optimizer and the schedule, so that --load can continue the run from them.
            utils.save_checkpoint(state if epoch == args.epochs else {**state, **training}, path)
            # Keep only the newest file of this run, so get_model finds one unambiguous base model.
            if previous is not None and previous != path and previous.is_file():
                previous.unlink()
        previous = path
        run.end_epoch(epoch, {**state, **training, "checkpoint": path.name})
    run.close()


if __name__ == "__main__":
    utils.run(main, get_args_parser())
