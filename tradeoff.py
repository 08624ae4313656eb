"""Accuracy against FLOPs per image: BlockDrop checkpoints and simple baselines in one picture.

    python tradeoff.py --model R110_C10 --load cv/R110_C10_ft_-2/ckpt_E_2000_....t7 cv/R110_C10_ft_-10/ckpt_E_2000_....t7 \\
        --out cv/tradeoff

evaluates each checkpoint with its greedy policies (as test.py does), and the baselines on the
base ResNet (or on --baseline_resnet's): the first K blocks and K random blocks per image, for
each K of --ks (default: the checkpoints' mean block counts, rounded), and the full network. It
writes <out>.csv (one row per point) and <out>.png (accuracy against FLOPs per image), and prints
each BlockDrop point's margin over each baseline at the same FLOPs (the baseline interpolated).
"""

import csv
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

import utils  # noqa: E402

COLUMNS = ["method", "k", "checkpoint", "accuracy", "blocks", "blocks_std", "flops", "flops_std", "unique_policies"]
STYLE = {
    "blockdrop": dict(color="#c0392b", marker="o", label="BlockDrop (learned policies)"),
    "first_k": dict(color="#2471a3", marker="s", label="first K blocks"),
    "random_k": dict(color="#7d3c98", marker="^", label="K random blocks per image"),
    "full": dict(color="black", marker="*", markersize=12, label="full network", zorder=1),
}


def get_args_parser():
    p = utils.make_parser("Plot accuracy against FLOPs for BlockDrop checkpoints and baselines.")
    p.add_argument(
        "--load", type=utils.path, nargs="+", required=True, help="BlockDrop checkpoints (e.g. one per --penalty)"
    )
    p.add_argument(
        "--ks",
        type=utils.non_negative_int,
        nargs="*",
        default=None,
        help="blocks kept by the baselines (default: the checkpoints' mean block counts, rounded)",
    )
    p.add_argument(
        "--baselines",
        nargs="*",
        choices=["first_k", "random_k"],
        default=["first_k", "random_k"],
        help="baselines to evaluate at each K (none: only the checkpoints and the full network)",
    )
    p.add_argument(
        "--baseline_resnet",
        type=utils.path,
        default=None,
        help="a finetuned checkpoint whose ResNet the baselines use (default: the base ResNet)",
    )
    p.add_argument(
        "--out",
        type=utils.path,
        default="tradeoff",
        help="output path, without extension: <out>.csv and <out>.png are written",
    )
    p.add_argument("--batch_size", type=utils.batch_size, default=256, help="batch size")
    p.add_argument("--dpi", type=utils.dpi, default=100, help="resolution of the PNG file")
    utils.add_amp_flag(p)
    return p


def point(method, k, checkpoint, figures: utils.Profile) -> dict:
    """One row of the CSV: a method (and its K) with its profile."""
    return {
        "method": method,
        "k": "" if k is None else k,
        "checkpoint": checkpoint or "",
        "accuracy": round(figures.accuracy, 6),
        "blocks": round(figures.blocks_mean, 4),
        "blocks_std": round(figures.blocks_std, 4),
        "flops": float(f"{np.mean(figures.flops):.6e}"),
        "flops_std": float(f"{np.std(figures.flops):.6e}"),
        "unique_policies": len(figures.policy_set),
    }


def equal_flops_margins(rows) -> list[dict]:
    """Each BlockDrop point against each baseline at the same FLOPs per image.

    A baseline's accuracy at the point's FLOPs is interpolated linearly between its two nearest
    points (the full network is every baseline's K = all blocks); None outside its range.
    """
    curves = {}  # method: (FLOPs, accuracies), sorted by FLOPs, the full network included
    for method in ("first_k", "random_k"):
        if any(b["method"] == method for b in rows):
            curves[method] = tuple(
                zip(*sorted((b["flops"], b["accuracy"]) for b in rows if b["method"] in (method, "full")), strict=True)
            )
    found = []
    for r in (r for r in rows if r["method"] == "blockdrop"):
        margins = {
            m: float(np.interp(r["flops"], x, y)) if x[0] <= r["flops"] <= x[-1] else None
            for m, (x, y) in curves.items()
        }
        found.append({"checkpoint": r["checkpoint"], "flops": r["flops"], "accuracy": r["accuracy"], **margins})
    return found


