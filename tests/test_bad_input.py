"""Bad input, as a careless user or a fuzzer gives it: one line on stderr naming the flag and what
it allows, exit code 2, nothing written."""

import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPTS = [
    "pretrain", "cl_training", "finetune", "test", "visualize", "tradeoff", "benchmark", "predict",
    "download_checkpoints",
]  # fmt: skip

# flag, bad values, the scripts that have the flag (None: every script but the downloader)
BAD_FLAGS = [
    ("--seed", ["-1", "99999999999", "1.5", "x"], None),
    ("--batch_size", ["0", "-3", "1e20", "65537", "nan"], ["pretrain", "cl_training", "finetune", "test", "visualize",
                                                          "tradeoff", "predict", "benchmark"]),
    ("--dummy", ["-1", "100000000000"], None),
    ("--subset", ["-1", "100000000001"], None),
    ("--workers", ["-1", "1e9"], None),
    ("--lr", ["inf", "-inf", "nan", "0", "-1e-3"], ["pretrain", "cl_training", "finetune"]),
    ("--wd", ["inf", "nan", "-1"], ["pretrain", "cl_training", "finetune"]),
    ("--momentum", ["inf", "nan"], ["pretrain"]),
    ("--warmup", ["inf", "nan", "-1"], ["pretrain"]),
    ("--lr_decay_ratio", ["inf", "nan", "0"], ["cl_training", "finetune"]),
    ("--beta", ["inf", "nan"], ["cl_training"]),
    ("--penalty", ["inf", "-inf", "nan"], ["cl_training", "finetune"]),
    ("--alpha", ["0.5", "1.1", "nan"], ["cl_training", "finetune"]),
    ("--max_epochs", ["-1", "1e12"], ["cl_training", "finetune"]),
    ("--epochs", ["0", "1e12"], ["pretrain"]),
    ("--dpi", ["0", "100000"], ["visualize", "tradeoff"]),
    ("--batch_sizes", ["0", "1000000000"], ["benchmark"]),
    ("--images", ["0", "1000000000"], ["benchmark"]),
    ("--timeout", ["inf", "nan", "0", "-1", "1e9"], ["download_checkpoints"]),
    ("--cv_dir", [""], ["pretrain", "cl_training", "finetune"]),
    ("--load", [""], ["pretrain", "cl_training", "finetune", "test", "visualize", "tradeoff", "benchmark", "predict"]),
    ("--out", [""], ["visualize", "tradeoff"]),
    ("--data_dir", [""], None),
    ("--dest", [""], ["download_checkpoints"]),
    ("--archive", [""], ["download_checkpoints"]),
]  # fmt: skip

REQUIRED = {"predict": ["x.png", "--model", "R20_C10"], "visualize": ["--load", "x.t7"], "tradeoff": ["--load", "x.t7"]}

CASES = [
    (script, flag, value)
    for flag, values, scripts in BAD_FLAGS
    for script in (scripts or [s for s in SCRIPTS if s != "download_checkpoints" and s != "predict"])
    for value in values
]


@pytest.mark.parametrize("script, flag, value", CASES)
def test_a_bad_flag_value_is_one_line_naming_it(script, flag, value, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    parser = importlib.import_module(script).get_args_parser()
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args([*REQUIRED.get(script, []), f"{flag}={value}"])
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.splitlines()) == 1, err
    assert err.startswith(f"{parser.prog}: error: argument {flag}") and "must be" in err, err
    assert list(tmp_path.iterdir()) == []  # nothing written


# Checkpoint contents: each mutation of a valid finetuning checkpoint, loaded by test.py and as
# cl_training.py's --load; one line, exit 2, nothing written.
def _mutations():
    nan = float("nan")
    return {
        "agent is an int": lambda c: c.update(agent=3),
        "resnet is an int": lambda c: c.update(resnet=3),
        "a weight is a string": lambda c: c["agent"].update({"logit.bias": "x"}),
        "NaN weights": lambda c: c["resnet"]["fc.weight"].fill_(nan),
        "infinite agent weights": lambda c: c["agent"]["logit.weight"].fill_(float("inf")),
        "epoch is a string": lambda c: c.update(epoch="3"),
        "epoch is NaN": lambda c: c.update(epoch=nan),
        "epoch is 10**30": lambda c: c.update(epoch=10**30),
        "epoch is negative": lambda c: c.update(epoch=-5),
        "epoch is fractional": lambda c: c.update(epoch=2.5),
        "acc is a string": lambda c: c.update(acc="high"),
        "reward is infinite": lambda c: c.update(reward=float("inf")),
        "another model": lambda c: c.update(model="R20_C100"),
    }


