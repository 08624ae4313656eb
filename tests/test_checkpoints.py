"""Every kind of file in the authors' tarball loads strictly into the right model; unsafe files do not.

The files are written as Python 2.7 + PyTorch 0.3 wrote them (tests/legacy.py): legacy non-zip
format, Python 2 byte strings, OrderedDict state dicts without ``num_batches_tracked``, tensors
tagged ``cuda:0``.
"""

import argparse
import ast
import importlib.util
import io
import os
import pickle
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from legacy import Py2Pickler, save_py2_torch03, torch03_state_dict

import core.models
import utils

ROOT = Path(__file__).resolve().parent.parent
FINETUNED_R110 = "cv/finetuned/R110_C10_gamma_10/ckpt_E_2000_A_0.936_R_1.95E-01_S_16.93_#_469.t7"


def assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(sa[key], sb[key]), key


def randomized(module: torch.nn.Module) -> torch.nn.Module:
    """Random values everywhere, BatchNorm statistics included, so a wrong mapping cannot pass."""
    with torch.no_grad():
        for value in module.state_dict().values():
            if value.is_floating_point():
                value.copy_(torch.rand_like(value) + 0.5)
    return module


def released_base_model(model: str) -> tuple[torch.nn.Module, dict]:
    """A base CIFAR ResNet as the other training code saved it (``module.``, ``layer<N>``, ``args``)."""
    src = randomized(utils.build_model(model)[0])
    return src, {
        "args": argparse.Namespace(depth=int(model[1:].split("_")[0]), dataset="cifar10", save="r\u00e9sultats"),
        "state_dict": torch03_state_dict(src.state_dict(), prefix="module.", layer_names=True),
        "epoch": 163,  # the file name says 164: the stored epoch need not match
        "best_epoch": 160,
        "arch": "resnet",
        "best_err1": 7.7,
    }


@pytest.mark.filterwarnings("ignore:pickle_load_args")
def test_the_fixture_writes_what_pytorch_0_3_wrote(tmp_path):
    """The legacy file really needs map_location (cuda:0 tags) and encoding='latin1' (Python 2 strings)."""
    _, content = released_base_model("R32_C10")
    save_py2_torch03(content, tmp_path / "f.t7")
    head = (tmp_path / "f.t7").read_bytes()[:2]
    assert head == b"\x80\x02"  # a bare protocol-2 pickle stream, not a zip archive
    with torch.serialization.safe_globals([argparse.Namespace]):
        with pytest.raises(Exception, match="(?i)cuda"):
            torch.load(tmp_path / "f.t7", weights_only=True, encoding="latin1")  # no map_location
        with pytest.raises(Exception, match="(?i)decode"):
            torch.load(tmp_path / "f.t7", map_location="cpu", weights_only=True)  # no latin1
    obj = utils.load_file(tmp_path / "f.t7")
    assert type(obj["state_dict"]) is OrderedDict and obj["args"].depth == 32
    assert obj["args"].save == "r\u00e9sultats" and obj["epoch"] == 163


