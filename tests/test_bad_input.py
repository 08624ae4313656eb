"""Bad input, as a careless user or a fuzzer gives it: one line on stderr naming the flag and what
it allows, exit code 2, nothing written."""

import importlib

import pytest

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
