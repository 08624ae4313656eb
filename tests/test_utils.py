"""Rewards, curriculum, statistics, checkpoints, data and argument checks."""

import gzip
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import core.data
import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_reward_values():
    preds = torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, 1.0]])  # predicts 1, 0, 1
    targets = torch.tensor([1, 0, 0])
    policy = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [0, 0, 0, 0.0]])
    reward, match = utils.get_reward(preds, targets, policy, penalty=-5)
    assert torch.allclose(reward, torch.tensor([1 - 0.5**2, 0.0, -5.0]))
    assert match.tolist() == [1.0, 1.0, 0.0]


def test_curriculum_blocks_and_mask():
    assert [utils.curriculum_blocks(e, 4) for e in range(6)] == [1, 2, 3, 4, 4, 4]
    # --cl_step is the original's switch: any value below K runs the same curriculum ...
    for cl_step in (1, 2, 3):
        assert [utils.curriculum_blocks(e, 4, cl_step) for e in range(6)] == [1, 2, 3, 4, 4, 4]
    # ... K or more decides every block from the first epoch (also after a resumed start).
    for cl_step in (4, 9):
        assert [utils.curriculum_blocks(e, 4, cl_step) for e in (0, 1, 7)] == [4, 4, 4]
    assert utils.curriculum_blocks(5, 54) == 6  # --load at epoch 5 continues the curriculum where it was
    assert utils.curriculum_mask(5, 2).tolist() == [False, False, False, True, True]
    assert utils.curriculum_mask(3, 3).all()


def test_sample_policy_bounds_the_probabilities():
    probs = torch.tensor([[0.0, 0.5, 1.0]])
    policy_map, policy, distr = utils.sample_policy(probs, alpha=0.8)
    assert policy_map.tolist() == [[0.0, 1.0, 1.0]]
    assert torch.allclose(distr.probs, torch.tensor([[0.2, 0.5, 0.8]]))
    assert set(policy.unique().tolist()) <= {0.0, 1.0}


def test_performance_stats():
    policies = [torch.tensor([[1, 0, 1], [1, 1, 1.0]]), torch.tensor([[1, 0, 1.0]])]
    rewards = [torch.tensor([0.5, -1.0]), torch.tensor([0.2])]
    matches = [torch.tensor([1.0, 0.0]), torch.tensor([1.0])]
    acc, reward, sparsity, variance, policy_set = utils.performance_stats(policies, rewards, matches)
    assert acc == pytest.approx(2 / 3)
    assert reward == pytest.approx(-0.1)
    assert sparsity == pytest.approx(7 / 3)
    assert variance == pytest.approx(np.std([2, 3, 2], ddof=1))
    assert policy_set == {"101", "111"}
    line = utils.stats_line("TS - ", (0.9361, 0.195, 16.9333, 3.717, policy_set))
    assert line == "TS - A: 0.936 | R: 1.95E-01 | S: 16.933 | V: 3.717 | #: 2"


def test_checkpoint_round_trip_and_name(tmp_path):
    rnet, agent = utils.build_model("R20_FMNIST")
    stats = (0.9361, 0.1949, 16.933, 3.7, {"1", "0", "2"})
    path = utils.checkpoint_path(tmp_path / "run", 2000, stats)
    assert path.name == "ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_3.t7"
    utils.save_checkpoint(
        {"agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": 2000, "reward": stats[1], "acc": stats[0]},
        path,
    )
    assert os.listdir(tmp_path / "run") == [path.name]  # no temporary file left
    rnet2, agent2 = utils.build_model("R20_FMNIST")
    ckpt = utils.load_checkpoint(rnet2, agent2, path)
    assert ckpt["epoch"] == 2000 and ckpt["acc"] == pytest.approx(0.9361)
    for a, b in ((rnet, rnet2), (agent, agent2)):
        for (k, v), (k2, v2) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert k == k2 and torch.equal(v, v2)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    rnet, agent = utils.build_model("R32_C10")
    path = tmp_path / "c.t7"
    utils.save_checkpoint({"agent": agent.state_dict(), "epoch": 0, "reward": 0.0, "acc": 0.0}, path)
    rnet2, agent2 = utils.build_model("R110_C10")
    with pytest.raises(utils.UserError, match="15 blocks; this model has 54"):
        utils.load_checkpoint(rnet2, agent2, path)
    _, agent3 = utils.build_model("R32_C100")
    rnet3 = utils.build_model("R32_C100")[0]
    utils.save_checkpoint({"agent": agent3.state_dict(), "resnet": rnet3.state_dict(), "epoch": 0}, path)
    with pytest.raises(utils.UserError, match="100 classes"):
        utils.load_checkpoint(*utils.build_model("R32_C10"), path)


