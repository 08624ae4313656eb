"""Deterministic loading: per-image seeds, an epoch sampler shared out over processes, global batches.

What a run draws depends on (seed, epoch, image) only, never on worker processes, restarts or the
number of processes, so that a resumed or a W-process run repeats a single uninterrupted one.
"""

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler
from tqdm import tqdm

from core import distributed
from core.cli import UserError


def mix_seed(*numbers: int) -> int:
    """One 63-bit seed from several integers (seed, epoch, image index, ...), well mixed (SplitMix64)."""
    value = 0x9E3779B97F4A7C15
    for number in numbers:
        value = (value ^ (number & 0xFFFFFFFFFFFFFFFF)) + 0x9E3779B97F4A7C15 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 30)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        value = (value ^ (value >> 27)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        value ^= value >> 31
    return value >> 1


class Indexed(Dataset):
    """``dataset[i]`` as (input, target, i), with the random transforms seeded by (seed, epoch, i).

    Keys are (epoch, i) pairs from ``EpochSampler``. Seeding each image makes its augmentation
    independent of worker processes, of how many processes share the data and of restarts,
    so that an interrupted and resumed run, or a run on several processes, sees the same images.
    """

    def __init__(self, dataset: Dataset, seed: int = 0):
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, index = key
        rng = torch.default_generator
        saved = rng.get_state()  # torchvision's transforms draw from the global generator
        rng.manual_seed(mix_seed(self.seed, epoch, index))
        try:
            inputs, target = self.dataset[index]
        finally:
            rng.set_state(saved)
        return inputs, target, index


class EpochSampler(DistributedSampler):
    """DistributedSampler yielding (epoch, index), without its padding.

    Each epoch permutes the dataset from seed + epoch (as DistributedSampler does) and process r
    takes positions r, r + W, r + 2W, ...: with one process the whole permutation. Unlike
    DistributedSampler no image is repeated to even out the shares, so that W processes train on
    exactly the images one process trains on (``global_batches`` evens out the steps instead).
    Call ``set_epoch`` before each epoch.
    """

    def __iter__(self):
        n = len(self.dataset)
        if self.shuffle:
            generator = torch.Generator()
            generator.manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=generator).tolist()
        else:
            order = list(range(n))
        return ((self.epoch, i) for i in order[self.rank :: self.num_replicas])

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


def make_loader(
    dataset: Dataset, batch_size: int, shuffle: bool, workers: int, device: torch.device, seed: int = 0
) -> DataLoader:
    """A loader of (inputs, targets, indices) batches over this process's share of ``dataset``.

    ``batch_size`` counts the images of all processes together. Shuffled loaders (training)
    reshuffle per epoch from ``seed`` + epoch and need ``batch_size`` to split evenly over the
    processes, so that each global batch is the one a single process would take; unshuffled
    ones (evaluation) keep the dataset's order. Memory is pinned on CUDA.
    """
    world = distributed.world_size()
    if shuffle and batch_size % world:
        raise UserError(f"--batch_size {batch_size} does not split evenly over {world} processes")
    sampler = EpochSampler(dataset, num_replicas=world, rank=distributed.rank(), shuffle=shuffle, seed=seed)
    return DataLoader(
        Indexed(dataset, seed),
        batch_size=-(-batch_size // world),
        sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),  # worker seeds: the global generator stays untouched
    )


def global_batches(loader: DataLoader, desc: str):
    """Yield (inputs, targets, indices, n) for every training step of an epoch, with a progress bar.

    ``n`` is the size of the step's batch over all processes. Every process takes the same number
    of steps (its collectives must pair up): one whose share ends before the last step, because
    the last batch has fewer images than there are processes, gets an empty batch.
    """
    world = distributed.world_size()
    total, size = len(loader.dataset), loader.batch_size * world
    steps = -(-total // size)
    batches = iter(loader)
    for step in progress(range(steps), desc):
        batch = next(batches, None)
        if batch is None:  # nothing left for this process: a batch of no images
            inputs, target, _ = loader.dataset[(0, 0)]
            batch = (inputs[None][:0], torch.as_tensor([target])[:0], torch.zeros(0, dtype=torch.long))
        yield (*batch, min(size, total - step * size))


def epoch_generator(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """The generator of an epoch's per-image random numbers, alike in every process and restart."""
    generator = torch.Generator(device=device)
    generator.manual_seed(mix_seed(seed, epoch))
    return generator


def progress(iterable, desc: str):
    """A tqdm bar over batches, shown by the main process on a terminal only (not in piped logs)."""
    return tqdm(iterable, desc=desc, leave=False, dynamic_ncols=True, disable=None if distributed.is_main() else True)
