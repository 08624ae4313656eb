"""--parallel under torchrun (Gloo, 2 processes on the CPU), --resume after SIGKILL, atomic writes."""

import copy
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torchvision.transforms as T
from torch import nn
from torch.utils.data import TensorDataset

import utils
from core import distributed
from models.base import BasicBlock
from models.resnet import FlatResNet32

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 49 images in batches of 16: the last batch has one image, so the second process takes an empty step.
FAKE = ["--model", "R20_C10", "--dummy", 49, "--batch_size", 16, "--workers", 0]
# One thread per process everywhere, so that 1-process, 2-process and resumed runs do the same arithmetic.
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run(script, *args, cwd, parallel=False):
    args = [os.path.join(ROOT, script), *map(str, args)]
    if parallel:
        args = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args, "--parallel"]
    return subprocess.run([sys.executable, *args], cwd=cwd, env=ENV, capture_output=True, text=True, timeout=300)


def tensors_equal(a, b) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(tensors_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(tensors_equal(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def t7_files(folder):
    return sorted(f for f in os.listdir(folder) if f.endswith(".t7"))


def newest(folder):
    """The evaluation checkpoint (ckpt_E_*) or base model (pk_E_*) of the highest epoch."""
    names = [f for f in t7_files(folder) if f.startswith(("ckpt_E_", "pk_E_"))]
    return folder / max(names, key=lambda f: int(f.split("_")[2]))


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = tmp_path_factory.mktemp("dist")
    (path / "data").mkdir()
    return path


# Each script's flags for a few epochs on fake data; finetuning starts from the curriculum run.
RUNS = {
    "pretrain": ("pretrain.py", ["--epochs", 4, "--lr", 0.01, "--drop_rate", 0.2]),
    "cl": ("cl_training.py", ["--max_epochs", 4, "--eval_every", 2]),
    "ft": ("finetune.py", ["--max_epochs", 3, "--eval_every", 2]),
}


def flags(name, workdir, out):
    script, extra = RUNS[name]
    if name == "ft":
        extra = [*extra, "--pretrained", newest(workdir / "one/cl")]
    return script, [*FAKE, *extra, "--cv_dir", f"{out}/{name}/"]


@pytest.fixture(scope="module")
def single(workdir):
    """Uninterrupted 1-process runs of the three scripts: {name: stdout}."""
    results = {}
    for name in RUNS:
        script, args = flags(name, workdir, workdir / "one")
        result = run(script, *args, cwd=workdir)
        assert result.returncode == 0, result.stderr
        results[name] = result.stdout
    return results


@pytest.mark.parametrize("name", list(RUNS))
def test_two_processes_report_what_one_process_reports(name, single, workdir):
    script, args = flags(name, workdir, workdir / "two")
    result = run(script, *args, cwd=workdir, parallel=True)
    assert result.returncode == 0, result.stderr[-3000:]
    if name == "pretrain":  # its loss has four decimals: SGD at lr 0.01 lets float rounding reach them
        loss = re.compile(r"loss: (\d+\.\d+)")
        for got, want in zip(result.stdout.splitlines(), single[name].splitlines(), strict=True):
            assert loss.sub("", got) == loss.sub("", want)
            assert abs(float(loss.search(got).group(1)) - float(loss.search(want).group(1))) < 2e-3
    else:
        assert result.stdout == single[name]  # every epoch's statistics, printed once (by rank 0)
    one, two = workdir / f"one/{name}", workdir / f"two/{name}"
    assert t7_files(two) == t7_files(one)  # the checkpoint names carry the evaluation statistics
    final = utils.load_file(newest(two))
    weights = final.get("agent", final.get("state_dict"))
    assert not any(k.startswith("module.") for k in weights)  # loads in single-process scripts
    reference = utils.load_file(newest(one))
    # Close, not equal: Adam turns float-rounding differences of near-zero gradients into steps of
    # about lr, a few of them over the run's 16 steps (GlobalBatchNorm2d itself is checked exactly below).
    for key, value in reference.get("agent", reference.get("state_dict")).items():
        assert torch.allclose(weights[key].double(), value.double(), atol=0.05), key


def test_a_two_process_checkpoint_profiles_in_test_py(single, workdir):
    ft = workdir / "two/ft"
    if not ft.exists():
        pytest.skip("needs the 2-process finetuning run")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "test.py"), *map(str, FAKE), "--load", newest(ft)],
        cwd=workdir,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("Accuracy: ")


def kill_after_first_save(script, args, cwd, folder, pattern=r"last\.t7"):
    """Start a run, SIGKILL it as soon as its first resumable file appears; return its partial stdout."""
    proc = subprocess.Popen(
        [sys.executable, os.path.join(ROOT, script), *map(str, args)],
        cwd=cwd,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    deadline = time.time() + 120
    while not (folder.is_dir() and any(re.fullmatch(pattern, f) for f in os.listdir(folder))):
        assert proc.poll() is None, "the run ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    stdout, _ = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    return stdout


def printed_after(stdout: str, done: int) -> list[str]:
    """The lines an uninterrupted run printed for the epochs after ``done``."""
    lines = stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"E: {done + 1} "))
    while lines[start - 1].startswith(("training the last", "# setting learning_rate")):  # said before the epoch
        start -= 1
    return lines[start:]


