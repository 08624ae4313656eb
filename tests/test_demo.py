"""demo.sh without running it: its commands parse, its curriculum reaches every block, it finds the
shipped models, and its closing sentences say what test.py's and benchmark.py's outputs hold."""

import glob
import importlib
import json
import os
import re
import shlex
import subprocess
import sys

import pytest

import utils
from core import report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "demo.sh")


def demo_commands():
    """(script, argv) of each python script demo.sh runs, its bash arrays and variables filled in."""
    text = open(DEMO).read().replace("\\\n", " ")
    arrays = {name: shlex.split(body) for name, body in re.findall(r"^(\w+)=\((.*)\)$", text, re.MULTILINE)}
    commands = []
    for line in text.splitlines():
        match = re.match(r'\s*"\$PYTHON" (\w+)\.py (.*?)(?:\||>|$)', line)
        if not match:
            continue
        argv = []
        for word in shlex.split(match.group(2)):
            array = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
            argv += arrays[array.group(1)] if array else [word.replace("$OUT", "cv/demo")]
        commands.append((match.group(1), argv))
    return commands


def parse(script, argv):
    return importlib.import_module(script).get_args_parser().parse_args(argv)


def test_every_command_parses_with_its_scripts_parser():
    commands = demo_commands()
    assert [script for script, _ in commands] == ["cl_training", "finetune", "test", "test", "test", "benchmark"]
    for script, argv in commands:
        args = parse(script, argv)
        assert args.workers == 0  # no worker processes: the demo's timing is on 2 cores


def test_the_curriculum_reaches_every_block_before_finetuning():
    (_, cl_argv), (_, ft_argv) = demo_commands()[:2]
    cl, ft = parse("cl_training", cl_argv), parse("finetune", ft_argv)
    blocks = utils.model_spec(cl.model).num_blocks
    last_epoch = cl.max_epochs  # epochs 0..max_epochs, as in the original
    assert utils.curriculum_blocks(last_epoch, blocks, cl.cl_step) == blocks
    assert utils.curriculum_blocks(last_epoch - 1, blocks, cl.cl_step) == blocks  # at least one full epoch
    assert ft.model == cl.model and ft.pretrained == "$cl" and ft.cv_dir == "cv/demo/ft/"


def test_the_demo_starts_from_the_shipped_bases_and_finds_the_shipped_resnet110():
    assert utils.find_pretrained("R32_FMNIST") is not None
    found = glob.glob(os.path.join(ROOT, "cv/finetuned/R110_FMNIST_gamma_*/ckpt_E_*.t7"))
    assert len(found) == 1


def test_a_missing_shipped_model_stops_the_demo_at_once(tmp_path):
    copy = tmp_path / "demo.sh"
    copy.write_text(open(DEMO).read())
    result = subprocess.run(["bash", str(copy)], capture_output=True, text=True, env={**os.environ, "PYTHON": "false"})
    assert result.returncode == 2
    assert "shipped ResNet-110 BlockDrop model" in result.stderr
    assert not (tmp_path / "cv").exists()


def write_outputs(folder, base, trained, shipped, speedups):
    for name, (acc, blocks, flops, unique) in (
        ("R32_base", base),
        ("R32_blockdrop", trained),
        ("R110_blockdrop", shipped),
    ):
        lines = [
            "progress 50%",
            f"Accuracy: {acc:.3f}",
            f"Block Usage: {blocks:.3f} \u00b1 1.000",
            f"FLOPs/img: {flops:.2E} \u00b1 1.00E+06",
            f"Unique Policies: {unique}",
        ]
        (folder / f"{name}.txt").write_text("\n".join(lines) + "\n")
    results = [{"batch_size": b, "speedup": s} for b, s in speedups]
    bench = {"flops_full": 5.0e8, "flops_blockdrop": 2.0e8, "results": results}
    (folder / "R110_benchmark.json").write_text(json.dumps(bench))


def test_the_summary_says_what_the_outputs_hold(tmp_path):
    write_outputs(
        tmp_path, (0.952, 15, 1.5e8, 1), (0.941, 8.25, 9e7, 12), (0.935, 17.5, 1.9e8, 300), [(256, 2.1), (1, 1.6)]
    )
    first, second = report.demo_summary(tmp_path).splitlines()
    assert first == (
        "The ResNet-32 finetuned here scores 94.1% on the 10,000 test images against 95.2% for the full base "
        "(-1.1 points) while running 8.2 of its 15 blocks (55%)."
    )
    recorded = report.base_accuracy("R110_FMNIST")
    assert recorded is not None and 0.9 < recorded < 1
    assert second == (
        f"The shipped ResNet-110 BlockDrop model scores 93.5% (full network: {recorded:.1%}) with 17.5 of 54 "
        "blocks, 2.5x fewer FLOPs per image than the full network (policy network included), and runs at "
        "1.60x the full network's speed at batch 1 and 2.10x at batch 256 on this machine."
    )


def test_the_summary_reads_what_test_py_prints(tmp_path):
    (tmp_path / "data").mkdir()
    cmd = [sys.executable, os.path.join(ROOT, "test.py"), "--workers", "0", "--model", "R20_C10", "--dummy", "8"]
    result = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    (tmp_path / "out.txt").write_text(result.stdout)
    assert report.read_test_output(tmp_path / "out.txt") == {
        "accuracy": float(result.stdout.splitlines()[0].split()[1]),
        "blocks": 9.0,
        "flops": float(result.stdout.splitlines()[2].split()[1]),
        "policies": 1.0,
    }


def test_an_output_without_test_py_lines_is_a_clear_error(tmp_path):
    (tmp_path / "out.txt").write_text("Accuracy: 0.900\n")
    with pytest.raises(utils.UserError, match="no test.py line for blocks"):
        report.read_test_output(tmp_path / "out.txt")


def test_demo_sh_ends_with_the_summary(tmp_path):
    write_outputs(tmp_path, (0.952, 15, 1.5e8, 1), (0.916, 8.49, 1e8, 11), (0.929, 16.7, 1.8e8, 21), [(1, 2.7)])
    text = open(DEMO).read()
    script = re.search(r'"\$PYTHON" - "\$OUT" <<\'EOF\'\n(.*?)\nEOF\n', text, re.DOTALL).group(1)
    result = subprocess.run(
        [sys.executable, "-", str(tmp_path)], input=script, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == report.demo_summary(tmp_path) + "\n"
    assert "scores 91.6%" in result.stdout and "runs at 2.70x the full network's speed at batch 1 on" in result.stdout
