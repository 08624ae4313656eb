"""Wall-clock speed of BlockDrop against the full ResNet, beside the FLOPs ratio.

    python benchmark.py --model R110_C10 --keep_rate 0.333 --batch_sizes 1 256     # synthetic policies
    python benchmark.py --model R101_ImgNet --keep_rate 0.75 --batch_sizes 1 32
    python benchmark.py --model R110_C10 --load <checkpoint> --dummy 256           # a checkpoint's agent
    python benchmark.py --model R110_C10 --training --dummy 1024                   # training epochs

Inference: for each batch size, the same images go through the full network (``forward_full``)
and through BlockDrop (``forward`` under each image's policy; with ``--load`` the policy network
runs too and is timed and counted), after warm-up, alternating, ``--repeats`` times; the median
time gives images/second. Both run in this process, with the same threads, precision and memory
format. ``--masked`` adds the original's masked form. The FLOPs ratio is full FLOPs over mean
BlockDrop FLOPs per image; a speed-up equal to it is the ideal.

Training (``--training``): images/second of one curriculum-learning epoch (the agent deciding
every block) and one finetuning epoch on the model, with the sparse forward and with the
original's masked one, through the scripts' own ``train_epoch``. Curriculum learning runs sparse
by default (``--dense``: masked, the same numbers); finetuning runs masked by default, as the
original (``--sparse``: sparse, other BatchNorm statistics).
"""

import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import cl_training
import finetune
import utils


def get_args_parser():
    p = utils.make_parser("Measure BlockDrop's wall-clock speed-up against the full ResNet.")
    p.add_argument(
        "--load",
        type=utils.path,
        default=None,
        help="BlockDrop checkpoint whose agent chooses the policies (timed too)",
    )
    p.add_argument(
        "--keep_rate",
        type=utils.fraction,
        default=None,
        help="synthetic policies: keep each block with this probability (default 1/3; not with --load)",
    )
    p.add_argument(
        "--batch_sizes", type=utils.batch_size, nargs="+", default=None, help="default: 1 256 (ImageNet: 1 32)"
    )
    p.add_argument(
        "--images", type=utils.batch_size, default=None, help="images per timed run (default: largest batch)"
    )
    p.add_argument("--repeats", type=utils.positive_int, default=5, help="timed runs; the median is reported")
    p.add_argument("--warmup", type=utils.non_negative_int, default=1, help="untimed runs first")
    p.add_argument("--threads", type=utils.positive_int, default=None, help="CPU threads (default: PyTorch's)")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32", help="autocast precision")
    p.add_argument(
        "--channels_last",
        action="store_true",
        help="channels-last memory format (BlockDrop's gathered rows are contiguous copies: it pays for conversions)",
    )
    p.add_argument("--masked", action="store_true", help="also time the original's masked form")
    p.add_argument("--training", action="store_true", help="time training epochs instead (sparse vs masked forward)")
    p.add_argument("--batch_size", type=utils.batch_size, default=256, help="--training: batch size")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    return p


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}  # autocast's dtype


def time_alternating(fns: dict, device: torch.device, args) -> dict[str, float]:
    """Median seconds of each function; runs alternate so that drifts in clock speed hit all alike."""
    times = {name: [] for name in fns}
    for i in range(args.warmup + args.repeats):
        for name, fn in fns.items():
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            if i >= args.warmup:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def inference_inputs(args, spec, device, folder):
    """Images (N, C, H, W) and, for synthetic policies, the policies (N, K)."""
    n = args.images or max(args.batch_sizes)
    # the images, and about ten batches of the widest activations (64 channels at the input's size)
    widest = max(args.batch_sizes) * 64 * spec.input_size[1] * spec.input_size[2] * 4 * 10
    utils.check_fits(
        n * math.prod(spec.input_size) * 4 + widest, f"--images {n} and --batch_sizes {max(args.batch_sizes)}"
    )
    if args.load:
        _, testset = utils.get_data(args, folder)
        if len(testset) < n:
            raise utils.UserError(f"--images {n}: the test set has only {len(testset)} images")
        images = torch.stack([testset[i][0] for i in range(n)])
        return images.to(device), None
    g = torch.Generator().manual_seed(args.seed)
    images = torch.randn(n, *spec.input_size, generator=g)
    policies = (torch.rand(n, spec.num_blocks, generator=g) < args.keep_rate).float()
    return images.to(device), policies.to(device)