def print_margins(rows) -> None:
    for m in equal_flops_margins(rows):
        parts = []
        for method in ("first_k", "random_k"):
            if method in m:
                accuracy = m[method]
                parts.append(
                    f"{method} outside its FLOPs range"
                    if accuracy is None
                    else f"{method} {accuracy:.3f} ({100 * (m['accuracy'] - accuracy):+.1f} points)"
                )
        if parts:
            print(f"at {m['flops']:.2E} FLOPs/img: BlockDrop {m['accuracy']:.3f}; " + ", ".join(parts))


def plot(rows, path, model: str, dpi: int) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for method, style in STYLE.items():
        mine = sorted((r for r in rows if r["method"] == method), key=lambda r: r["flops"])
        if not mine:
            continue
        x = [r["flops"] for r in mine]
        y = [100 * r["accuracy"] for r in mine]
        ax.plot(x, y, linestyle="-" if len(mine) > 1 else "none", **style)
        if method == "blockdrop":
            for r in mine:
                ax.annotate(f"{r['blocks']:.1f}", (r["flops"], 100 * r["accuracy"]), fontsize=7,
                            textcoords="offset points", xytext=(-6, -11), zorder=4)  # fmt: skip
    ax.set_xlabel("FLOPs per image (policy network included for BlockDrop)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{model}: accuracy against compute (labels: blocks per image)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(args):
    rt = utils.runtime(args.device, args.amp)
    device = rt.device
    utils.set_seed(args.seed)
    spec = utils.model_spec(args.model)
    for k in args.ks or []:
        if k > spec.num_blocks:
            raise utils.UserError(f"--ks {k}: {args.model} has {spec.num_blocks} blocks")
    out = Path(args.out)
    if out.suffix in (".csv", ".png"):
        out = out.with_suffix("")
    if out.name in ("", ".", "..") or out.is_dir():
        raise utils.UserError(f"--out {args.out}: give a file path without extension, e.g. {out / 'tradeoff'}")
    if not out.parent.is_dir():
        raise utils.UserError(f"the folder of --out, {out.parent}, does not exist")
    utils.check_output_dir(out.parent, "--out")  # before any evaluation
    if args.baseline_resnet is not None and "resnet" not in utils.load_file(args.baseline_resnet):
        raise utils.UserError(f"--baseline_resnet {args.baseline_resnet} has no 'resnet' (not a finetuned checkpoint)")
    folder = utils.folder_data(args, *args.load)  # image folders: classes, normalisation
    classes = folder and len(folder.classes)
    _, testset = utils.get_data(args, folder)
    loader = utils.make_loader(testset, args.batch_size, False, args.workers, device)

    rows = []
    for path in args.load:
        rnet, agent, _ = utils.models_for_run(args.model, path, args.dummy, init_agent=False, num_classes=classes)
        figures = utils.profile(rnet.to(device), agent.to(device), loader, rt, spec.input_size)
        rows.append(point("blockdrop", None, path, figures))
        print(f"BlockDrop {path}: accuracy {figures.accuracy:.3f}, {figures.blocks_mean:.2f} blocks", flush=True)

    rnet, agent, _ = utils.models_for_run(
        args.model, args.baseline_resnet, args.dummy, init_agent=False, num_classes=classes
    )
    rnet.to(device)
    agent.to(device)
    ks = sorted(set(args.ks)) if args.ks is not None else sorted({round(r["blocks"]) for r in rows})
    runs = [("full", None)] + [(b, k) for b in args.baselines for k in ks]
    for method, k in runs:
        policy_fn = utils.baseline_policy(method, rnet.num_blocks, k, args.seed)
        figures = utils.profile(rnet, agent, loader, rt, spec.input_size, policy_fn, False)
        rows.append(point(method, k, args.baseline_resnet, figures))
        print(f"{method}{'' if k is None else f' K={k}'}: accuracy {figures.accuracy:.3f}", flush=True)

    csv_path, png_path = out.with_name(out.name + ".csv"), out.with_name(out.name + ".png")
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    plot(rows, png_path, args.model, args.dpi)
    print_margins(rows)
    print(f"wrote {csv_path} ({len(rows)} points) and {png_path}")


if __name__ == "__main__":
    utils.run(main, get_args_parser())