@pytest.mark.parametrize("name", list(RUNS))
def test_a_killed_run_resumes_to_the_uninterrupted_result(name, single, workdir):
    script, args = flags(name, workdir, workdir / "killed")
    folder = workdir / f"killed/{name}"
    folder.mkdir(parents=True)
    released = folder / "pk_E_164_A_0.900.t7"  # a base model of another origin, as the released ones
    utils.save_checkpoint({"state_dict": {}, "epoch": 163}, released)
    partial = kill_after_first_save(script, [*args, "--resume"], workdir, folder)
    assert partial.startswith("--resume: nothing to resume")  # the same command starts and resumes
    finished = t7_files(workdir / f"one/{name}")
    assert t7_files(folder) != finished + [released.name]  # it was interrupted before its end

    result = run(script, *args, "--resume", cwd=workdir)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith(f"resuming {folder}/")
    done = int(re.search(r"epoch (\d+) done", lines[0]).group(1))
    # The resumed run prints what the uninterrupted run printed from the next epoch on.
    assert lines[1:] == printed_after(single[name], done)
    assert sorted(t7_files(folder)) == sorted(finished + [released.name])  # the other file is kept
    for f in finished:
        a, b = utils.load_file(folder / f), utils.load_file(workdir / f"one/{name}/{f}")
        assert tensors_equal(a, b), f  # weights, optimizer and random state, bit for bit
    assert (folder / "args.json").is_file() and list(folder.glob("args_resumed_E*.json"))


def test_a_run_resumes_on_another_number_of_processes(single, workdir):
    script, args = flags("cl", workdir, workdir / "regrouped")
    kill_after_first_save(script, [*args, "--resume"], workdir, workdir / "regrouped/cl")
    result = run(script, *args, "--resume", cwd=workdir, parallel=True)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    done = int(re.search(r"epoch (\d+) done", lines[0]).group(1))
    assert lines[1:] == printed_after(single["cl"], done)


def test_a_nan_in_parallel_stops_every_process_with_one_line(single, workdir):
    script, args = flags("cl", workdir, workdir / "nan")
    result = run(script, *args, "--lr", "1e30", cwd=workdir, parallel=True)
    assert result.returncode != 0
    assert result.stderr.count("became NaN or infinite") == 1, result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split("became NaN")[0][-2000:]  # ours is one line, not a traceback
    assert not list((workdir / "nan/cl").glob("*.t7"))


def test_resume_refuses_other_flags(single, workdir):
    script, args = flags("cl", workdir, workdir / "one")
    result = run(script, *args, "--resume", "--lr", "0.5", cwd=workdir)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "cannot resume" in result.stderr and "--lr 0.5" in result.stderr


def test_launch_errors_are_one_line(workdir):
    script, args = flags("cl", workdir, workdir / "errors")
    plain = run(script, *args, "--parallel", cwd=workdir)
    assert plain.returncode == 2 and plain.stderr.count("\n") == 1
    assert "started by torchrun: torchrun --standalone --nproc_per_node=" in plain.stderr
    assert "--parallel" in plain.stderr.split("torchrun", 1)[1]

    no_flag = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, *map(str, args)],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert no_flag.returncode != 0
    assert "started by torchrun with 2 processes but without --parallel" in no_flag.stderr
    odd = run(script, *args, "--batch_size", 15, cwd=workdir, parallel=True)
    assert odd.returncode != 0 and "--batch_size 15 does not split evenly over 2 processes" in odd.stderr
    assert not (workdir / "errors").exists()