def benchmark_inference(args, rt) -> dict:
    device = rt.device
    spec = utils.model_spec(args.model)
    folder = utils.folder_data(args, args.load) if args.load else None  # image folders: classes, normalisation
    if args.load:
        classes = folder and len(folder.classes)
        rnet, agent, _ = utils.models_for_run(
            args.model, args.load, bool(args.dummy), init_agent=False, num_classes=classes
        )
    else:
        rnet, agent = utils.build_model(args.model, spec.num_classes or 10)  # the weights do not change the time
    rnet.to(device).eval()
    agent.to(device).eval()
    memory = torch.channels_last if args.channels_last else torch.contiguous_format
    rnet.to(memory_format=memory)
    agent.to(memory_format=memory)
    # ImageNet-style models: torchvision's ResNet with the same weights, the full network users would run
    twin = utils.torchvision_twin(rnet, args.model).eval().to(memory_format=memory) if spec.imagenet else None
    images, policies = inference_inputs(args, spec, device, folder)
    images = images.contiguous(memory_format=memory)
    with torch.inference_mode(), rt.autocast():
        if policies is None:
            policies = torch.cat([utils.greedy_policy(agent, x) for x in images.split(max(args.batch_sizes))])

    base, per_block = utils.block_flops(rnet, spec.input_size)
    per_block = per_block.to(policies.device)
    extra = utils.policy_flops(agent, spec.input_size) if args.load else 0
    flops_full = base + per_block.sum().item()
    flops_blockdrop = (extra + base + policies.double() @ per_block.double()).mean().item()

    def blockdrop(x, p):
        if args.load:
            p = utils.greedy_policy(agent, x)
        return rnet(x, p)

    rows = []
    for batch in args.batch_sizes:
        chunks = list(zip(images.split(batch), policies.split(batch), strict=True))
        fns = {
            "full": lambda c=chunks: [rnet.forward_full(x) for x, _ in c],
            "blockdrop": lambda c=chunks: [blockdrop(x, p) for x, p in c],
        }
        if args.masked:
            fns["masked"] = lambda c=chunks: [rnet.forward_masked(x, p) for x, p in c]
        if twin is not None:
            fns["torchvision"] = lambda c=chunks: [twin(x) for x, _ in c]
        with torch.inference_mode(), rt.autocast():
            seconds = time_alternating(fns, device, args)
        n = images.shape[0]
        row = {"batch_size": batch, "images": n}
        row.update({f"{name}_images_per_s": n / s for name, s in seconds.items()})
        row["flops_ratio"] = flops_full / flops_blockdrop
        row["speedup"] = seconds["full"] / seconds["blockdrop"]
        row["speedup_over_flops_ratio"] = row["speedup"] / row["flops_ratio"]
        if args.masked:
            row["masked_speedup"] = seconds["full"] / seconds["masked"]
        if twin is not None:
            row["full_over_torchvision"] = seconds["torchvision"] / seconds["full"]  # the full network's parity
            row["speedup_over_torchvision"] = seconds["torchvision"] / seconds["blockdrop"]
            row["speedup_over_torchvision_over_flops_ratio"] = row["speedup_over_torchvision"] / row["flops_ratio"]
        rows.append(row)
    source = (
        f"greedy policies of {args.load}"
        if args.load
        else f"synthetic policies, each block kept with probability {args.keep_rate:.3g}"
    )
    return {
        "model": args.model,
        "policies": source,
        "blocks_per_image": policies.sum(1).mean().item(),
        "num_blocks": spec.num_blocks,
        "unique_policies": torch.unique(policies, dim=0).shape[0],
        "flops_full": flops_full,
        "flops_blockdrop": flops_blockdrop,
        "results": rows,
    }