def test_pretrained_lookup_takes_the_newest_file(tmp_path):
    folder = tmp_path / "R20_FMNIST"
    folder.mkdir()
    for age, name in enumerate(["pk_E_30_A_0.900.t7", "pk_E_2_A_0.700.t7", "other.t7"]):
        (folder / name).write_bytes(b"")
        os.utime(folder / name, (1000 + age, 1000 + age))
    assert utils.find_pretrained("R20_FMNIST", tmp_path).name == "pk_E_2_A_0.700.t7"
    assert utils.find_pretrained("R32_FMNIST", tmp_path) is None
    with pytest.raises(utils.UserError, match="pretrain.py --model R32_FMNIST"):
        utils.load_pretrained_rnet(utils.build_model("R32_FMNIST")[0], "R32_FMNIST", tmp_path)


def test_transforms_keep_the_r32_c10_normalisation_quirk():
    from PIL import Image

    img = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    _, plain = utils.get_transforms("R110_C10", "C10")
    _, normed = utils.get_transforms("R32_C10", "C10")
    assert torch.allclose(plain(img), torch.ones(3, 32, 32))
    assert torch.allclose(normed(img)[0], torch.full((32, 32), (1 - 125.3 / 255) / (63.0 / 255)), atol=1e-5)
    grey = Image.fromarray(np.zeros((28, 28), dtype=np.uint8), mode="L")
    train, test = utils.get_transforms("R20_FMNIST", "FMNIST")
    assert test(grey).shape == (3, 32, 32) and train(grey).shape == (3, 32, 32)


def test_transforms_take_the_originals_depth_spelling_and_the_whole_name():
    """The original calls get_transforms('R32', 'C10'): the same transforms as 'R32_C10'."""
    from PIL import Image

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    for depth, dset in [("R32", "C10"), ("R110", "C10"), ("R32", "C100"), ("R20", "FMNIST"), ("R101", "ImgNet")]:
        short, whole = utils.get_transforms(depth, dset), utils.get_transforms(f"{depth}_{dset}", dset)
        torch.manual_seed(1)
        a = [t(img) for t in short]
        torch.manual_seed(1)
        b = [t(img) for t in whole]
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)), (depth, dset)
    # The R32_C10 quirk holds for the short spelling: normalised, unlike R110_C10.
    white = Image.fromarray(np.full((32, 32, 3), 255, dtype=np.uint8))
    assert torch.allclose(
        utils.get_transforms("R32", "C10")[1](white)[0], torch.full((32, 32), (255 - 125.3) / 63.0), atol=1e-5
    )
    assert torch.equal(utils.get_transforms("R110", "C10")[1](white), torch.ones(3, 32, 32))


@pytest.mark.parametrize(
    "rnet, dset, message",
    [
        ("R33", "C10", "unknown ResNet 'R33' for dataset C10; valid: R20, R32, R44, R56, R110"),
        ("R101", "C10", "valid: R20, R32, R44, R56, R110"),
        ("R32_C100", "C10", "unknown ResNet 'R32_C100' for dataset C10"),
        ("R32", "C11", "unknown dataset 'C11'; valid datasets: C10, C100, FMNIST, ImgNet"),
        ("R32", "ImgNet", "valid: R18, R34, R50, R101, R152"),
    ],
)
def test_transforms_of_unknown_names_are_errors_naming_the_valid_ones(rnet, dset, message):
    with pytest.raises(utils.UserError, match=re.escape(message)):
        utils.get_transforms(rnet, dset)


