"""Figures of what a BlockDrop policy learned, on a checkpoint and a test set (PNG files).

    python visualize.py --model R110_C10 --load cv/finetuned/R110_C10_gamma_10/ckpt_E_2000_....t7 --out figures/

- policies.png: the most frequent policies, each as a row of kept and dropped blocks with its
  share of the images, beside sample images that use it (the paper's Figure 5);
- classes.png: per class, the distribution of blocks used;
- easy_hard.png: per class, the images using the fewest and the most blocks (the paper's Figure 4);
- block_keep.png: how often each block is kept over the test set.
"""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display needed
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torchvision.transforms as T  # noqa: E402

import utils  # noqa: E402
from core import distributed  # noqa: E402

KEPT, DROPPED = "#1f4e79", "#e3e3e3"
MAX_CLASSES = 40  # rows of easy_hard.png that still make a readable figure


def get_args_parser():
    p = utils.make_parser("Draw the policies of a BlockDrop checkpoint on the test set.")
    p.add_argument(
        "--load", type=utils.path, required=True, help="BlockDrop checkpoint (agent, and the ResNet if it has one)"
    )
    p.add_argument("--out", type=utils.path, default="figures/", help="folder for the PNG files")
    p.add_argument("--batch_size", type=utils.batch_size, default=256, help="batch size")
    p.add_argument("--top", type=utils.positive_int, default=6, help="most frequent policies to draw")
    p.add_argument("--samples", type=utils.positive_int, default=8, help="sample images per policy or per side")
    p.add_argument(
        "--classes", type=utils.positive_int, default=10, help="at most this many classes in the per-class figures"
    )
    p.add_argument("--dpi", type=utils.dpi, default=100, help="resolution of the PNG files")
    return p


def class_names(dataset, num_classes: int) -> list[str]:
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    names = getattr(dataset, "classes", None)
    return (
        list(names) if names is not None and len(names) == num_classes else [f"class {i}" for i in range(num_classes)]
    )


def displayable(dataset):
    """``i -> (H, W, 3)`` array in [0, 1]: the test transform's image with its normalisation undone."""
    base = dataset.dataset if isinstance(dataset, torch.utils.data.Subset) else dataset
    transform = getattr(base, "transform", None)
    steps = transform.transforms if isinstance(transform, T.Compose) else []
    norm = next((t for t in steps if isinstance(t, T.Normalize)), None)

    def image(i: int) -> np.ndarray:
        x = dataset[i][0].float()  # (3, H, W)
        if norm is not None:
            x = x * torch.tensor(norm.std).view(-1, 1, 1) + torch.tensor(norm.mean).view(-1, 1, 1)
        elif transform is None:  # fake data (--dummy): random numbers, spread to [0, 1]
            x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)
        return x.clamp(0, 1).permute(1, 2, 0).numpy()

    return image


@torch.inference_mode()
def greedy_policies(rnet, agent, loader, device):
    """Greedy policies, targets and correctness over the loader, in dataset order."""
    rnet.eval()
    agent.eval()
    indices, policies, targets, correct = [], [], [], []
    for inputs, target, index in utils.progress(loader, "policies"):
        inputs, target = inputs.to(device), target.to(device)
        policy = utils.greedy_policy(agent, inputs)
        preds = rnet(inputs, policy)
        indices.append(index)
        policies.append(policy.cpu())
        targets.append(target.cpu())
        correct.append((preds.argmax(1) == target).float().cpu())
    return distributed.collect(indices, policies, targets, correct)


def draw_policy(ax, policy: np.ndarray, layer_config) -> None:
    """A policy as a row of squares: dark = kept, light = dropped; gaps between segments."""
    x, start = 0.0, 0
    for n in layer_config:
        for t in range(start, start + n):
            ax.add_patch(
                plt.Rectangle((x, 0), 0.9, 0.9, facecolor=KEPT if policy[t] else DROPPED, edgecolor="white", lw=1)
            )
            x += 1
        start += n
        x += 0.6
    ax.set_xlim(-0.2, x)
    ax.set_ylim(-0.1, 1.0)
    ax.set_aspect("equal")
    ax.axis("off")


