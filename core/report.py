"""What ``make demo`` found, in two sentences: read back from test.py's and benchmark.py's outputs."""

import json
import re
from pathlib import Path

from .cli import UserError
from .models import find_pretrained, model_spec

# test.py's four lines, e.g. "Block Usage: 7.000 ± 0.000"
_TEST_LINES = {
    "accuracy": r"^Accuracy: ([0-9.]+)$",
    "blocks": r"^Block Usage: ([0-9.]+) ",
    "flops": r"^FLOPs/img: ([0-9.E+-]+) ",
    "policies": r"^Unique Policies: ([0-9]+)$",
}


def read_test_output(path: str | Path) -> dict[str, float]:
    """test.py's figures from its printed lines (other lines, such as progress, are skipped)."""
    text = Path(path).read_text()
    found = {}
    for key, pattern in _TEST_LINES.items():
        match = re.search(pattern, text, re.MULTILINE)
        if match is None:
            raise UserError(f"{path} holds no test.py line for {key}")
        found[key] = float(match.group(1))
    return found


def base_accuracy(model: str) -> float | None:
    """The test accuracy pretrain.py recorded in the base model's file name (``pk_E_<epoch>_A_<acc>.t7``)."""
    path = find_pretrained(model)
    match = path and re.search(r"_A_([0-9.]+)\.t7$", path.name)
    return float(match.group(1)) if match else None


# demo.sh trains from the ResNet-32 base and profiles the shipped ResNet-110 BlockDrop model.
TRAINED, SHIPPED = "R32_FMNIST", "R110_FMNIST"


def demo_summary(out_dir: str | Path) -> str:
    """Two sentences on demo.sh's figures in ``out_dir``: the model it trained, then the shipped one."""
    out = Path(out_dir)
    base = read_test_output(out / "R32_base.txt")
    trained = read_test_output(out / "R32_blockdrop.txt")
    shipped = read_test_output(out / "R110_blockdrop.txt")
    bench = json.loads((out / "R110_benchmark.json").read_text())
    k, k_shipped = model_spec(TRAINED).num_blocks, model_spec(SHIPPED).num_blocks
    points = 100 * (trained["accuracy"] - base["accuracy"])
    first = (
        f"The ResNet-32 finetuned here scores {trained['accuracy']:.1%} on the 10,000 test images against "
        f"{base['accuracy']:.1%} for the full base ({points:+.1f} points) while running "
        f"{trained['blocks']:.1f} of its {k} blocks ({trained['blocks'] / k:.0%})."
    )
    (b0, s0), *more = sorted((r["batch_size"], r["speedup"]) for r in bench["results"])
    speedups = f"at {s0:.2f}x the full network's speed at batch {b0}" + "".join(
        f" and {s:.2f}x at batch {b}" for b, s in more
    )
    recorded = base_accuracy(SHIPPED)
    against = f" (full network: {recorded:.1%})" if recorded is not None else ""
    second = (
        f"The shipped ResNet-110 BlockDrop model scores {shipped['accuracy']:.1%}{against} with "
        f"{shipped['blocks']:.1f} of {k_shipped} blocks, {bench['flops_full'] / bench['flops_blockdrop']:.1f}x fewer "
        f"FLOPs per image than the full network (policy network included), and runs {speedups} "
        "on this machine."
    )
    return first + "\n" + second
