"""predict.py and the inference module: the same predictions and blocks as test.py's evaluation, on
image files of any size and mode, with one line per unreadable file."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

import predict
import utils
from tests.test_checkpoints import SHIPPED_BLOCKDROP, fashion_mnist_test_slice

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 48  # test images used


def run_predict(capsys, *args):
    """predict.py in this process: (exit code, stdout lines, stderr lines)."""
    try:
        utils.run(predict.main, predict.get_args_parser(), ["--workers", "0", *map(str, args)])
        code = 0
    except SystemExit as e:
        code = e.code
    out, err = capsys.readouterr()
    return code, out.splitlines(), err.splitlines()


@pytest.fixture(scope="module")
def varied_checkpoint(tmp_path_factory):
    """An R20_FMNIST checkpoint whose policy network gives many different policies."""
    torch.manual_seed(3)
    rnet, agent = utils.build_model("R20_FMNIST")
    with torch.no_grad():
        agent.logit.weight.mul_(40.0)  # far from 0.5: greedy policies that differ between images
    path = tmp_path_factory.mktemp("ckpt") / "ckpt_E_1_A_0.100_R_1.00E-01_S_4.00_#_9.t7"
    utils.save_checkpoint({"agent": agent.state_dict(), "resnet": rnet.state_dict(), "epoch": 1, "acc": 0.1}, path)
    return str(path)


@pytest.fixture(scope="module")
def png_folder(tmp_path_factory):
    """The first N Fashion-MNIST test images as grey PNG files, in a folder with a subfolder."""
    folder = tmp_path_factory.mktemp("png")
    (folder / "more").mkdir()
    images = fashion_mnist_test_slice("R20_FMNIST").images[:N]
    for i, image in enumerate(images):
        Image.fromarray(image, mode="L").save(folder / ("more" if i >= N // 2 else "") / f"{i:03d}.png")
    return folder


def reference(model: str, load: str):
    """test.py's evaluation of the first N test images: greedy policies (N, K) and whether each is right."""
    rnet, agent, _ = utils.models_for_run(model, load, init_agent=False)
    cpu = torch.device("cpu")
    loader = utils.make_loader(torch.utils.data.Subset(fashion_mnist_test_slice(model), range(N)), 16, False, 0, cpu)
    policies, _, matches = utils.evaluate(rnet, agent, loader, utils.Runtime(cpu), -1.0)
    return policies, matches.bool()


def test_the_module_gives_test_py_s_policies_and_predictions(varied_checkpoint):
    net = utils.load_blockdrop("R20_FMNIST", varied_checkpoint)
    assert not net.training and net.num_blocks == 9 and net.classes == utils.FASHION_MNIST_CLASSES
    data = fashion_mnist_test_slice("R20_FMNIST")
    x = torch.stack([data[i][0] for i in range(N)])
    targets = torch.tensor([data[i][1] for i in range(N)])
    logits, policy = net(x)
    assert logits.shape == (N, 10) and policy.shape == (N, 9)
    policies, matches = reference("R20_FMNIST", varied_checkpoint)
    assert len({tuple(p) for p in policies.tolist()}) >= 4  # a real test of per-image policies
    assert torch.equal(policy, policies)
    assert torch.equal(logits.argmax(1) == targets, matches)


def test_predict_py_reads_png_files_as_the_dataset_gives_the_images(varied_checkpoint, png_folder, capsys):
    code, out, err = run_predict(capsys, "--model", "R20_FMNIST", "--load", varied_checkpoint, "--json", png_folder)
    assert code == 0 and err == []
    rows = [json.loads(line) for line in out]
    summary = rows.pop()
    assert summary["images"] == N and summary["failed"] == 0 and summary["images_per_s"] > 0
    # the top folder's files first, then the subfolder's, each in sorted order
    assert [os.path.basename(r["path"]) for r in rows] == [f"{i:03d}.png" for i in range(N)]
    net = utils.load_blockdrop("R20_FMNIST", varied_checkpoint)
    data = fashion_mnist_test_slice("R20_FMNIST")
    logits, policy = net(torch.stack([data[i][0] for i in range(N)]))
    probs = logits.softmax(1)
    assert [r["label"] for r in rows] == logits.argmax(1).tolist()
    assert [r["class"] for r in rows] == [utils.FASHION_MNIST_CLASSES[k] for k in logits.argmax(1).tolist()]
    assert [r["blocks"] for r in rows] == policy.sum(1).int().tolist()
    assert [r["probability"] for r in rows] == pytest.approx(probs.max(1).values.tolist(), abs=1e-5)
    assert {r["of_blocks"] for r in rows} == {9}


