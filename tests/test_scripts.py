"""Each script end to end on fake data (--dummy), with its console lines and files checked."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STATS = r"A: \d\.\d{3} \| R: -?\d\.\d{2}E[+-]\d{2} \| S: \d+\.\d{3} \| V: \d+\.\d{3} \| #: \d+"
FAKE = ["--model", "R20_C10", "--dummy", 48, "--batch_size", 16]  # a tiny fake-data run
CKPT = r"ckpt_E_(\d+)_A_\d\.\d{3}_R_-?\d\.\d{2}E[+-]\d{2}_S_\d+\.\d{2}_#_\d+\.t7"


def run(script, *args, cwd):
    cmd = [sys.executable, os.path.join(ROOT, script), "--workers", "0", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def checkpoints(folder):
    return sorted(
        (f for f in os.listdir(folder) if re.fullmatch(CKPT, f)), key=lambda f: int(re.match(CKPT, f).group(1))
    )


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A scratch folder that the scripts use as their working directory (cv/, data/)."""
    path = tmp_path_factory.mktemp("work")
    (path / "data").mkdir()
    return path


@pytest.fixture(scope="module")
def pretrained(workdir):
    result = run("pretrain.py", "--model", "R20_C10", "--dummy", 40, "--epochs", 2, "--batch_size", 16, cwd=workdir)
    assert result.returncode == 0, result.stderr
    return result