def keep_about(agent, rate: float, images: torch.Tensor, seed: int) -> None:
    """Set the agent's logits so that its greedy policy keeps about ``rate`` of the blocks.

    Per block, the logit over ``images`` is standardised and centred at +2.5 (kept) or -2.5
    (dropped): about 0.6% of the decisions per image differ from the common policy, so a batch
    has a few dozen distinct greedy policies, as a trained agent has.
    """
    k = agent.logit.bias.shape[0]
    g = torch.Generator().manual_seed(seed)
    kept = torch.randperm(k, generator=g)[: round(rate * k)]
    target = torch.full((k,), -2.5)
    target[kept] = 2.5
    with torch.no_grad():
        logits = agent.logit(agent.features.forward_full(agent.prepare(images)))  # (N, K)
        mean, std = logits.mean(0), logits.std(0).clamp_min(1e-6)
        agent.logit.weight.div_(std[:, None])
        agent.logit.bias.copy_((agent.logit.bias - mean) / std + target)


def benchmark_training(args, rt) -> dict:
    device = rt.device
    if args.dummy == 0:
        raise utils.UserError("--training runs on fake data: give --dummy N (e.g. --dummy 1024)")
    trainset, _ = utils.get_data(args)
    loader = utils.make_loader(trainset, args.batch_size, True, args.workers, device)
    rows = []
    for stage in ("curriculum", "finetune"):
        row = {"stage": stage, "images": len(trainset), "batch_size": args.batch_size}
        for form in ("sparse", "masked"):
            torch.manual_seed(args.seed)
            rnet, agent = utils.build_model(args.model, utils.model_spec(args.model).num_classes or 10)
            keep_about(
                agent, args.keep_rate, torch.stack([trainset[i][0] for i in range(min(256, len(trainset)))]), args.seed
            )
            rnet.to(device)
            agent.to(device)
            # The scripts' defaults: curriculum learning runs its frozen ResNet sparse (--dense: masked),
            # finetuning trains in the original's masked form (--sparse: sparse). Their own parsers give
            # every other flag its default.
            flags = ["--model", args.model, "--seed", str(args.seed)]
            if stage == "curriculum":
                ns = cl_training.get_args_parser().parse_args(flags + (["--dense"] if form == "masked" else []))
                for p in rnet.parameters():
                    p.requires_grad_(False)
                optimizer = torch.optim.Adam(agent.parameters(), lr=ns.lr)

                def epoch(rnet=rnet, agent=agent, optimizer=optimizer, ns=ns):
                    return cl_training.train_epoch(ns, rnet, agent, loader, optimizer, rt, rnet.num_blocks)
            else:
                ns = finetune.get_args_parser().parse_args(flags + (["--sparse"] if form == "sparse" else []))
                optimizer = torch.optim.Adam([*agent.parameters(), *rnet.parameters()], lr=ns.lr)

                def epoch(rnet=rnet, agent=agent, optimizer=optimizer, ns=ns):
                    return finetune.train_epoch(ns, rnet, agent, loader, optimizer, rt)

            seconds = time_alternating({"epoch": epoch}, device, args)["epoch"]
            stats, _ = epoch()
            row[form] = {"images_per_s": len(trainset) / seconds, "blocks_per_image": stats.blocks_mean}
        row["speedup"] = row["sparse"]["images_per_s"] / row["masked"]["images_per_s"]
        rows.append(row)
    return {"model": args.model, "keep_rate": args.keep_rate, "results": rows}


