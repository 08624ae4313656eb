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
    assert code == 2 and len(err.splitlines()) == 1
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