def test_public_api_takes_the_originals_argument_names(tmp_path):
    """User code written for the original passes these by keyword; 'nil' loads nothing."""
    from models.base import DownsampleB

    assert DownsampleB(nIn=16, nOut=32, stride=2).expand_ratio == 2
    rnet, agent = utils.build_model("R20_C10")
    other, _ = utils.build_model("R20_C10")
    utils.load_weights_to_flatresnet(source_model={"state_dict": other.state_dict()}, target_model=rnet)
    assert torch.equal(rnet.fc.weight, other.fc.weight)
    assert utils.load_checkpoint(rnet, agent, load="nil") is None
    assert torch.equal(rnet.fc.weight, other.fc.weight)
    _, _, ckpt = utils.models_for_run("R20_C10", "nil", dummy=True)  # no checkpoint, as with None
    assert ckpt == {}


def write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_from_idx_files(tmp_path, monkeypatch):
    folder = tmp_path / "fashion-mnist"
    folder.mkdir()
    images = np.random.randint(0, 255, (7, 28, 28))
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", np.arange(7) % 10)
    monkeypatch.setattr(core.data, "FASHION_MNIST_DIR", tmp_path / "absent")
    train, test = utils.get_dataset("R20_FMNIST", str(tmp_path))
    assert len(train) == len(test) == 7
    x, y = test[3]
    assert x.shape == (3, 32, 32) and y == 3
    raw = torch.tensor(images[3], dtype=torch.float32) / 255
    assert torch.allclose(x[1, 2:30, 2:30], (raw - 0.286) / 0.353, atol=1e-5)  # padded by 2, grey repeated


def test_missing_data_is_a_clear_error(tmp_path):
    with pytest.raises(utils.UserError, match="does not exist"):
        utils.get_dataset("R110_C10", str(tmp_path / "absent"))
    with pytest.raises(utils.UserError, match="train/ and val/"):
        utils.get_dataset("R101_ImgNet", str(tmp_path))
    (tmp_path / "train").mkdir()
    (tmp_path / "val").mkdir()
    with pytest.raises(utils.UserError, match="holds no class folders"):
        utils.get_dataset("R101_ImgNet", str(tmp_path))


def test_batched_evaluation_equals_one_image_at_a_time():
    rnet, agent = utils.build_model("R20_C10")
    rnet.eval(), agent.eval()
    data = TensorDataset(torch.randn(24, 3, 32, 32), torch.randint(0, 10, (24,)))
    # Large, centred logits make the greedy policies differ between images.
    with torch.no_grad():
        agent.logit.weight.mul_(100)
        feats = agent.features.forward_full(data.tensors[0])  # (24, 64)
        agent.logit.bias.copy_(-agent.logit.weight @ feats.mean(0))
    policies, rewards, matches = utils.evaluate(
        rnet, agent, DataLoader(data, batch_size=8), utils.Runtime(torch.device("cpu")), -1.0
    )
    assert len(policies.unique(dim=0)) > 1
    with torch.no_grad():
        for i in range(24):
            x, y = data[i]
            p = utils.greedy_policy(agent, x[None])[0]
            assert torch.equal(p, policies[i])
            assert float(rnet.forward_single(x[None], p).argmax(1).item() == y) == matches[i].item()


def run_script(*args, cwd=ROOT):
    return subprocess.run([sys.executable, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--batch_size", "-3"], "argument --batch_size: must be an integer in [1, 65,536], got '-3'"),
        (["--max_epochs", "-1"], "argument --max_epochs: must be an integer in [0, 100,000,000], got '-1'"),
        (["--model", "R7_C10"], "unknown model 'R7_C10'; valid models: R20_C10"),
    ],
)
def test_bad_arguments_are_one_line_and_exit_code_2(args, message, tmp_path):
    result = run_script(os.path.join(ROOT, "cl_training.py"), "--cv_dir", str(tmp_path / "out"), *args)
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert message in result.stderr
    assert not (tmp_path / "out").exists()
