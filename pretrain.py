"""Train the base ResNet of a CIFAR-style model (SGD with momentum, cosine or step schedule).

    python pretrain.py --model R110_C10 --epochs 164

The result, cv/pretrained/<MODEL>/pk_E_<epoch>_A_<acc>.t7, is where get_model finds it.
"""

import math

import torch
import torch.nn.functional as F
from tensorboardX import SummaryWriter
from tqdm import tqdm

import utils


def get_args_parser():
    p = utils.make_parser("Train the base ResNet that BlockDrop starts from.")
    p.add_argument("--epochs", type=utils.positive_int, default=164, help="total training epochs")
    p.add_argument("--batch_size", type=utils.positive_int, default=128, help="batch size")
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
    p.add_argument("--cv_dir", default=None, help="output folder (default: cv/pretrained/<MODEL>/)")
    p.add_argument("--load", default=None, help="pretraining checkpoint to resume from")
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
    rnet.eval()
    correct = total = 0
    for inputs, targets in tqdm(loader, desc="test", leave=False, dynamic_ncols=True):
        inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
        correct += (rnet.forward_full(inputs).argmax(1) == targets).sum().item()
        total += len(targets)
    return correct / total


def main(args):
    spec = utils.model_spec(args.model)
    if spec.imagenet:
        raise utils.UserError(
            f"{args.model}: pretrain.py trains CIFAR-style models; ImageNet models use torchvision's weights"
        )
    cv_dir = args.cv_dir or f"cv/pretrained/{args.model}/"
    device = utils.get_device(args.device)
    utils.set_seed(args.seed)
    rnet, _ = utils.build_model(args.model)
    ckpt = utils.load_file(args.load) if args.load else {}
    if ckpt:
        utils.load_weights_to_flatresnet(ckpt, rnet)
    trainset, testset = utils.get_data(args)
    trainloader = utils.make_loader(trainset, args.batch_size, True, args.workers, device)
    testloader = utils.make_loader(testset, 256, False, args.workers, device)

    rnet.to(device)
    optimizer = torch.optim.SGD(
        rnet.parameters(), lr=args.lr, momentum=args.momentum, weight_decay=args.wd, nesterov=True
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(args, len(trainloader)))
    start_epoch = 0
    if "optimizer" in ckpt:  # a pretrain.py file: resume; other files only give initial weights
        optimizer.load_state_dict(ckpt["optimizer"])
        scheduler.load_state_dict(ckpt["scheduler"])
        start_epoch = int(ckpt["epoch"])

    utils.write_run_info(cv_dir, args)
    writer = SummaryWriter(f"{cv_dir.rstrip('/')}/log")
    previous = None  # the file this run wrote last; never the --load file
    for epoch in range(start_epoch + 1, args.epochs + 1):
        rnet.train()
        loss_sum = correct = seen = 0
        for inputs, targets in tqdm(trainloader, desc=f"epoch {epoch}", leave=False, dynamic_ncols=True):
            inputs, targets = inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
            if args.drop_rate > 0:
                keep = torch.rand(len(inputs), rnet.num_blocks, device=device) >= args.drop_rate  # (B, K)
                logits = rnet(inputs, keep.float())
            else:
                logits = rnet.forward_full(inputs)
            loss = F.cross_entropy(logits, targets)
            utils.check_finite(loss, "loss")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(targets)
            correct += (logits.argmax(1) == targets).sum().item()
            seen += len(targets)
        acc = test_accuracy(rnet, testloader, device)
        print(f"E: {epoch} | loss: {loss_sum / seen:.4f} | A: {correct / seen:.3f} | TS - A: {acc:.3f}", flush=True)
        writer.add_scalar("train_loss", loss_sum / seen, epoch)
        writer.add_scalar("train_accuracy", correct / seen, epoch)
        writer.add_scalar("test_accuracy", acc, epoch)
        state = {
            "state_dict": rnet.state_dict(),
            "epoch": epoch,
            "acc": acc,
            "model": args.model,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
        }
        path = utils.Path(cv_dir) / f"pk_E_{epoch}_A_{acc:.3f}.t7"
        utils.save_checkpoint(state, path)
        # Keep only the newest file of this run, so get_model finds one unambiguous base model.
        if previous is not None and previous != path and previous.is_file():
            previous.unlink()
        previous = path
    writer.close()


if __name__ == "__main__":
    utils.run(main, get_args_parser())
