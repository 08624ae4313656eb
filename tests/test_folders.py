"""Your own image folders (R<depth>_Folder): pretrain -> curriculum learning -> finetuning -> test -> predict
on a small folder of generated images, with the classes and normalisation recorded in every checkpoint."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torchvision.transforms as T
from PIL import Image

import utils

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = ["blue", "green", "red"]  # sorted, as ImageFolder numbers them
CKPT = re.compile(r"ckpt_E_(\d+)_A_.*\.t7")


def run(script, *args, cwd):
    cmd = [sys.executable, os.path.join(ROOT, script), "--workers", "0", *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)


def write_folders(root, per_class=(12, 4), seed=0):
    """train/ and val/ class folders of images whose dominant colour is their class, in odd sizes and modes."""
    rng = np.random.default_rng(seed)
    for split, n in zip(("train", "val"), per_class, strict=True):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(n):
                h, w = rng.integers(20, 60, size=2)
                pixels = rng.integers(0, 90, (h, w, 3), dtype=np.uint8)
                pixels[..., 2 - c] += 150  # blue, green, red: channels 2, 1, 0
                image = Image.fromarray(pixels)
                if i % 3 == 1:
                    image = image.convert("RGBA")
                elif i % 3 == 2:
                    image = image.convert("P")
                image.save(folder / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    """A working directory with data/ (the image folders) where the whole pipeline runs once."""
    path = tmp_path_factory.mktemp("folders")
    write_folders(path / "data")
    return path


def test_statistics_are_those_of_the_resized_training_images(work):
    mean, std = utils.image_stats(work / "data", "R20_Folder")
    resize = T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()])
    pixels = torch.cat(
        [resize(Image.open(p).convert("RGB")).reshape(3, -1) for p in sorted((work / "data" / "train").rglob("*.png"))],
        1,
    ).double()
    assert mean == pytest.approx(pixels.mean(1).tolist(), abs=1e-5)
    assert std == pytest.approx(pixels.std(1, unbiased=False).tolist(), abs=1e-5)


@pytest.fixture(scope="module")
def pipeline(work):
    """pretrain.py, cl_training.py, finetune.py on R20_Folder; their outputs."""
    common = ["--model", "R20_Folder", "--data_dir", "data/", "--batch_size", 12]
    out = {"pretrain": run("pretrain.py", *common, "--epochs", 3, "--lr", 0.05, cwd=work)}
    out["cl"] = run("cl_training.py", *common, "--max_epochs", 9, "--eval_every", 9, "--cv_dir", "cv/cl/", cwd=work)
    cl = last_checkpoint(work / "cv/cl")
    out["ft"] = run(
        "finetune.py", *common, "--max_epochs", 1, "--pretrained", cl, "--cv_dir", "cv/ft/", "--penalty", -1, cwd=work
    )
    return out


def last_checkpoint(folder):
    return max(folder.glob("ckpt_E_*.t7"), key=lambda p: int(CKPT.match(p.name).group(1)), default=None)


def record(path):
    return torch.load(path, map_location="cpu", weights_only=True)[utils.FOLDER_KEY]


def test_pretrain_records_the_classes_and_statistics(work, pipeline):
    assert pipeline["pretrain"].returncode == 0, pipeline["pretrain"].stderr
    (base,) = (work / "cv/pretrained/R20_Folder").glob("pk_E_3_A_*.t7")
    rec = record(base)
    mean, std = utils.image_stats(work / "data", "R20_Folder")
    assert rec == {"classes": CLASSES, "mean": list(mean), "std": list(std)}
    assert torch.load(base, weights_only=True)["state_dict"]["fc.weight"].shape == (3, 64)
    assert record(work / "cv/pretrained/R20_Folder/last.t7") == rec


def test_every_later_checkpoint_carries_the_record(work, pipeline):
    for step in ("cl", "ft"):
        assert pipeline[step].returncode == 0, pipeline[step].stderr
    (base,) = (work / "cv/pretrained/R20_Folder").glob("pk_E_3_A_*.t7")
    files = [*(work / "cv/cl").glob("*.t7"), *(work / "cv/ft").glob("*.t7")]
    assert len(files) >= 4
    for path in files:
        assert record(path) == record(base), path.name


def test_test_py_and_predict_py_on_the_finetuned_model(work, pipeline):
    assert pipeline["ft"].returncode == 0, pipeline["ft"].stderr
    ft = last_checkpoint(work / "cv/ft")
    out = run("test.py", "--model", "R20_Folder", "--data_dir", "data/", "--load", ft, cwd=work)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert [line.split(":")[0] for line in lines] == ["Accuracy", "Block Usage", "FLOPs/img", "Unique Policies"]
    accuracy = float(lines[0].split()[1])
    # predict.py needs no data folder: the classes and normalisation come with the checkpoint
    val = work / "data" / "val"
    out = run("predict.py", "--model", "R20_Folder", "--load", ft, "--json", val, cwd=work.parent)
    assert out.returncode == 0, out.stderr
    rows = [json.loads(line) for line in out.stdout.splitlines()][:-1]
    assert len(rows) == 12 and {r["of_blocks"] for r in rows} == {9}
    assert {r["class"] for r in rows} <= set(CLASSES)
    right = sum(r["class"] == os.path.basename(os.path.dirname(r["path"])) for r in rows)
    assert f"{right / 12:.3f}" == f"{accuracy:.3f}"  # the same 12 images as test.py's val set


def test_the_record_is_checked_against_the_folders(work, pipeline, tmp_path):
    assert pipeline["pretrain"].returncode == 0
    other = tmp_path / "other"
    write_folders(other)
    (other / "train" / "red").rename(other / "train" / "yellow")
    out = run("cl_training.py", "--model", "R20_Folder", "--data_dir", other, "--cv_dir", tmp_path / "cl", cwd=work)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "are not those the model was trained on" in out.stderr and not (tmp_path / "cl").exists()


def test_a_validation_class_unknown_to_training_is_refused(tmp_path):
    write_folders(tmp_path / "data")
    (tmp_path / "data" / "val" / "red").rename(tmp_path / "data" / "val" / "purple")
    out = run("pretrain.py", "--model", "R20_Folder", "--data_dir", "data/", "--epochs", 1, cwd=tmp_path)
    assert out.returncode == 2 and len(out.stderr.splitlines()) == 1
    assert "class folders that the training images do not have: purple" in out.stderr


def test_without_a_base_model_the_next_step_says_what_to_run(tmp_path):
    write_folders(tmp_path / "data")
    out = run("cl_training.py", "--model", "R20_Folder", "--data_dir", "data/", cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().endswith("run `python pretrain.py --model R20_Folder --data_dir <your folders>` first")


def test_given_statistics_and_an_imagenet_style_network(tmp_path, monkeypatch):
    write_folders(tmp_path / "data", per_class=(2, 1))
    flags = ["--model", "R18_Folder", "--data_dir", "data/", "--batch_size", 6]
    out = run("pretrain.py", *flags, "--epochs", 1, "--mean", 0.5, 0.4, 0.3, "--std", 0.2, 0.2, 0.25, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    (base,) = (tmp_path / "cv/pretrained/R18_Folder").glob("pk_E_1_A_*.t7")
    assert record(base) == {"classes": CLASSES, "mean": [0.5, 0.4, 0.3], "std": [0.2, 0.2, 0.25]}
    out = run("test.py", *flags, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Block Usage: 8.000" in out.stdout  # ResNet-18: 8 blocks, all run without --load
    monkeypatch.chdir(tmp_path)
    net = utils.load_blockdrop("R18_Folder")  # the base model, every block; its record found with it
    assert net.classes == CLASSES and net.rnet.fc.out_features == 3
    with Image.open(next((tmp_path / "data/val/red").iterdir())) as img:
        assert net.transform(img).shape == (3, 224, 224)


def test_mean_and_std_are_for_image_folders_only(tmp_path):
    out = run("pretrain.py", "--model", "R20_C10", "--dummy", 8, "--mean", 0.5, 0.5, 0.5, cwd=tmp_path)
    assert out.returncode == 2 and "--mean and --std apply to image folders" in out.stderr


def test_the_model_table_has_folder_models_of_both_styles():
    assert utils.model_spec("R32_Folder").input_size == (3, 32, 32)
    assert utils.model_spec("R50_Folder").input_size == (3, 224, 224)
    assert utils.model_spec("R50_Folder").num_classes is None and utils.model_spec("R50_Folder").num_blocks == 16
    with pytest.raises(utils.UserError, match="takes its number of classes from its data"):
        utils.build_model("R32_Folder")
    rnet, _ = utils.build_model("R32_Folder", 7)
    assert rnet.fc.out_features == 7


def test_predict_s_inputs_are_test_py_s_tensor_for_tensor(work, pipeline):
    assert pipeline["ft"].returncode == 0, pipeline["ft"].stderr
    ft = str(last_checkpoint(work / "cv/ft"))
    net = utils.load_blockdrop("R20_Folder", ft)
    folder = utils.recorded_folder_data("R20_Folder", str(work / "data"), ft)
    _, val = utils.get_dataset("R20_Folder", str(work / "data"), folder)
    for i, (path, _) in enumerate(val.samples):
        with Image.open(path) as img:
            assert torch.equal(net.transform(img), val[i][0]), path


def test_a_resumed_base_model_keeps_its_record(tmp_path):
    write_folders(tmp_path / "data", per_class=(4, 2))
    flags = ["--model", "R20_Folder", "--data_dir", "data/", "--batch_size", 6, "--mean", 0.3, 0.3, 0.3]
    assert run("pretrain.py", *flags, "--epochs", 2, cwd=tmp_path).returncode == 0
    # as if the run had been stopped after its first epoch: last.t7 says so, without pk_E_2
    last = tmp_path / "cv/pretrained/R20_Folder/last.t7"
    state = torch.load(last, weights_only=True)
    (done,) = (tmp_path / "cv/pretrained/R20_Folder").glob("pk_E_2_A_*.t7")
    done.unlink()
    utils.save_checkpoint({**state, "epoch": 1}, last)
    out = run("pretrain.py", *flags, "--epochs", 2, "--resume", cwd=tmp_path)
    assert out.returncode == 0 and "E: 2 |" in out.stdout and "E: 1 |" not in out.stdout, out.stderr
    (base,) = (tmp_path / "cv/pretrained/R20_Folder").glob("pk_E_2_A_*.t7")
    assert record(base)["mean"] == [0.3, 0.3, 0.3] and record(base)["classes"] == CLASSES
    # another normalisation than that of the weights a run starts from is refused
    out = run("pretrain.py", *flags[:-4], "--mean", 0.5, 0.5, 0.5, "--load", base, "--cv_dir", "b/", cwd=tmp_path)
    assert out.returncode == 2 and "another normalisation" in out.stderr and not (tmp_path / "b").exists()


@pytest.mark.parametrize("broken", ["empty val", "empty class", "hidden folder"])
def test_folders_that_are_not_datasets(broken, tmp_path):
    write_folders(tmp_path / "data", per_class=(2, 1))
    if broken == "empty val":
        for path in (tmp_path / "data" / "val").rglob("*.png"):
            path.unlink()
    elif broken == "empty class":
        for path in (tmp_path / "data" / "train" / "red").iterdir():
            path.unlink()
    else:
        (tmp_path / "data" / "train" / ".cache").mkdir()
    out = run("pretrain.py", "--model", "R20_Folder", "--data_dir", "data/", "--epochs", 1, cwd=tmp_path)
    if broken == "hidden folder":  # not a class
        assert out.returncode == 0, out.stderr
        (base,) = (tmp_path / "cv/pretrained/R20_Folder").glob("pk_E_1_*.t7")
        assert record(base)["classes"] == CLASSES
    else:
        assert out.returncode == 2 and len(out.stderr.splitlines()) == 1, out.stderr
        assert "holds no images" in out.stderr or "holds no class folders" in out.stderr


def test_fake_data_needs_no_base_model(tmp_path):
    out = run("test.py", "--model", "R32_Folder", "--dummy", 16, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "Block Usage: 15.000" in out.stdout