def print_table(info: dict, training: bool) -> None:
    print(
        f"{info['model']} on {info['device']} ({info['device_name']}, {info['threads']} threads), "
        f"{info['precision']}{', channels-last' if info['channels_last'] else ''}, torch {info['torch']}, "
        f"median of {info['repeats']} runs"
    )
    if training:
        print(f"agent biased to keep about {info['keep_rate']:.3f} of the blocks (greedy)")
        print(
            f"{'stage':>10} {'batch':>6} {'sparse img/s':>13} {'masked img/s':>13} {'speed-up':>9} {'sampled blocks/img':>19}"
        )
        for r in info["results"]:
            print(
                f"{r['stage']:>10} {r['batch_size']:>6} {r['sparse']['images_per_s']:>13.1f} "
                f"{r['masked']['images_per_s']:>13.1f} {r['speedup']:>9.2f} {r['sparse']['blocks_per_image']:>19.1f}"
            )
        return
    print(
        f"{info['policies']}: {info['blocks_per_image']:.1f} of {info['num_blocks']} blocks per image, "
        f"{info['unique_policies']} distinct policies; FLOPs/img full {info['flops_full']:.3E}, "
        f"BlockDrop {info['flops_blockdrop']:.3E}"
    )
    masked = "masked_images_per_s" in info["results"][0]
    twin = "torchvision_images_per_s" in info["results"][0]
    header = f"{'batch':>6} {'images':>7} {'full img/s':>11} {'BlockDrop img/s':>16}"
    header += f" {'masked img/s':>13}" if masked else ""
    header += f" {'torchvision img/s':>18}" if twin else ""
    header += f" {'FLOPs ratio':>12} {'speed-up':>9} {'speed-up/FLOPs ratio':>21}"
    print(header + (f" {'full/torchvision':>17} {'speed-up vs torchvision':>24} {'/FLOPs ratio':>13}" if twin else ""))
    for r in info["results"]:
        line = f"{r['batch_size']:>6} {r['images']:>7} {r['full_images_per_s']:>11.1f} {r['blockdrop_images_per_s']:>16.1f}"
        line += f" {r['masked_images_per_s']:>13.1f}" if masked else ""
        line += f" {r['torchvision_images_per_s']:>18.1f}" if twin else ""
        line += f" {r['flops_ratio']:>12.2f} {r['speedup']:>9.2f} {r['speedup_over_flops_ratio']:>21.2f}"
        if twin:
            line += (
                f" {r['full_over_torchvision']:>17.2f} {r['speedup_over_torchvision']:>24.2f}"
                f" {r['speedup_over_torchvision_over_flops_ratio']:>13.2f}"
            )
        print(line)


def main(args):
    rt = utils.Runtime(utils.get_device(args.device), PRECISIONS[args.precision])
    device = rt.device
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.precision == "fp16" and device.type != "cuda":
        raise utils.UserError("--precision fp16 needs CUDA; use bf16 on the CPU")
    if args.load and args.keep_rate is not None:
        raise utils.UserError("--keep_rate makes synthetic policies; with --load the checkpoint's agent chooses them")
    if args.keep_rate is None:
        args.keep_rate = 1 / 3
    spec = utils.model_spec(args.model)
    if args.training:
        unused = [
            flag
            for flag, on in (
                ("--load", args.load),
                ("--masked", args.masked),
                ("--channels_last", args.channels_last),
                ("--batch_sizes", args.batch_sizes),
            )
            if on
        ]
        if unused or args.precision == "fp16":
            raise utils.UserError(
                f"--training times fp32 or bf16 epochs; it takes no {(unused or ['--precision fp16'])[0]}"
            )
    if args.batch_sizes is None:
        args.batch_sizes = [1, 32] if spec.imagenet else [1, 256]
    utils.set_seed(args.seed)
    info = benchmark_training(args, rt) if args.training else benchmark_inference(args, rt)
    info.update(
        device=str(device),
        device_name=device_name(device),
        threads=torch.get_num_threads(),
        precision=args.precision,
        channels_last=args.channels_last,
        torch=torch.__version__,
        repeats=args.repeats,
        command="python benchmark.py " + " ".join(sys.argv[1:]),
    )
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        print_table(info, args.training)
    return info


if __name__ == "__main__":
    utils.run(main, get_args_parser())
