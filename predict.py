"""Classify image files and folders with a BlockDrop checkpoint: the class, its probability, the blocks run.

    python predict.py --model R110_FMNIST --load cv/finetuned/R110_FMNIST_gamma_1/ckpt_E_....t7 shoe.png photos/

Folders are searched recursively for image files. Each image gets one line (``--json``: one JSON
object), then a last line gives the images per second. A file that cannot be read as an image is
one line on stderr naming it; the other images are still classified, and the exit code is 2.
"""

import json
import sys
import time
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

import utils


def get_args_parser():
    p = utils.ArgumentParser(
        prog="predict.py",
        description="Classify images with a BlockDrop checkpoint, running only the blocks its policy keeps.",
        formatter_class=utils.HelpFormatter,
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, or folders searched recursively for images")
    p.add_argument("--model", type=utils.model_name, required=True, help="the checkpoint's model, e.g. R110_FMNIST")
    p.add_argument(
        "--load", type=utils.path, default=None, help="BlockDrop checkpoint (none: the base ResNet with every block)"
    )
    p.add_argument("--data_dir", type=utils.path, default="data/", help="dataset folder (for CIFAR-100's class names)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (auto: cuda when available)")
    p.add_argument("--workers", type=utils.non_negative_int, default=2, help="DataLoader worker processes")
    p.add_argument("--batch_size", type=utils.batch_size, default=64, help="images per forward pass")
    p.add_argument("--topk", type=utils.positive_int, default=1, help="print the N most probable classes")
    p.add_argument("--json", action="store_true", help="one JSON object per image, and one for the speed at the end")
    utils.add_amp_flag(p)
    return p


def image_extensions() -> set[str]:
    """The file name extensions of the formats that PIL can read."""
    return {ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN}


def image_files(paths: list[str]) -> tuple[list[Path], list[str]]:
    """The images to classify, in the order given (a folder's in sorted order), and the paths not found."""
    files, missing = [], []
    extensions = image_extensions()
    for text in paths:
        path = Path(text)
        if path.is_dir():
            found = (p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in extensions)
            files.extend(sorted(found))
        elif path.exists():
            files.append(path)  # named by the user: tried whatever its extension
        else:
            missing.append(text)
    return files, missing


class ImageFiles(Dataset):
    """Image files through a transform; an unreadable one gives its error message instead of a tensor."""

    def __init__(self, files: list[Path], transform):
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        try:
            with Image.open(self.files[i]) as img:
                return i, self.transform(img), None
        except Exception as e:  # noqa: BLE001 (whatever the decoder raises, the file is not a readable image)
            return i, None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__


def collate(items):
    ok = [(i, x) for i, x, err in items if err is None]
    failed = [(i, err) for i, _, err in items if err is not None]
    inputs = torch.stack([x for _, x in ok]) if ok else None
    return [i for i, _ in ok], inputs, failed


def describe(path: Path, probs: torch.Tensor, blocks: int, num_blocks: int, classes, topk: int) -> dict:
    top = probs.topk(min(topk, probs.numel()))
    labels = top.indices.tolist()
    names = [classes[k] if classes else str(k) for k in labels]
    return {
        "path": str(path),
        "class": names[0],
        "label": labels[0],
        "probability": round(top.values[0].item(), 6),
        "blocks": blocks,
        "of_blocks": num_blocks,
        **({"top": [{"class": n, "label": k, "probability": round(v, 6)}
                    for n, k, v in zip(names, labels, top.values.tolist(), strict=True)]} if topk > 1 else {}),
    }  # fmt: skip


def text_line(row: dict) -> str:
    top = row.get("top") or [{"class": row["class"], "probability": row["probability"]}]
    classes = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in top)
    return f"{row['path']}: {classes} ({row['blocks']} of {row['of_blocks']} blocks)"


def main(args):
    rt = utils.runtime(args.device, args.amp)
    files, missing = image_files(args.paths)
    for text in missing:
        print(f"predict.py: error: {text}: no such file or folder", file=sys.stderr)
    if not files and not missing:
        raise utils.UserError(f"no image files in {', '.join(args.paths)}")
    net = utils.load_blockdrop(args.model, args.load, rt.device, args.data_dir)
    loader = DataLoader(
        ImageFiles(files, net.transform), batch_size=args.batch_size, num_workers=args.workers, collate_fn=collate
    )
    failed, done = len(missing), 0
    start = time.perf_counter()
    for index, inputs, errors in loader:
        for i, err in errors:
            print(f"predict.py: error: {files[i]}: not readable as an image ({err})", file=sys.stderr)
        failed += len(errors)
        if inputs is None:
            continue
        with rt.autocast():
            logits, policy = net(inputs.to(rt.device))
        probs = logits.float().softmax(1).cpu()
        blocks = policy.sum(1).int().tolist()
        for row, i in enumerate(index):
            line = describe(files[i], probs[row], blocks[row], net.num_blocks, net.classes, args.topk)
            print(json.dumps(line) if args.json else text_line(line), flush=True)
        done += len(index)
    seconds = time.perf_counter() - start
    rate = done / seconds if seconds > 0 else float("inf")
    if args.json:
        print(json.dumps({"images": done, "failed": failed, "seconds": round(seconds, 3), "images_per_s": rate}))
    else:
        print(f"{done} images in {seconds:.2f} s: {rate:.1f} images/s" + (f"; {failed} failed" if failed else ""))
    if failed:
        sys.exit(2)


if __name__ == "__main__":
    utils.run(main, get_args_parser())
