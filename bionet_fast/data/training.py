"""The training and validation datasets of ``python -m bionet_fast.train``: synthetic nuclei crops
or a dataset folder (split 90/10 when no validation folder is given), and the reproducible
per-epoch sampler (seeded by seed and epoch, sharded over DDP ranks, resumable mid-epoch).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset, Subset


class EpochSampler(torch.utils.data.Sampler):
    """`per_rank` indices per process and epoch: permutations of the dataset seeded by (seed, epoch),
    concatenated as often as needed, every `world`-th index to one rank (DistributedSampler's
    sharding); `set_epoch(epoch, skip)` skips the indices already used (mid-epoch resume)."""

    def __init__(self, n: int, per_rank: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.per_rank, self.seed, self.rank, self.world = n, per_rank, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.epoch))
        total = self.per_rank * self.world
        idx = torch.cat([torch.randperm(self.n, generator=g) for _ in range(math.ceil(total / self.n))])
        return iter(idx[:total][self.rank::self.world][self.skip:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.skip


def mix_seed(*numbers: int) -> int:
    """A 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([abs(int(n)) for n in numbers]).generate_state(2, np.uint64)[0] >> 1)


class SyntheticCrops(Dataset):
    """Synthetic nuclei (image (C, S, S), mask (1, S, S)), random `crop`-sided crops seeded by
    (seed, epoch, index); super-resolution: (bicubic-degraded image, image)."""

    def __init__(self, base: Dataset, crop, seed: int, sr_scale=None):
        self.base, self.crop, self.seed, self.sr_scale, self.epoch = base, crop, seed, sr_scale, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, mask = self.base[i]
        size = image.shape[-1]
        if self.crop and self.crop < size:
            y, x = np.random.default_rng([self.seed, self.epoch, i]).integers(0, size - self.crop + 1, 2)
            image, mask = (t[:, y:y + self.crop, x:x + self.crop] for t in (image, mask))
        if self.sr_scale:
            from .datasets import degrade_bicubic

            return degrade_bicubic(image, self.sr_scale), image
        return image, mask


def build_data(args) -> tuple[Dataset, Dataset, str, str]:
    """(train, validation, train description, validation description); raises ValueError /
    FileNotFoundError naming the file and the expected layout, before anything is trained."""
    sr = args.sr_scale if args.task == "super-resolution" else None
    if args.synthetic:
        from .synthetic import SyntheticNucleiDataset

        size = max(128, args.image_size)
        base = SyntheticNucleiDataset(args.n_train, size, seed=args.seed, channels=args.in_channels)
        held = SyntheticNucleiDataset(args.n_val, size, seed=2**31 - 1, channels=args.in_channels)
        return (SyntheticCrops(base, args.image_size, args.seed, sr), SyntheticCrops(held, None, 0, sr),
                base.describe() + f", random {args.image_size}x{args.image_size} crops",
                held.describe() + " (held out)")
    from .datasets import SegmentationDataset

    kw = dict(in_channels=args.in_channels, task=args.task, sr_scale=args.sr_scale)
    train = SegmentationDataset(args.train_data, args.data_format, image_size=args.image_size, train=True,
                                seed=args.seed, **kw)
    if args.image_size is None:
        m = 2 ** (args.depth + 1)
        if len(set(train.shapes)) > 1 or train.shapes[0][0] % m or train.shapes[0][1] % m:
            raise ValueError(f"{args.train_data}: images of sizes {sorted(set(train.shapes))[:4]} (H, W) cannot "
                             f"be batched whole; pass --image-size (a multiple of {m}, e.g. {4 * m}) to train "
                             "on random crops")
    if args.valid_data:
        val = SegmentationDataset(args.valid_data, args.data_format, train=False, **kw)
        return train, val, train.describe(), val.describe()
    if len(train.samples) < 2:
        raise ValueError(f"{args.train_data} holds one image: pass --valid-data DIR for validation")
    full = SegmentationDataset(args.train_data, args.data_format, train=False, **kw)
    order = np.random.default_rng(args.seed).permutation(len(full))
    n_val = max(1, len(full) // 10)
    return (Subset(train, order[n_val:].tolist()), Subset(full, order[:n_val].tolist()),
            f"{train.describe()}; {len(full) - n_val} of them for training",
            f"the other {n_val} (no --valid-data given)")


def set_dataset_epoch(ds: Dataset, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on ``ds`` (or on the dataset a Subset wraps) where it has one."""
    ds = ds.dataset if isinstance(ds, Subset) else ds
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)
