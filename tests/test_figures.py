"""Baselines in test.py, visualize.py's figures, tradeoff.py's curve and CSV, TensorBoard histograms."""

import csv
import os
import re
import struct
import subprocess
import sys

import pytest
import torch
from PIL import Image

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = ["--model", "R20_C10", "--dummy", 64, "--workers", 0]


def run(script, *args, cwd):
    cmd = [sys.executable, os.path.join(ROOT, script), *map(str, DATA), *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_png(path, min_size=(250, 150)):
    with Image.open(path) as image:
        assert image.format == "PNG"
        width, height = image.size
        image.verify()  # the whole file decodes
    assert min_size[0] <= width <= 5000 and min_size[1] <= height <= 5000, (path, width, height)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two finetuning-style checkpoints of R20_C10 whose agents keep about 3 and 6 of 9 blocks."""
    folder = tmp_path_factory.mktemp("figures")
    torch.manual_seed(0)
    rnet, _ = utils.build_model("R20_C10")
    paths = []
    for keep in (3, 6):
        _, agent = utils.build_model("R20_C10")
        with torch.no_grad():
            agent.logit.weight.mul_(20.0)  # varied policies from image to image
            agent.logit.bias.copy_(torch.where(torch.arange(9) < keep, 1.5, -1.5))
        path = folder / f"ckpt_E_0_keep_{keep}.t7"
        state = {"agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": 0, "reward": 0.0, "acc": 0.0}
        utils.save_checkpoint(state, path)
        paths.append(path)
    (folder / "data").mkdir()
    return folder, paths


def test_baseline_policies_keep_exactly_k_blocks():
    x = torch.zeros(50, 3, 32, 32)
    for k in (0, 1, 4, 9):
        first = utils.baseline_policy("first_k", 9, k)(x)
        assert first.shape == (50, 9) and (first.sum(1) == k).all() and (first[:, :k] == 1).all()
        drawn = utils.baseline_policy("random_k", 9, k, seed=3)(x)
        assert (drawn.sum(1) == k).all() and set(drawn.unique().tolist()) <= {0.0, 1.0}
        assert torch.equal(drawn, utils.baseline_policy("random_k", 9, k, seed=3)(x))  # fixed by the seed
    drawn = utils.baseline_policy("random_k", 9, 4, seed=3)(x)
    assert len(torch.unique(drawn, dim=0)) > 10  # drawn per image
    assert (utils.baseline_policy("full", 9)(x) == 1).all()


def test_test_py_reports_the_baselines(checkpoints):
    folder, (ckpt, _) = checkpoints
    rnet, _ = utils.build_model("R20_C10")
    base, per_block = utils.block_flops(rnet, (3, 32, 32))

    first = run("test.py", "--load", ckpt, "--policy", "first_k", "--k", 4, cwd=folder)
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[1:] == [
        "Block Usage: 4.000 \u00b1 0.000",
        f"FLOPs/img: {base + per_block[:4].sum().item():.2E} \u00b1 0.00E+00",  # no policy network
        "Unique Policies: 1",
    ]
    drawn = run("test.py", "--load", ckpt, "--policy", "random_k", "--k", 4, cwd=folder)
    assert drawn.returncode == 0, drawn.stderr
    assert drawn.stdout.splitlines()[1] == "Block Usage: 4.000 \u00b1 0.000"
    assert int(drawn.stdout.splitlines()[3].split(": ")[1]) > 10
    assert drawn.stdout == run("test.py", "--load", ckpt, "--policy", "random_k", "--k", 4, cwd=folder).stdout
    full = run("test.py", "--policy", "full", cwd=folder)
    assert full.stdout.splitlines()[1:3] == ["Block Usage: 9.000 \u00b1 0.000", "FLOPs/img: 8.11E+07 \u00b1 0.00E+00"]
    for args, message in [
        (["--policy", "random_k"], "needs --k K"),
        (["--policy", "first_k", "--k", 10], "--k 10: R20_C10 has 9 blocks"),
        (["--k", 3], "--k applies to --policy first_k and random_k"),
    ]:
        result = run("test.py", *args, cwd=folder)
        assert result.returncode == 2 and result.stderr.count("\n") == 1 and message in result.stderr


def test_visualize_writes_the_four_figures(checkpoints):
    folder, (ckpt, _) = checkpoints
    result = run("visualize.py", "--load", ckpt, "--out", "figs", "--samples", 4, cwd=folder)
    assert result.returncode == 0, result.stderr
    names = ["policies.png", "classes.png", "easy_hard.png", "block_keep.png"]
    assert result.stdout.splitlines()[-1] == f"wrote {', '.join(names)} to figs"
    assert sorted(os.listdir(folder / "figs")) == sorted(names)
    for name in names:
        assert_png(folder / "figs" / name)
    missing = run("visualize.py", "--out", "figs2", cwd=folder)
    assert missing.returncode == 2 and "--load" in missing.stderr
    too_many = run("visualize.py", "--load", ckpt, "--out", "figs2", "--classes", 41, cwd=folder)
    assert too_many.returncode == 2 and "at most 40 classes" in too_many.stderr
    assert not (folder / "figs2").exists()


def test_tradeoff_writes_one_row_per_point_and_the_curve(checkpoints):
    folder, paths = checkpoints
    result = run("tradeoff.py", "--load", *paths, "--ks", 2, 5, "--out", "curve", cwd=folder)
    assert result.returncode == 0, result.stderr
    with open(folder / "curve.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["method"], r["k"]) for r in rows] == [
        ("blockdrop", ""),
        ("blockdrop", ""),
        ("full", ""),
        ("first_k", "2"),
        ("first_k", "5"),
        ("random_k", "2"),
        ("random_k", "5"),
    ]
    assert [r["checkpoint"] for r in rows[:2]] == [str(p) for p in paths]
    for r in rows[3:]:
        assert float(r["blocks"]) == int(r["k"]) and float(r["blocks_std"]) == 0
    assert float(rows[2]["blocks"]) == 9 and float(rows[2]["flops"]) == pytest.approx(8.110e7, rel=1e-3)
    # A point is what test.py reports for the checkpoint, or for the baseline.
    for row, args in [(rows[0], []), (rows[4], ["--policy", "first_k", "--k", 5])]:
        profile = run("test.py", "--load", paths[0], *args, cwd=folder).stdout.splitlines()
        assert float(profile[0].split(": ")[1]) == pytest.approx(float(row["accuracy"]), abs=1e-3)
        assert profile[1] == f"Block Usage: {float(row['blocks']):.3f} \u00b1 {float(row['blocks_std']):.3f}"
        assert profile[2] == f"FLOPs/img: {float(row['flops']):.2E} \u00b1 {float(row['flops_std']):.2E}"
    assert_png(folder / "curve.png")
    margins = [line for line in result.stdout.splitlines() if line.startswith("at ")]
    assert len(margins) == 2 and all("BlockDrop" in m and "first_k" in m and "random_k" in m for m in margins)
    # Without --ks the baselines take the checkpoints' rounded block counts.
    default = run("tradeoff.py", "--load", paths[0], "--baselines", "first_k", "--out", "one", cwd=folder)
    assert default.returncode == 0, default.stderr
    with open(folder / "one.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == ["blockdrop", "full", "first_k"]
    assert int(rows[2]["k"]) == round(float(rows[0]["blocks"]))
    for out in (".", "nowhere/curve"):
        bad = run("tradeoff.py", "--load", paths[0], "--out", out, cwd=folder)
        assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--out" in bad.stderr


def test_tradeoff_margins_interpolate_the_baselines_at_equal_flops():
    import tradeoff

    def row(method, flops, accuracy, checkpoint=""):
        return {"method": method, "flops": flops, "accuracy": accuracy, "checkpoint": checkpoint}

    rows = [
        row("blockdrop", 3.0, 0.9, "a.t7"),
        row("blockdrop", 9.0, 0.9, "b.t7"),
        row("blockdrop", 1.0, 0.9, "c.t7"),
        row("full", 10.0, 0.95),
        row("first_k", 2.0, 0.2),
        row("first_k", 6.0, 0.6),
        row("random_k", 4.0, 0.5),
    ]
    a, b, c = tradeoff.equal_flops_margins(rows)
    assert a == {"checkpoint": "a.t7", "flops": 3.0, "accuracy": 0.9, "first_k": pytest.approx(0.3), "random_k": None}
    # The full network closes both curves: between (6, 0.6) and (10, 0.95) for first K.
    assert b["first_k"] == pytest.approx(0.6 + 0.35 * 3 / 4) and b["random_k"] == pytest.approx(0.5 + 0.45 * 5 / 6)
    assert c["first_k"] is None and c["random_k"] is None  # below both curves


def tensorboard_events(folder):
    """{tag: [(step, value proto)]} from the event files of a TensorBoard folder."""
    from tensorboardX.proto import event_pb2

    found = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        data, pos = path.read_bytes(), 0
        while pos < len(data):
            (length,) = struct.unpack("<Q", data[pos : pos + 8])
            event = event_pb2.Event.FromString(data[pos + 12 : pos + 12 + length])
            pos += 12 + length + 4  # length, its CRC, the record, its CRC
            for value in event.summary.value:
                found.setdefault(value.tag, []).append((event.step, value))
    return found


def test_training_logs_histograms_of_blocks_and_keep_rates(checkpoints):
    folder, (ckpt, _) = checkpoints
    args = ["--batch_size", 16, "--max_epochs", 1, "--eval_every", 1, "--cv_dir", "ft"]
    result = run("finetune.py", *args, "--load", ckpt, cwd=folder)
    assert result.returncode == 0, result.stderr
    events = tensorboard_events(folder / "ft/log")
    for split in ("train", "test"):
        used = events[f"{split}_blocks_used"]
        assert [step for step, _ in used] == [1, 2]  # --load's epoch 0, then epochs 1 and 2
        assert all(v.histo.num == 64 and 0 <= v.histo.min <= v.histo.max <= 9 for _, v in used)
        keep = events[f"{split}_block_keep_rate"]
        assert [step for step, _ in keep] == [1, 2]
        for _, v in keep:
            rates = list(v.histo.bucket)
            assert len(rates) == 9 and all(0 <= r <= 1 for r in rates)
            assert sum(rates) == pytest.approx(v.histo.num)  # mean blocks used = sum of keep rates
    last_test = re.findall(r"TS - .* S: (\d+\.\d+)", result.stdout)[-1]
    assert sum(events["test_block_keep_rate"][-1][1].histo.bucket) == pytest.approx(float(last_test), abs=1e-3)