MUTATIONS = _mutations()


def finetuned(model="R20_C10", **extra):
    import torch

    import utils

    torch.manual_seed(0)
    rnet, agent = utils.build_model(model)
    return {"agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": 3, "reward": 0.5, "acc": 0.1, **extra}


def run_main(script, argv, capsys):
    import utils

    module = importlib.import_module(script)
    try:
        utils.run(module.main, module.get_args_parser(), [str(a) for a in argv])
        code = 0
    except SystemExit as e:
        code = e.code
    return code, *capsys.readouterr()


@pytest.mark.parametrize("mutation", MUTATIONS)
@pytest.mark.parametrize("script", ["test", "cl_training"])
def test_bad_checkpoint_contents_are_one_line(script, mutation, tmp_path, monkeypatch, capsys):
    import torch

    ckpt = finetuned(model="R20_C10")
    MUTATIONS[mutation](ckpt)
    path = tmp_path / "in" / "ckpt.t7"
    path.parent.mkdir()
    torch.save(ckpt, path)
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "R20_C10", "--dummy", 8, "--workers", 0, "--load", path]
    code, out, err = run_main(
        script, argv + (["--cv_dir", "cv/x", "--max_epochs", 0] if script != "test" else []), capsys
    )
    assert code == 2 and len(err.splitlines()) == 1, (out, err)
    assert str(path) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in"]  # nothing written


def test_a_checkpoint_that_names_its_model_is_accepted_for_it(tmp_path, monkeypatch, capsys):
    import torch

    torch.save(finetuned(model="R20_C10", model_name_unused=1) | {"model": "R20_C10"}, tmp_path / "c.t7")
    monkeypatch.chdir(tmp_path)
    code, out, err = run_main("test", ["--model", "R20_C10", "--dummy", 8, "--workers", 0, "--load", "c.t7"], capsys)
    assert code == 0 and out.startswith("Accuracy: "), err


def test_pretrain_refuses_another_model_s_base_file(tmp_path, monkeypatch, capsys):
    import utils

    rnet, _ = utils.build_model("R20_C10")
    utils.save_checkpoint(
        {"state_dict": rnet.state_dict(), "epoch": 2, "acc": 0.1, "model": "R20_C10"}, tmp_path / "pk.t7"
    )
    monkeypatch.chdir(tmp_path)
    argv = ["--model", "R20_FMNIST", "--dummy", 8, "--workers", 0, "--load", "pk.t7", "--epochs", 3]
    code, _, err = run_main("pretrain", argv, capsys)
    assert code == 2 and err.strip().endswith(": error: pk.t7 is a checkpoint of R20_C10, not of R20_FMNIST")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pk.t7"]