@pytest.mark.parametrize("model", list(utils.RELEASED_BASE_FILES)[:4])
def test_released_cifar_base_models_are_found_and_loaded_strictly(model, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src, content = released_base_model(model)
    path = Path("cv/pretrained") / model / utils.RELEASED_BASE_FILES[model]
    path.parent.mkdir(parents=True)
    save_py2_torch03(content, path)
    # A newer file of pretrain.py's in the same folder does not shadow the released one.
    utils.save_checkpoint({"state_dict": utils.build_model(model)[0].state_dict()}, path.parent / "pk_E_1_A_0.1.t7")
    rnet, _ = utils.get_model(model)
    assert_same_weights(rnet, src)
    assert utils.find_pretrained(model) == path


# The base models this project ships (cv/README.md): the epochs they were trained for, their least
# accuracy on the 10,000 test images.
SHIPPED_BASES = [("R32_FMNIST", 40, 0.93), ("R110_FMNIST", 30, 0.94)]


@pytest.mark.parametrize("model, epochs, accuracy", SHIPPED_BASES)
def test_shipped_fashion_mnist_base_models_are_found_with_no_flag(model, epochs, accuracy, monkeypatch):
    """The repository's own base models: plain weights-only files that get_model loads strictly."""
    monkeypatch.chdir(ROOT)
    (path,) = Path("cv/pretrained", model).glob(f"pk_E_{epochs}_A_*.t7")
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    assert set(ckpt) == {"state_dict", "epoch", "acc", "model"} and ckpt["model"] == model
    assert path.name == f"pk_E_{ckpt['epoch']}_A_{ckpt['acc']:.3f}.t7" and ckpt["acc"] >= accuracy
    assert all(v.dtype in (torch.float32, torch.int64) for v in ckpt["state_dict"].values())
    rnet, _ = utils.get_model(model)  # strict loading
    assert all(torch.equal(v, rnet.state_dict()[k]) for k, v in ckpt["state_dict"].items())


TEST_SLICE = ROOT / "tests" / "data"


def fashion_mnist_test_slice(model: str) -> utils.IdxImages:
    """The first 1,000 of Fashion-MNIST's 10,000 test images (tests/data/), with the model's test transform."""
    spec = utils.model_spec(model)
    _, transform = utils.get_transforms(spec.name, spec.dataset)
    return utils.IdxImages(
        TEST_SLICE / "t10k-first1000-images-idx3-ubyte.gz",
        TEST_SLICE / "t10k-first1000-labels-idx1-ubyte.gz",
        transform,
    )


def test_the_test_slice_is_the_start_of_the_fashion_mnist_test_set():
    full = Path(utils.FASHION_MNIST_DIR)
    if not (full / "t10k-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian's dataset-fashion-mnist is not installed")
    part = fashion_mnist_test_slice("R32_FMNIST")
    whole = utils.IdxImages(full / "t10k-images-idx3-ubyte.gz", full / "t10k-labels-idx1-ubyte.gz")
    assert len(part) == 1000
    assert np.array_equal(part.images, whole.images[:1000]) and np.array_equal(part.targets, whole.targets[:1000])


# The shipped BlockDrop models (cv/README.md) with their figures on the first 1,000 test images, as
# measured when they were shipped: accuracy and mean blocks used, greedy policies.
SHIPPED_BLOCKDROP = [
    ("R32_FMNIST", "cv/finetuned/R32_FMNIST_gamma_1/ckpt_E_10_A_0.934_R_6.65E-01_S_7.00_#_1.t7", 0.949, 7.0),
    ("R110_FMNIST", "cv/finetuned/R110_FMNIST_gamma_5/ckpt_E_7_A_0.929_R_4.84E-01_S_16.73_#_21.t7", 0.938, 16.734),
]


@pytest.mark.parametrize("model, path, accuracy, blocks", SHIPPED_BLOCKDROP)
def test_shipped_blockdrop_models_give_their_recorded_figures(model, path, accuracy, blocks, monkeypatch):
    monkeypatch.chdir(ROOT)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    # The original's keys; the later one also records its model, as every checkpoint written here does.
    assert set(ckpt) - {"model"} == {"agent", "resnet", "epoch", "reward", "acc"} and ckpt.get("model", model) == model
    assert all(v.dtype in (torch.float32, torch.int64) for key in ("agent", "resnet") for v in ckpt[key].values())
    assert f"_A_{ckpt['acc']:.3f}_" in path  # the full test set's accuracy, in the original's file name
    rnet, agent, _ = utils.models_for_run(model, path, init_agent=False)  # strict loading
    cpu = torch.device("cpu")
    loader = utils.make_loader(fashion_mnist_test_slice(model), 500, False, 0, cpu)
    measured, used, *_ = utils.profile(rnet, agent, loader, utils.Runtime(cpu), utils.model_spec(model).input_size)
    assert measured == pytest.approx(accuracy, abs=0.0015)  # one image either way
    assert used == pytest.approx(blocks, abs=0.01)


def test_released_imagenet_base_model_in_torchvision_naming(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with torch.device("meta"):
        names = torchvision.models.resnet101().state_dict()
    state = OrderedDict((k, torch.randn(v.shape)) for k, v in names.items() if not k.endswith("num_batches_tracked"))
    path = Path("cv/pretrained/R101_ImgNet/ImageNet_R101_224_76.464")
    path.parent.mkdir(parents=True)
    save_py2_torch03({"state_dict": state}, path)
    resnet18 = torchvision.models.resnet18().state_dict()
    monkeypatch.setattr(core.models, "_torchvision_weights", lambda arch: {"resnet18": resnet18}[arch])
    rnet, agent = utils.get_model("R101_ImgNet")  # the ResNet from the file, the agent from ResNet-18
    assert torch.equal(rnet.blocks[2][22].conv3.weight, state["layer3.22.conv3.weight"])
    assert torch.equal(rnet.ds[3][1].running_var, state["layer4.0.downsample.1.running_var"])
    assert torch.equal(rnet.fc.bias, state["fc.bias"])
    assert torch.equal(agent.features.conv1.weight, resnet18["conv1.weight"])
    assert torch.equal(agent.features.blocks[3][0].conv2.weight, resnet18["layer4.0.conv2.weight"])


@pytest.mark.parametrize(
    "model, key, number, prefix",
    [
        ("R110_C10", "agent", float, ""),  # finetuned: agent + resnet, plain floats
        ("R110_C10", "net", torch.tensor, ""),  # old curriculum file: agent under `net`, with features.fc.*
        ("R32_C10", "net", torch.tensor, "module."),  # saved from DataParallel, epoch a tensor too
        ("R32_C100", "agent", lambda v: torch.tensor([v]), "module."),  # 1-element tensors
        ("R101_ImgNet", "net", torch.tensor, ""),
    ],
)
def test_blockdrop_checkpoints_in_every_released_shape(model, key, number, prefix, tmp_path):
    rnet_src, agent_src = (randomized(m) for m in utils.build_model(model))
    agent_state = torch03_state_dict(agent_src.state_dict(), prefix=prefix)
    if key == "net":
        fc_in = agent_src.features.blocks[-1][-1].bn2.num_features
        agent_state[prefix + "features.fc.weight"] = torch.randn(1000 if "ImgNet" in model else 10, fc_in)
        agent_state[prefix + "features.fc.bias"] = torch.randn(agent_state[prefix + "features.fc.weight"].shape[0])
    epoch = torch.tensor(2000) if prefix else 2000
    content = {key: agent_state, "epoch": epoch, "reward": number(0.195), "acc": number(0.936)}
    with_resnet = key == "agent"
    if with_resnet:
        content["resnet"] = torch03_state_dict(rnet_src.state_dict(), prefix=prefix)
    save_py2_torch03(content, tmp_path / "ckpt.t7")
    rnet, agent = utils.build_model(model)
    before = rnet.fc.weight.clone()
    ckpt = utils.load_checkpoint(rnet, agent, tmp_path / "ckpt.t7")
    assert_same_weights(agent, agent_src)
    if with_resnet:
        assert_same_weights(rnet, rnet_src)
    else:
        assert torch.equal(rnet.fc.weight, before)
    assert ckpt["epoch"] == 2000 and type(ckpt["epoch"]) is int
    assert ckpt["acc"] == pytest.approx(0.936) and type(ckpt["acc"]) is float
    assert ckpt["reward"] == pytest.approx(0.195) and type(ckpt["reward"]) is float


def write_fake_cifar10(root: Path, n_test: int = 24) -> tuple[np.ndarray, list[int]]:
    """torchvision's cifar-10-batches-py layout with a few random images (no download)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    data = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        images = rng.integers(0, 256, size=(n_test, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_test)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": images, "labels": labels}, f)
        data[name] = (images, labels)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)
    return data["test_batch"]


def test_test_py_on_the_released_r110_checkpoint_as_the_readme_writes_it(tmp_path, monkeypatch, capsys):
    """`python test.py --model R110_C10 --load cv/finetuned/...#_469.t7`, word for word, after the download."""
    monkeypatch.chdir(tmp_path)
    rnet_src, agent_src = (randomized(m) for m in utils.build_model("R110_C10"))
    keep = torch.zeros(54, dtype=torch.bool)
    keep[torch.randperm(54)[:17]] = True
    with torch.no_grad():  # a policy network that keeps the same 17 blocks for every image
        agent_src.logit.weight.zero_()
        agent_src.logit.bias.copy_(torch.where(keep, 20.0, -20.0))
    path = Path(FINETUNED_R110)
    path.parent.mkdir(parents=True)
    save_py2_torch03(
        {
            "agent": torch03_state_dict(agent_src.state_dict()),
            "resnet": torch03_state_dict(rnet_src.state_dict()),
            "epoch": 2000,
            "reward": 0.195,
            "acc": 0.936,
        },
        path,
    )
    base_src, base = released_base_model("R110_C10")
    (tmp_path / "cv/pretrained/R110_C10").mkdir(parents=True)
    save_py2_torch03(base, tmp_path / "cv/pretrained/R110_C10/pk_E_130_A_0.932.t7")
    images, labels = write_fake_cifar10(tmp_path / "data")
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)  # no MD5s to match

    spec = importlib.util.spec_from_file_location("blockdrop_test_py", ROOT / "test.py")
    test_py = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(test_py)
    utils.run(test_py.main, test_py.get_args_parser(), ["--model", "R110_C10", "--load", FINETUNED_R110])
    lines = capsys.readouterr().out.strip().splitlines()

    # The same figures computed another way: the finetuned ResNet (not the base one), one image at a time.
    rnet_src.eval()
    _, transform = utils.get_transforms("R110_C10", "C10")
    policy = keep.float()[None]
    correct = 0
    with torch.no_grad():
        for image, label in zip(images.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels, strict=True):
            x = transform(torchvision.transforms.functional.to_pil_image(image))[None]
            correct += int(rnet_src.forward_single(x, policy).argmax(1).item() == label)
        x = torch.zeros(1, 3, 32, 32)
        flops = utils.count_flops(lambda: rnet_src.forward_single(x, policy)) + utils.policy_flops(
            agent_src, (3, 32, 32)
        )
    assert lines == [
        f"Accuracy: {correct / len(labels):.3f}",
        "Block Usage: 17.000 \u00b1 0.000",
        f"FLOPs/img: {flops:.2E} \u00b1 0.00E+00",
        "Unique Policies: 1",
    ]


class Payload:
    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def malicious_files(folder: Path) -> list[Path]:
    """A checkpoint whose unpickling would run a shell command, in every format torch.load reads."""
    _, agent = utils.build_model("R20_C10")
    content = {"agent": agent.state_dict(), "epoch": 0, "hook": Payload()}
    paths = []
    for protocol in (0, 2, 4):
        paths.append(folder / f"pickle{protocol}.t7")
        with open(paths[-1], "wb") as f:
            pickle.dump(content, f, protocol=protocol)
    paths.append(folder / "zip.t7")
    torch.save(content, paths[-1])
    paths.append(folder / "legacy.t7")
    torch.save(content, paths[-1], _use_new_zipfile_serialization=False)
    paths.append(folder / "py2.t7")
    save_py2_torch03(content, paths[-1])
    buf = io.BytesIO()
    Py2Pickler(buf).dump(Payload())
    paths.append(folder / "bare.t7")
    paths[-1].write_bytes(buf.getvalue())
    return paths


def test_checkpoints_that_would_run_code_are_refused_and_nothing_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for path in malicious_files(tmp_path):
        with pytest.raises(utils.UserError, match=f"refused to load {path}|{path} cannot be read") as e:
            utils.load_checkpoint(*utils.build_model("R20_C10"), path)
        assert "\n" not in str(e.value)
        assert not (tmp_path / "PWNED").exists(), path.name
    # Where the unpickler reaches the shell command, the message names what it refused.
    for name in ("zip.t7", "legacy.t7", "py2.t7", "bare.t7"):
        with pytest.raises(utils.UserError, match=r"refused to load .*it would import code.*GLOBAL posix.system"):
            utils.load_file(tmp_path / name)


def run_test_py(*args, cwd):
    return subprocess.run(
        [sys.executable, str(ROOT / "test.py"), "--model", "R20_C10", "--dummy", "4", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_test_py_refuses_unsafe_corrupt_and_foreign_files_in_one_line(tmp_path):
    (tmp_path / "evil").mkdir()
    evil = malicious_files(tmp_path / "evil")[-2]  # the Python 2 / PyTorch 0.3 one
    rnet, agent = utils.build_model("R20_C10")
    good = tmp_path / "good.t7"
    save_py2_torch03({"agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": 1, "acc": 0.1}, good)
    data = good.read_bytes()
    (tmp_path / "cut.t7").write_bytes(data[: len(data) // 2])
    (tmp_path / "noise.t7").write_bytes(os.urandom(4096))
    other_rnet, other_agent = utils.build_model("R32_C10")
    save_py2_torch03({"agent": other_agent.state_dict(), "resnet": other_rnet.state_dict()}, tmp_path / "r32.t7")
    save_py2_torch03(
        {"agent": agent.state_dict(), "resnet": utils.build_model("R20_C100")[0].state_dict()}, tmp_path / "c100.t7"
    )
    cases = [
        (evil, "refused to load"),
        ("cut.t7", "corrupt, truncated or not a checkpoint"),
        ("noise.t7", "corrupt, truncated or not a checkpoint"),
        ("r32.t7", "holds a policy for 15 blocks; this model has 9 blocks"),
        ("missing.t7", "checkpoint missing.t7 does not exist"),
        ("c100.t7", "they hold blocks [3, 3, 3], 100 classes, the network has blocks [3, 3, 3], 10 classes"),
    ]
    for name, message in cases:
        result = run_test_py("--load", str(name), cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert message in result.stderr
        assert result.stdout == ""
    assert not (tmp_path / "PWNED").exists()
    assert run_test_py("--load", "good.t7", cwd=tmp_path).returncode == 0


def unpickling_calls(tree: ast.AST):
    """Calls that unpickle a file: torch.load, torch.hub's loader, torchvision's get_state_dict."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            name = ast.unparse(node.func)
            if name in ("torch.load", "torch.hub.load_state_dict_from_url") or node.func.attr == "get_state_dict":
                yield name, node


def test_no_code_path_loads_with_weights_only_false():
    sources = [p for p in ROOT.rglob("*.py") if not {".venv", "tests"} & set(p.relative_to(ROOT).parts)]
    found = []
    for path in sources:
        text = path.read_text()
        assert "weights_only=False" not in text, path
        for name, call in unpickling_calls(ast.parse(text)):
            keywords = {k.arg: k.value for k in call.keywords}
            assert isinstance(keywords.get("weights_only"), ast.Constant), f"{path}:{call.lineno} {name}"
            assert keywords["weights_only"].value is True, f"{path}:{call.lineno} {name}"
            found.append(name)
    assert "torch.load" in found and "weights.get_state_dict" in found