WRITER = """
import sys, torch
sys.path.insert(0, {root!r})
import utils
big = 4_000_000
i = 0
while True:
    utils.save_checkpoint({{"step": i, "x": torch.full((big,), float(i))}}, {path!r})
    print(i, flush=True)
    i += 1
"""


def test_a_write_killed_midway_leaves_a_loadable_checkpoint(tmp_path):
    path = tmp_path / "ckpt.t7"
    rng = random.Random(0)
    for trial in range(4):
        proc = subprocess.Popen(
            [sys.executable, "-c", WRITER.format(root=ROOT, path=str(path))],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout.readline()  # one complete checkpoint written
        time.sleep(rng.uniform(0.0, 0.3))  # then kill it somewhere in a later write
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        ckpt = utils.load_file(path)
        assert torch.equal(ckpt["x"], torch.full((4_000_000,), float(ckpt["step"]))), trial


# ---------------------------------------------------------------------------------------------
# The pieces, in one process or with torch.multiprocessing


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _global_bn_worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        # Uneven shares, a process without images (a block none of its images keeps), and nobody.
        for splits in [(5, 3), (6, 0), (0, 0)]:
            _compare_with_batchnorm(rank, splits)
    finally:
        dist.destroy_process_group()


def _compare_with_batchnorm(rank, splits):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(sum(splits), 3, 4, 4, generator=g) * 3 + 1
    w = torch.randn(sum(splits), 3, 4, 4, generator=g)
    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.uniform_(0.5, 1.5, generator=g)
        reference.bias.uniform_(-1, 1, generator=g)
    ours = distributed.GlobalBatchNorm2d(3)
    ours.load_state_dict(reference.state_dict())
    start = sum(splits[:rank])
    mine = x[start : start + splits[rank]].clone().requires_grad_(True)
    y = ours(mine)
    (y * w[start : start + splits[rank]]).sum().backward()
    for p in ours.parameters():  # what DDP does, as a sum
        dist.all_reduce(p.grad)

    whole = x.clone().requires_grad_(True)
    if sum(splits) > 0:
        expected = reference(whole)
        (expected * w).sum().backward()
        torch.testing.assert_close(y, expected[start : start + splits[rank]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(mine.grad, whole.grad[start : start + splits[rank]], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(ours.weight.grad, reference.weight.grad, atol=1e-4, rtol=1e-5)
        torch.testing.assert_close(ours.bias.grad, reference.bias.grad, atol=1e-4, rtol=1e-5)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(ours, name), getattr(reference, name), atol=1e-5, rtol=1e-5)


def test_global_batchnorm_is_batchnorm_over_every_process():
    mp.spawn(_global_bn_worker, args=(free_port(),), nprocs=2)


def _masked_forward_worker(rank, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        net = FlatResNet32(BasicBlock, [2, 2, 2], num_classes=10).train()
        reference = copy.deepcopy(net)
        distributed.prepare(net)
        x, w = torch.randn(8, 3, 32, 32), torch.randn(8, 10)
        policy = (torch.rand(8, 6) < 0.5).float()
        policy[:, 1] = torch.tensor([1.0, 1, 0, 0, 0, 0, 0, 0])  # kept by images of process 0 only
        policy[:, 4] = 0  # kept by no image: skipped by both processes
        share = slice(4 * rank, 4 * rank + 4)
        out = net(x[share], policy[share])  # the masked form, as training defaults to
        (out * w[share]).sum().backward()
        expected = reference(x, policy)
        (expected * w).sum().backward()
        torch.testing.assert_close(out, expected[share], atol=1e-5, rtol=1e-5)
        for (name, p), q in zip(net.named_parameters(), reference.parameters(), strict=True):
            dist.all_reduce(p.grad)  # what DDP does, as a sum
            torch.testing.assert_close(
                p.grad, q.grad if q.grad is not None else torch.zeros_like(p), atol=1e-4, rtol=1e-4, msg=name
            )
        for (name, a), b in zip(net.state_dict().items(), reference.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=name)
    finally:
        dist.destroy_process_group()


def test_the_masked_form_over_two_processes_is_the_masked_form_over_the_batch():
    """A block kept by one process's images runs in both (BatchNorm over the whole batch); one kept by
    no image is skipped by both (no running-statistics update)."""
    mp.spawn(_masked_forward_worker, args=(free_port(),), nprocs=2)


def test_collect_orders_by_index_and_drops_repeats():
    indices = [torch.tensor([3, 0]), torch.tensor([2, 0])]  # 0 repeated, as DistributedSampler pads
    values = [torch.tensor([30.0, 0.0]), torch.tensor([20.0, 0.0])]
    rows = [torch.tensor([[1, 3], [1, 0]]), torch.tensor([[1, 2], [1, 0]])]
    got_values, got_rows = distributed.collect(indices, values, rows)
    assert got_values.tolist() == [0.0, 20.0, 30.0]
    assert got_rows.tolist() == [[1, 0], [1, 2], [1, 3]] and got_rows.dtype == torch.int64


def augmented(loader, epoch):
    loader.sampler.set_epoch(epoch)
    batches = [(x, i) for x, _, i in loader]
    images, index = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    return images[index.argsort()]


def test_augmentation_depends_on_seed_epoch_and_image_only():
    data = TensorDataset(torch.arange(12 * 3 * 8 * 8, dtype=torch.float32).reshape(12, 3, 8, 8), torch.zeros(12))

    class Cropped(torch.utils.data.Dataset):
        crop = T.Compose([T.RandomCrop(8, padding=3), T.RandomHorizontalFlip()])

        def __len__(self):
            return len(data)

        def __getitem__(self, i):
            x, y = data[i]
            return self.crop(x), y

    cpu = torch.device("cpu")
    inline = utils.make_loader(Cropped(), 4, True, 0, cpu, seed=5)
    workers = utils.make_loader(Cropped(), 4, True, 2, cpu, seed=5)
    before = torch.get_rng_state()
    epoch1 = augmented(inline, 1)
    assert torch.equal(torch.get_rng_state(), before)  # the global generator is left alone
    assert torch.equal(epoch1, augmented(workers, 1))  # worker processes change nothing
    assert torch.equal(epoch1, augmented(inline, 1))  # nor running the epoch again (a resumed run)
    assert not torch.equal(epoch1, augmented(inline, 2))  # another epoch, other crops
    other_seed = utils.make_loader(Cropped(), 4, True, 0, cpu, seed=6)
    assert not torch.equal(epoch1, augmented(other_seed, 1))


def test_random_state_survives_a_checkpoint(tmp_path):
    utils.set_seed(3)
    random.random(), np.random.rand(), torch.rand(1), np.random.randn()  # a cached Gaussian too
    utils.save_checkpoint({"rng": utils.rng_state()}, tmp_path / "r.t7")
    expected = (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist(), np.random.randn())
    utils.set_seed(99)
    utils.set_rng_state(utils.load_file(tmp_path / "r.t7")["rng"])  # weights_only=True reads it
    assert (random.random(), np.random.rand(2).tolist(), torch.rand(2).tolist(), np.random.randn()) == expected


def test_sampled_policies_are_a_function_of_seed_and_epoch():
    probs = torch.rand(6, 5, generator=torch.Generator().manual_seed(1))
    g = utils.epoch_generator(0, 3, torch.device("cpu"))
    _, policy, _ = utils.sample_policy(probs, 0.8, g)
    again = utils.sample_policy(probs, 0.8, utils.epoch_generator(0, 3, torch.device("cpu")))[1]
    assert torch.equal(policy, again)
    assert not torch.equal(policy, utils.sample_policy(probs, 0.8, utils.epoch_generator(0, 4, torch.device("cpu")))[1])


def test_bad_input_under_torchrun_is_each_process_s_exit_code_2_and_one_line(tmp_path):
    # The node's first process fails while the other waits for it (loading --load): both stop, with
    # exit code 2 and no traceback; what follows the script's line is torchrun's own report.
    result = run("cl_training.py", *FAKE, "--load", "nothere.t7", "--cv_dir", "cv/", cwd=tmp_path, parallel=True)
    lines = result.stderr.splitlines()
    assert lines[0] == "cl_training.py: error: checkpoint nothere.t7 does not exist", result.stderr[-3000:]
    assert (
        result.stderr.count("error: checkpoint nothere.t7") == 1 and "[rank" not in result.stderr
    )  # no process traceback
    codes = re.findall(r"exitcode\s*: (-?\d+) \(pid: (\d+)\)", result.stderr)
    # a process that stops exits with 2; torchrun may end the other one first (SIGTERM, -15)
    assert len({pid for _, pid in codes}) == 2 and "2" in {c for c, _ in codes} <= {"2", "-15"}, result.stderr[-3000:]
    assert result.returncode == 1  # torchrun's own, for any failed process
    assert list(tmp_path.iterdir()) == []