def figure_policies(path, policies, image, layer_config, top: int, samples: int, dpi: int, seed: int):
    distinct, inverse, counts = torch.unique(policies, dim=0, return_inverse=True, return_counts=True)
    order = counts.argsort(descending=True)[:top]
    rng = np.random.default_rng(seed)
    k = policies.shape[1]
    fig, axes = plt.subplots(
        len(order),
        samples + 1,
        figsize=(k * 0.12 + 1.2 + samples * 1.0, 1.15 * len(order) + 0.4),
        gridspec_kw={"width_ratios": [max(2.0, k * 0.12)] + [1] * samples},
        squeeze=False,
    )
    for row, g in enumerate(order.tolist()):
        members = (inverse == g).nonzero().squeeze(1).numpy()
        draw_policy(axes[row, 0], distinct[g].int().numpy(), layer_config)
        share = counts[g].item() / len(policies)
        axes[row, 0].set_title(f"{int(distinct[g].sum())} of {k} blocks, {share:.1%} of images", fontsize=8)
        chosen = rng.choice(members, size=min(samples, len(members)), replace=False)
        for col in range(samples):
            ax = axes[row, col + 1]
            ax.axis("off")
            if col < len(chosen):
                ax.imshow(image(int(chosen[col])))
    fig.suptitle(f"The {len(order)} most frequent of {len(distinct)} policies, with sample images", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def figure_classes(path, blocks, targets, names, shown, dpi: int):
    fig, ax = plt.subplots(figsize=(max(5.0, 0.7 * len(shown) + 1.5), 3.6))
    data = [blocks[targets == c].numpy() for c in shown]
    ax.boxplot(data, showmeans=True)
    ax.set_xticks(range(1, len(shown) + 1), [names[c] for c in shown], rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("blocks used per image")
    ax.set_title("Blocks used, per class (box: quartiles; triangle: mean)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def figure_easy_hard(path, blocks, targets, correct, image, names, shown, samples: int, dpi: int):
    """Per class, the images with the fewest and the most blocks; misclassified ones titled in red."""
    half = max(1, samples // 2)
    fig, axes = plt.subplots(
        len(shown), 2 * half, figsize=(2 * half * 0.95 + 1.6, 1.05 * len(shown) + 0.5), squeeze=False
    )
    for row, c in enumerate(shown):
        members = (targets == c).nonzero().squeeze(1)
        order = members[blocks[members].argsort(stable=True)].tolist()  # fewest blocks first
        m = min(half, -(-len(order) // 2))  # a small class: each image on one side (one if odd)
        picks = order[:m] + [None] * (half - m) + order[len(order) - m :] + [None] * (half - m)
        for col, i in enumerate(picks):
            ax = axes[row, col]
            ax.set_xticks([])
            ax.set_yticks([])
            if i is not None:
                ax.imshow(image(i))
                ax.set_title(f"{int(blocks[i])}", fontsize=7, pad=2, color="black" if correct[i] else "red")
        axes[row, 0].set_ylabel(names[c], fontsize=7, rotation=0, ha="right", va="center")
    axes[0, 0].annotate("fewest blocks", (0, 1.45), xycoords="axes fraction", fontsize=9)
    axes[0, half].annotate("most blocks", (0, 1.45), xycoords="axes fraction", fontsize=9)
    fig.suptitle("Blocks used per image (red: misclassified)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def figure_block_keep(path, policies, layer_config, dpi: int):
    rate = policies.float().mean(0).numpy()
    segment = np.repeat(np.arange(len(layer_config)), layer_config)
    colors = plt.get_cmap("tab10")(segment % 10)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.13 * len(rate) + 1.5), 3.0))
    ax.bar(np.arange(len(rate)), rate, color=colors)
    ax.set_xlabel("block (colour: segment)")
    ax.set_ylabel("share of images keeping it")
    ax.set_ylim(0, 1.02)
    ax.set_title(
        f"How often each block is kept ({policies.sum(1).float().mean():.2f} of {len(rate)} per image)", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def main(args):
    if args.classes > MAX_CLASSES:
        raise utils.UserError(f"--classes {args.classes}: at most {MAX_CLASSES} classes fit in a figure")
    utils.check_output_dir(args.out, "--out")  # before any work
    device = utils.runtime(args.device).device
    utils.set_seed(args.seed)
    folder = utils.folder_data(args, args.load)  # image folders: classes, normalisation
    classes = folder and len(folder.classes)
    rnet, agent, _ = utils.models_for_run(args.model, args.load, args.dummy, init_agent=False, num_classes=classes)
    _, testset = utils.get_data(args, folder)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise utils.UserError(f"cannot create the output folder {out} ({e.strerror})") from None
    loader = utils.make_loader(testset, args.batch_size, False, args.workers, device)
    rnet.to(device)
    agent.to(device)
    policies, targets, correct = greedy_policies(rnet, agent, loader, device)
    targets = targets.long()
    blocks = policies.sum(1)
    num_classes = rnet.fc.out_features
    names = list(folder.classes) if folder else class_names(testset, num_classes)
    present = torch.bincount(targets, minlength=num_classes)
    shown = [c for c in present.argsort(descending=True, stable=True).tolist() if present[c] > 0][: args.classes]
    shown.sort()
    image = displayable(testset)
    layer_config = rnet.layer_config

    files = {
        "policies.png": lambda p: figure_policies(
            p, policies, image, layer_config, args.top, args.samples, args.dpi, args.seed
        ),
        "classes.png": lambda p: figure_classes(p, blocks, targets, names, shown, args.dpi),
        "easy_hard.png": lambda p: figure_easy_hard(
            p, blocks, targets, correct, image, names, shown, args.samples, args.dpi
        ),
        "block_keep.png": lambda p: figure_block_keep(p, policies, layer_config, args.dpi),
    }
    for name, draw in files.items():
        draw(out / name)
    print(
        f"{len(policies)} test images, accuracy {correct.mean():.3f}, {blocks.mean():.2f} blocks per image, "
        f"{len(torch.unique(policies, dim=0))} policies"
    )
    print(f"wrote {', '.join(files)} to {out}")


if __name__ == "__main__":
    utils.run(main, get_args_parser())
