"""benchmark.py: the figures it prints are the ones it measured, in a table and as JSON."""

import json

import pytest
import torch

import benchmark
import utils


def run_benchmark(capsys, *args):
    info = utils.run(benchmark.main, benchmark.get_args_parser(), [str(a) for a in args])
    return info, capsys.readouterr().out


FAST = ["--model", "R20_C10", "--device", "cpu", "--repeats", 1, "--warmup", 0, "--images", 8]


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_flops_ratio_at_the_extreme_keep_rates(keep, capsys):
    info, out = run_benchmark(capsys, *FAST, "--keep_rate", keep, "--batch_sizes", 1, 8, "--json")
    data = json.loads(out)
    assert data["results"] == info["results"] and [r["batch_size"] for r in data["results"]] == [1, 8]
    assert data["blocks_per_image"] == 9 * keep
    rnet, _ = utils.build_model("R20_C10")
    base, per_block = utils.block_flops(rnet, (3, 32, 32))
    assert data["flops_full"] == pytest.approx(base + per_block.sum().item())
    assert data["flops_blockdrop"] == pytest.approx(base + keep * per_block.sum().item())
    for row in data["results"]:
        assert row["images"] == 8 and row["full_images_per_s"] > 0 and row["blockdrop_images_per_s"] > 0
        assert row["flops_ratio"] == pytest.approx(data["flops_full"] / data["flops_blockdrop"])
        assert row["speedup"] == pytest.approx(row["blockdrop_images_per_s"] / row["full_images_per_s"])
        assert row["speedup_over_flops_ratio"] == pytest.approx(row["speedup"] / row["flops_ratio"])


def test_table_with_the_masked_form_and_a_checkpoint_agent(tmp_path, capsys):
    rnet, agent = utils.build_model("R20_C10")
    with torch.no_grad():
        agent.logit.weight.zero_()
        agent.logit.bias.copy_(torch.tensor([5.0, -5, 5, -5, 5, -5, 5, -5, 5]))  # keeps 5 of 9 blocks
    utils.save_checkpoint({"agent": agent.state_dict(), "resnet": rnet.state_dict()}, tmp_path / "c.t7")
    info, out = run_benchmark(capsys, *FAST, "--load", tmp_path / "c.t7", "--dummy", 8, "--masked")
    assert info["blocks_per_image"] == 5 and info["unique_policies"] == 1
    lines = out.strip().splitlines()
    assert lines[0].startswith("R20_C10 on cpu (") and "fp32" in lines[0]
    assert "greedy policies of" in lines[1] and "5.0 of 9 blocks per image" in lines[1]
    assert (
        lines[2].split()
        == "batch images full img/s BlockDrop img/s masked img/s FLOPs ratio speed-up speed-up/FLOPs ratio".split()
    )
    assert [line.split()[0] for line in lines[3:]] == ["1", "256"]
    # The policy network is counted on BlockDrop's side; blocks 1, 3, 5 and 7 are not.
    per_block = utils.block_flops(rnet, (3, 32, 32))[1]
    dropped = per_block[[1, 3, 5, 7]].sum().item()
    expected = info["flops_full"] - dropped + utils.policy_flops(agent, (3, 32, 32))
    assert info["flops_blockdrop"] == pytest.approx(expected)


def test_training_epochs_sparse_and_masked(capsys):
    info, out = run_benchmark(capsys, *FAST, "--training", "--dummy", 32, "--batch_size", 16, "--workers", 0)
    assert [r["stage"] for r in info["results"]] == ["curriculum", "finetune"]
    for row in info["results"]:
        assert row["images"] == 32 and row["sparse"]["images_per_s"] > 0 and row["masked"]["images_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["sparse"]["images_per_s"] / row["masked"]["images_per_s"])
    assert "curriculum" in out and "finetune" in out


def test_bad_combinations_are_one_line_errors(capsys):
    for args, message in [
        (["--load", "x.t7", "--keep_rate", 0.5], "with --load the checkpoint's agent chooses them"),
        (["--precision", "fp16"], "--precision fp16 needs CUDA"),
        (["--training"], "--training runs on fake data"),
        (["--training", "--dummy", 8, "--channels_last"], "it takes no --channels_last"),
        (["--training", "--dummy", 8, "--masked"], "it takes no --masked"),
    ]:
        with pytest.raises(SystemExit) as e:
            run_benchmark(capsys, *FAST, *args)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and message in err


def test_imagenet_style_models_are_timed_beside_torchvision_s_resnet(capsys):
    args = ["--model", "R18_ImgNet", "--device", "cpu", "--repeats", 1, "--warmup", 0, "--images", 2]
    info, out = run_benchmark(capsys, *args, "--batch_sizes", 1, 2)
    assert "full/torchvision" in out.splitlines()[2] and "speed-up vs torchvision" in out.splitlines()[2]
    for row in info["results"]:
        assert row["torchvision_images_per_s"] > 0
        assert row["full_over_torchvision"] == pytest.approx(row["full_images_per_s"] / row["torchvision_images_per_s"])
        assert row["speedup_over_torchvision"] == pytest.approx(
            row["blockdrop_images_per_s"] / row["torchvision_images_per_s"]
        )
    info, out = run_benchmark(capsys, *FAST, "--batch_sizes", 1)  # CIFAR-style: torchvision has no twin
    assert "torchvision" not in out and "torchvision_images_per_s" not in info["results"][0]