def test_pretrain(pretrained, workdir):
    lines = pretrained.stdout.strip().splitlines()
    assert [line.split(" |")[0] for line in lines] == ["E: 1", "E: 2"]
    assert all(re.fullmatch(r"E: \d+ \| loss: \d+\.\d{4} \| A: \d\.\d{3} \| TS - A: \d\.\d{3}", line) for line in lines)
    folder = workdir / "cv/pretrained/R20_C10"
    files = sorted(os.listdir(folder))
    assert [f for f in files if f.startswith("pk_")] == [f"pk_E_2_A_{lines[-1][-5:]}.t7"]  # only the newest kept
    assert "args.json" in files and os.listdir(folder / "log")
    info = json.loads((folder / "args.json").read_text())
    assert info["args"]["epochs"] == 2 and info["versions"]["torch"] == torch.__version__
    ckpt = torch.load(folder / files[-1] if files[-1].startswith("pk_") else folder / files[0], weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["model"] == "R20_C10"
    assert set(ckpt) == {"state_dict", "epoch", "acc", "model"}  # a finished run's file: the base model alone


def test_pretrain_with_stochastic_depth(tmp_path):
    (tmp_path / "data").mkdir()
    args = ["--model", "R20_C10", "--dummy", 16, "--epochs", 1, "--batch_size", 8, "--cv_dir", "out"]
    result = run("pretrain.py", *args, "--drop_rate", 0.5, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("E: 1 | loss: ")
    assert json.loads((tmp_path / "out/args.json").read_text())["args"]["drop_rate"] == 0.5
    assert_one_line_error(run("pretrain.py", *args, "--drop_rate", 1, cwd=tmp_path), "must be a number in [0, 1)")


@pytest.fixture(scope="module")
def curriculum(pretrained, workdir):
    result = run("cl_training.py", *FAKE, "--max_epochs", 2, "--cv_dir", "cv/cl", cwd=workdir)
    assert result.returncode == 0, result.stderr
    return result


def test_cl_training(curriculum, workdir):
    lines = curriculum.stdout.strip().splitlines()
    train = [line for line in lines if line.startswith("E: ")]
    test = [line for line in lines if line.startswith("TS - ")]
    assert [line.split(" |")[0] for line in train] == ["E: 0", "E: 1", "E: 2"]
    assert all(re.fullmatch(rf"E: \d+ \| {STATS}", line) for line in train)
    assert len(test) == 2 and all(re.fullmatch(rf"TS - {STATS}", line) for line in test)
    assert [line for line in lines if line.startswith("training")] == [
        f"training the last {n} blocks ..." for n in (1, 2, 3)
    ]
    # Epoch 0: the agent decides only the last block, so at least 8 of 9 blocks run.
    assert float(re.search(r"S: (\S+)", train[0]).group(1)) >= 8
    saved = checkpoints(workdir / "cv/cl")
    assert [int(re.match(CKPT, f).group(1)) for f in saved] == [0, 2]  # every 10th epoch and the last
    ckpt = torch.load(workdir / "cv/cl" / saved[-1], weights_only=True)
    assert set(ckpt) == {"agent", "epoch", "reward", "acc", "model"} and ckpt["epoch"] == 2
    assert isinstance(ckpt["acc"], float) and isinstance(ckpt["reward"], float)
    assert os.listdir(workdir / "cv/cl/log") and (workdir / "cv/cl/args.json").exists()


def test_cl_training_resumes_from_the_next_epoch(curriculum, workdir):
    last = checkpoints(workdir / "cv/cl")[-1]
    result = run(
        "cl_training.py", *FAKE, "--max_epochs", 0, "--cv_dir", "cv/cl", "--load", f"cv/cl/{last}", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    # The curriculum goes on where it was: the agent decides min(e + 1, K) blocks at epoch e.
    assert result.stdout.splitlines()[0] == "training the last 4 blocks ..."
    assert result.stdout.splitlines()[1].startswith("E: 3 |")
    assert int(re.match(CKPT, checkpoints(workdir / "cv/cl")[-1]).group(1)) == 3


def test_dense_runs_the_masked_form_with_the_same_numbers(curriculum, workdir):
    """--dense (the original's computation) gives curriculum learning the same numbers: the ResNet is frozen."""
    dense = run("cl_training.py", *FAKE, "--max_epochs", 2, "--cv_dir", "cv/cl_dense", "--dense", cwd=workdir)
    assert dense.returncode == 0, dense.stderr
    assert dense.stdout == curriculum.stdout
    assert checkpoints(workdir / "cv/cl_dense") == checkpoints(workdir / "cv/cl")[:2]
    cl = checkpoints(workdir / "cv/cl")[-1]
    args = ["--max_epochs", 0, "--cv_dir", "cv/ft_dense", "--pretrained", f"cv/cl/{cl}", "--dense"]
    result = run("finetune.py", *FAKE, *args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"# setting learning_rate to 1.00E-04\nE: 0 \| {STATS}\nTS - {STATS}\n", result.stdout)


def test_a_nan_stops_the_run_and_leaves_the_checkpoints_untouched(curriculum, workdir):
    shutil.copytree(workdir / "cv/cl", workdir / "cv/cl_nan")
    before = {f: (workdir / "cv/cl_nan" / f).read_bytes() for f in checkpoints(workdir / "cv/cl_nan")}
    last = checkpoints(workdir / "cv/cl_nan")[-1]
    args = ["--max_epochs", 2, "--cv_dir", "cv/cl_nan", "--load", f"cv/cl_nan/{last}", "--lr", 1e30]
    result = run("cl_training.py", *FAKE, *args, cwd=workdir)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "became NaN or infinite" in errors[0], errors
    # it names the quantity that went non-finite, and why: the step of lr 1e30 made the agent's weights diverge
    assert "the policy network's output became NaN or infinite (its weights diverged: try a lower --lr)" in errors[0]
    assert "stopped before saving anything more" in errors[0]
    assert "Traceback" not in result.stderr
    after = {f: (workdir / "cv/cl_nan" / f).read_bytes() for f in checkpoints(workdir / "cv/cl_nan")}
    assert after == before


def test_cl_step_k_or_more_turns_the_curriculum_off(pretrained, workdir):
    """--cl_step is the original's switch: with K (9 here) or more the agent decides every block at once."""
    for cl_step in (9, 20):
        args = ["--max_epochs", 1, "--cv_dir", f"cv/cl_step{cl_step}", "--cl_step", cl_step]
        result = run("cl_training.py", *FAKE, *args, cwd=workdir)
        assert result.returncode == 0, result.stderr
        assert [line for line in result.stdout.splitlines() if line.startswith("training")] == [
            "training the last 9 blocks ..."
        ] * 2
    # Any value below K is the default curriculum, whatever the value (the original took any integer).
    for cl_step in (5, 0):
        args = ["--max_epochs", 2, "--cv_dir", f"cv/cl_step{cl_step}", "--cl_step", cl_step]
        result = run("cl_training.py", *FAKE, *args, cwd=workdir)
        assert result.returncode == 0, result.stderr
        assert [line for line in result.stdout.splitlines() if line.startswith("training")] == [
            f"training the last {n} blocks ..." for n in (1, 2, 3)
        ]


@pytest.fixture(scope="module")
def finetuned(curriculum, workdir):
    cl = checkpoints(workdir / "cv/cl")[-1]
    result = run(
        "finetune.py", *FAKE, "--max_epochs", 1, "--cv_dir", "cv/ft", "--pretrained", f"cv/cl/{cl}", cwd=workdir
    )
    assert result.returncode == 0, result.stderr
    return result


def test_finetune(finetuned, workdir):
    lines = finetuned.stdout.strip().splitlines()
    assert [line.split(" |")[0] for line in lines if line.startswith("E:")] == ["E: 0", "E: 1"]
    assert sum(bool(re.fullmatch(rf"TS - {STATS}", line)) for line in lines) == 2
    saved = checkpoints(workdir / "cv/ft")
    ckpt = torch.load(workdir / "cv/ft" / saved[-1], weights_only=True)
    assert set(ckpt) == {"agent", "resnet", "epoch", "reward", "acc", "model"} and ckpt["epoch"] == 1
    assert "blocks.2.2.conv2.weight" in ckpt["resnet"]
    # The ResNet was trained: its weights differ from the pretrained ones.
    base = torch.load(next((workdir / "cv/pretrained/R20_C10").glob("pk_*.t7")), weights_only=True)
    assert not torch.equal(ckpt["resnet"]["fc.weight"], base["state_dict"]["fc.weight"])


def test_cl_training_loads_only_the_agent_of_a_finetuning_checkpoint(finetuned, workdir, monkeypatch):
    """As in the original: --load gives the agent and the epoch; the frozen ResNet stays the base model."""
    ft = checkpoints(workdir / "cv/ft")[-1]
    args = ["--max_epochs", 0, "--cv_dir", "cv/cl_from_ft", "--load", f"cv/ft/{ft}"]
    result = run("cl_training.py", *FAKE, *args, cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1].startswith("E: 2 |")  # the finetuning checkpoint's epoch 1, plus one
    monkeypatch.chdir(workdir)
    base, _ = utils.get_model("R20_C10")
    finetuned_rnet, agent = utils.build_model("R20_C10")
    utils.load_checkpoint(finetuned_rnet, agent, f"cv/ft/{ft}")
    digest = torch.load(workdir / "cv/cl_from_ft/last.t7", weights_only=True)["resnet_digest"]
    assert digest == utils.state_digest(base) != utils.state_digest(finetuned_rnet)


def test_finetune_sparse_is_an_opt_in(curriculum, workdir):
    cl = checkpoints(workdir / "cv/cl")[-1]
    args = ["--max_epochs", 0, "--pretrained", f"cv/cl/{cl}"]
    result = run("finetune.py", *FAKE, *args, "--cv_dir", "cv/ft_sparse", "--sparse", cwd=workdir)
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(rf"# setting learning_rate to 1.00E-04\nE: 0 \| {STATS}\nTS - {STATS}\n", result.stdout)
    assert json.loads((workdir / "cv/ft_sparse/args.json").read_text())["args"]["sparse"] is True
    both = run("finetune.py", *FAKE, *args, "--cv_dir", "cv/ft_both", "--sparse", "--dense", cwd=workdir)
    assert_one_line_error(both, "--sparse and --dense")
    assert not (workdir / "cv/ft_both").exists()


def test_test_py_on_a_finetuned_checkpoint(finetuned, workdir):
    ckpt = checkpoints(workdir / "cv/ft")[-1]
    result = run("test.py", "--model", "R20_C10", "--dummy", 48, "--load", f"cv/ft/{ckpt}", cwd=workdir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 4
    assert re.fullmatch(r"Accuracy: \d\.\d{3}", lines[0])
    assert re.fullmatch(r"Block Usage: \d+\.\d{3} \u00b1 \d+\.\d{3}", lines[1])
    assert re.fullmatch(r"FLOPs/img: \d\.\d{2}E\+\d{2} \u00b1 \d\.\d{2}E[+-]\d{2}", lines[2])
    assert re.fullmatch(r"Unique Policies: \d+", lines[3])
    # The checkpoint's accuracy on the same fake test set is what test.py reports.
    acc = re.match(r"ckpt_E_\d+_A_(\d\.\d{3})", ckpt).group(1)
    assert lines[0] == f"Accuracy: {acc}"


def test_amp_keeps_the_numbers_close(finetuned, workdir):
    ckpt = checkpoints(workdir / "cv/ft")[-1]
    lines = {}
    for amp in ([], ["--amp"]):
        result = run("test.py", "--model", "R20_C10", "--dummy", 48, "--load", f"cv/ft/{ckpt}", *amp, cwd=workdir)
        assert result.returncode == 0, result.stderr
        lines[bool(amp)] = dict(line.split(": ", 1) for line in result.stdout.strip().splitlines())
    assert abs(float(lines[True]["Accuracy"]) - float(lines[False]["Accuracy"])) <= 0.05
    blocks = [float(lines[a]["Block Usage"].split()[0]) for a in (False, True)]
    assert abs(blocks[0] - blocks[1]) <= 0.5


def test_test_py_full_network_profile(tmp_path):
    (tmp_path / "data").mkdir()
    result = run("test.py", "--model", "R110_C10", "--dummy", 8, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[1:3] == [
        "Block Usage: 54.000 \u00b1 0.000",
        "FLOPs/img: 5.30E+08 \u00b1 0.00E+00",
    ]
    assert "random weights" in result.stderr  # no pretrained file here, and it says so


def assert_one_line_error(result, text):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and text in lines[0], result.stderr


def test_bad_input_is_one_line_and_writes_nothing(curriculum, workdir):
    out = workdir / "cv/untouched"
    common = ["--model", "R20_C10", "--dummy", 16, "--cv_dir", out]
    assert_one_line_error(
        run("cl_training.py", *common, "--load", "cv/none.t7", cwd=workdir), "cv/none.t7 does not exist"
    )
    other = f"cv/cl/{checkpoints(workdir / 'cv/cl')[-1]}"
    assert_one_line_error(
        run("cl_training.py", "--model", "R32_C10", "--dummy", 16, "--cv_dir", out, "--load", other, cwd=workdir),
        "is a checkpoint of R20_C10, not of R32_C10",
    )
    assert_one_line_error(run("finetune.py", *common, "--pretrained", "cv/none.t7", cwd=workdir), "does not exist")
    assert_one_line_error(
        run("cl_training.py", "--model", "R20_C10", "--data_dir", "nowhere/", "--cv_dir", out, cwd=workdir),
        "data directory nowhere/ does not exist",
    )
    assert_one_line_error(
        run("cl_training.py", *common, "--parallel", cwd=workdir), "started by torchrun: torchrun --standalone"
    )
    assert_one_line_error(
        run("finetune.py", *common, "--load", other, cwd=workdir), "has no 'resnet': to start from a curriculum"
    )
    (workdir / "a_file").write_text("")
    assert_one_line_error(
        run("cl_training.py", *common[:4], "--max_epochs", 0, "--cv_dir", "a_file/run", cwd=workdir),
        "--cv_dir a_file/run: a_file is not a folder",
    )
    assert_one_line_error(
        run("test.py", "--model", "R20_C10", "--dummy", 4, "--batch_size", 0, cwd=workdir),
        "must be an integer in [1, 65,536]",
    )
    assert_one_line_error(
        run("pretrain.py", "--model", "R20_C10", "--epochs", -2, cwd=workdir), "must be an integer in [1, 100,000,000]"
    )
    (workdir / "garbage.t7").write_bytes(b"not a checkpoint")
    assert_one_line_error(
        run("test.py", "--model", "R20_C10", "--dummy", 4, "--load", "garbage.t7", cwd=workdir), "corrupt"
    )
    assert not out.exists()


def test_missing_pretrained_model_is_a_clear_error(tmp_path):
    (tmp_path / "data").mkdir()
    result = run("cl_training.py", "--model", "R20_FMNIST", "--cv_dir", "cv/x", cwd=tmp_path)
    assert_one_line_error(result, "pretrain.py --model R20_FMNIST")
    assert not (tmp_path / "cv").exists()