LAST_T7_DAMAGE = {
    "args is a string": lambda s: s.update(args="--lr 1"),
    "rng is empty": lambda s: s.update(rng={}),
    "rng is damaged": lambda s: s["rng"].update(python=(3, (1, 2), None)),
    "optimizer is empty": lambda s: s.update(optimizer={}),
    "optimizer of another network": lambda s: s["optimizer"].update(param_groups=[]),
    "epoch is a string": lambda s: s.update(epoch="one"),
    "first_epoch is negative": lambda s: s.update(first_epoch=-1),
    "NaN weights": lambda s: s["agent"]["logit.weight"].fill_(float("nan")),
}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished one-epoch finetuning run on fake data: its folder, to be damaged by each test."""
    import subprocess
    import sys

    work = tmp_path_factory.mktemp("run")
    ckpt = work / "cl.t7"
    import torch

    state = finetuned()
    del state["resnet"]
    torch.save(state, ckpt)
    cmd = [sys.executable, str(ROOT / "finetune.py"), "--model", "R20_C10", "--dummy", "8", "--workers", "0",
           "--batch_size", "4", "--max_epochs", "0", "--cv_dir", "ft", "--pretrained", str(ckpt)]  # fmt: skip
    result = subprocess.run(cmd, cwd=work, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return work


@pytest.mark.parametrize("damage", LAST_T7_DAMAGE)
def test_a_damaged_last_t7_is_one_line(damage, finished_run, tmp_path, monkeypatch, capsys):
    import shutil

    import torch

    work = tmp_path / "w"
    shutil.copytree(finished_run, work)
    state = torch.load(work / "ft" / "last.t7", weights_only=True)
    LAST_T7_DAMAGE[damage](state)
    torch.save(state, work / "ft" / "last.t7")
    before = sorted(p.relative_to(work) for p in work.rglob("*"))
    monkeypatch.chdir(work)
    argv = ["--model", "R20_C10", "--dummy", 8, "--workers", 0, "--batch_size", 4, "--max_epochs", 1, "--cv_dir", "ft",
            "--pretrained", "cl.t7", "--resume"]  # fmt: skip
    code, out, err = run_main("finetune", argv, capsys)
    assert code == 2 and len(err.splitlines()) == 1, (out, err)
    assert "last.t7" in err
    assert sorted(p.relative_to(work) for p in work.rglob("*")) == before  # nothing written


# Output paths, full disks and interrupts.
OUTPUTS = [
    ("pretrain", ["--model", "R20_C10", "--dummy", 8, "--cv_dir"]),
    ("cl_training", ["--model", "R20_C10", "--dummy", 8, "--cv_dir"]),
    ("finetune", ["--model", "R20_C10", "--dummy", 8, "--cv_dir"]),
    ("visualize", ["--model", "R20_C10", "--dummy", 8, "--load", "x.t7", "--out"]),
    ("download_checkpoints", ["--archive", "x.tar.gz", "--dest"]),
]


@pytest.mark.parametrize("script, argv", OUTPUTS)
def test_an_output_folder_that_cannot_be_written_is_refused_first(script, argv, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("in the way")
    targets = ["a_file/sub"] + (["/proc/blockdrop-test"] if Path("/proc/self").is_dir() else [])
    for target in targets:
        code, out, err = run_main(script, [*argv, target], capsys)
        assert code == 2 and len(err.splitlines()) == 1, (out, err)
        assert target in err and ("is not a folder" in err or "cannot write in" in err), err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]  # nothing written


def test_a_full_disk_leaves_no_partial_file_and_the_previous_one_intact(tmp_path, monkeypatch):
    import errno

    import torch

    import core.checkpoints
    import utils

    path = tmp_path / "ckpt.t7"
    utils.save_checkpoint({"epoch": 1}, path)

    def full_disk(obj, f):
        f.write(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(core.checkpoints.torch, "save", full_disk)
    with pytest.raises(utils.UserError, match=r"cannot write .*ckpt.t7 \(No space left on device; \d+ MB free there\)"):
        utils.save_checkpoint({"epoch": 2}, path)
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.t7"]  # no .tmp left
    assert torch.load(path, weights_only=True) == {"epoch": 1}


def test_ctrl_c_is_one_line_and_exit_code_130(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    cmd = [sys.executable, str(ROOT / "pretrain.py"), "--model", "R20_C10", "--dummy", "64", "--workers", "0",
           "--batch_size", "8", "--epochs", "1000", "--cv_dir", "run"]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not (tmp_path / "run" / "last.t7").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip() and "random weights" not in line]
    assert len(lines) == 1 and "interrupted" in lines[0] and "--resume" in lines[0], err
    assert not list((tmp_path / "run").glob("*.tmp"))


def test_sizes_must_fit_in_half_the_memory(tmp_path, monkeypatch, capsys):
    import core.cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(core.cli, "memory_bytes", lambda: 2 * 2**20)  # a machine of 2 MiB
    code, _, err = run_main("test", ["--model", "R20_C10", "--dummy", 100, "--workers", 0], capsys)
    assert code == 2 and len([line for line in err.splitlines() if "error:" in line]) == 1
    assert "--dummy 100: the fake images take" in err and "more than half of this machine's" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "error", [MemoryError(), RuntimeError("[enforce fail] DefaultCPUAllocator: can't allocate memory")]
)
def test_running_out_of_memory_is_one_line(error, capsys):
    import utils

    def main(args):
        raise error

    with pytest.raises(SystemExit) as exit_info:
        utils.run(main, utils.ArgumentParser(prog="x.py"), [])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.startswith("x.py: error: out of memory")