@pytest.mark.parametrize("model, path, accuracy, _", SHIPPED_BLOCKDROP)
def test_a_shipped_model_names_the_classes_of_exported_test_images(model, path, accuracy, _, png_folder, capsys):
    code, out, _err = run_predict(capsys, "--model", model, "--load", os.path.join(ROOT, path), "--topk", 3, png_folder)
    assert code == 0
    *lines, speed = out
    targets = fashion_mnist_test_slice(model).targets[:N]
    right = 0
    for line, target in zip(lines, targets, strict=True):
        name, rest = line.split(": ", 1)
        classes = rest.rsplit(" (", 1)[0].split(", ")
        assert len(classes) == 3 and rest.endswith(f" of {utils.model_spec(model).num_blocks} blocks)")
        probs = [float(c.rsplit(" ", 1)[1]) for c in classes]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.001
        right += classes[0].rsplit(" ", 1)[0] == utils.FASHION_MNIST_CLASSES[target]
    assert right / N >= accuracy - 0.1
    assert speed.startswith(f"{N} images in ") and speed.endswith(" images/s")


def odd_images(folder):
    """Images of odd sizes and modes, each as a user might have it."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (45, 70, 3), dtype=np.uint8)
    Image.fromarray(pixels[..., 0], mode="L").save(folder / "grey_45x70.png")
    Image.fromarray(pixels).convert("RGBA").resize((33, 20)).save(folder / "rgba_33x20.png")
    Image.fromarray(pixels).convert("P").save(folder / "palette.gif")
    Image.fromarray(pixels).save(folder / "colour.jpg", quality=90)
    Image.fromarray(pixels).convert("CMYK").save(folder / "cmyk.jpg")
    Image.fromarray(pixels[:3, :1000]).save(folder / "thin_3x70.bmp")
    return ["cmyk.jpg", "colour.jpg", "grey_45x70.png", "palette.gif", "rgba_33x20.png", "thin_3x70.bmp"]


@pytest.mark.parametrize("model", ["R20_FMNIST", "R20_C10", "R18_ImgNet"])
def test_any_image_becomes_the_model_s_input(model, tmp_path):
    transform = utils.image_transform(model)
    for name in odd_images(tmp_path):
        with Image.open(tmp_path / name) as img:
            assert transform(img).shape == utils.model_spec(model).input_size


def test_unreadable_files_are_one_line_each_and_the_others_are_classified(varied_checkpoint, tmp_path, capsys):
    names = odd_images(tmp_path)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "truncated.jpg").write_bytes((tmp_path / "colour.jpg").read_bytes()[:300])
    (tmp_path / "notes.txt").write_text("not an image")  # skipped in a folder: not an image's extension
    code, out, err = run_predict(
        capsys,
        "--model",
        "R20_FMNIST",
        "--load",
        varied_checkpoint,
        tmp_path,
        tmp_path / "notes.txt",
        tmp_path / "gone",
    )
    assert code == 2
    assert [line.split(": ", 1)[0] for line in out[:-1]] == [str(tmp_path / n) for n in names]
    assert out[-1].startswith(f"{len(names)} images in ") and out[-1].endswith("; 4 failed")
    assert len(err) == 4 and all(line.startswith("predict.py: error: ") for line in err)
    for name in ("gone", "broken.png", "truncated.jpg", "notes.txt"):
        assert sum(str(tmp_path / name) + ":" in line for line in err) == 1, name


def test_nothing_to_classify_is_one_line(tmp_path, capsys):
    (tmp_path / "readme.txt").write_text("no images here")
    code, out, err = run_predict(capsys, "--model", "R20_FMNIST", tmp_path)
    assert code == 2 and out == [] and err == [f"predict.py: error: no image files in {tmp_path}"]


def test_without_a_checkpoint_every_block_runs(png_folder, capsys):
    code, out, _ = run_predict(capsys, "--model", "R32_FMNIST", "--json", png_folder / "more")
    rows = [json.loads(line) for line in out[:-1]]
    assert code == 0 and len(rows) == N - N // 2 and {r["blocks"] for r in rows} == {15}


@pytest.mark.parametrize("page", ["README.md", "docs/your-own-images.md"])
def test_the_documented_python_example_runs(page, png_folder, monkeypatch, capsys):
    text = open(os.path.join(ROOT, page)).read()
    (example,) = [block for block in text.split("```python\n")[1:] if "load_blockdrop" in block]
    assert len([line for line in example.split("```")[0].splitlines() if line.strip()]) == 5
    example = example.split("```")[0]
    files = [str(png_folder / "000.png"), str(png_folder / "001.png")]
    assert '["shoe.png", "shirt.png"]' in example
    monkeypatch.chdir(ROOT)
    exec(example.replace('["shoe.png", "shirt.png"]', repr(files)), {})
    names, blocks = capsys.readouterr().out.strip().split("] [")
    assert names == "['Ankle boot', 'Pullover'" and blocks == "7.0, 7.0]"  # the first two test images


def test_the_transform_goes_to_worker_processes(varied_checkpoint, png_folder, capsys):
    import pickle

    for model in ("R20_FMNIST", "R20_C10", "R18_ImgNet"):
        pickle.dumps(utils.image_transform(model))  # DataLoader workers started by spawn or forkserver
    args = ["--model", "R20_FMNIST", "--load", varied_checkpoint, "--json", png_folder / "more"]
    code, out, _ = run_predict(capsys, *args, "--workers", 2, "--batch_size", 5)
    assert code == 0
    code, out0, _ = run_predict(capsys, *args)
    assert [json.loads(line)["label"] for line in out[:-1]] == [json.loads(line)["label"] for line in out0[:-1]]
