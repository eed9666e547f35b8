"""The training and validation datasets of ``python -m bionet_fast.train``: synthetic nuclei crops
or a dataset folder (split 90/10 when no validation folder is given), and the reproducible
per-epoch sampler (seeded by seed and epoch, sharded over DDP ranks, resumable mid-epoch).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

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

    @property
    def has_instances(self) -> bool:
        """Whether the items carry instance labels (image, mask, labels) for the object metrics."""
        return bool(getattr(self.base, "has_instances", False)) and not self.sr_scale

    def __getitem__(self, i: int):
        image, mask, *labels = self.base[i]
        size = image.shape[-1]
        if self.crop and self.crop < size:
            y, x = np.random.default_rng([self.seed, self.epoch, i]).integers(0, size - self.crop + 1, 2)
            image, mask = (t[:, y:y + self.crop, x:x + self.crop] for t in (image, mask))
            labels = [t[..., y:y + self.crop, x:x + self.crop] for t in labels]
        if self.sr_scale:
            from .datasets import degrade_bicubic

            return degrade_bicubic(image, self.sr_scale), image
        return (image, mask, *labels)


@dataclass(frozen=True)
class DataConfig:
    """What the training data builder needs (typed; the trainer's config makes one).
    train_data None: the synthetic nuclei (n_train training and n_val held-out images)."""

    train_data: Optional[str] = None
    valid_data: Optional[str] = None
    data_format: str = "auto"
    image_size: Optional[int] = 64
    in_channels: int = 3
    task: str = "segmentation"
    sr_scale: int = 2
    size_multiple: int = 16
    seed: int = 0
    n_train: Optional[int] = 512
    n_val: Optional[int] = 48
    classes: int = 1  # > 1: masks are label maps of this many classes
    target: str = "mask"  # "contour": background / interior / boundary classes from instance labels

    @property
    def synthetic(self) -> bool:
        return self.train_data is None


SYNTHETIC_HELDOUT_SEED = 2**31 - 1  # never a training seed of the synthetic runs


def synthetic_heldout(n: int = 48, size: int = 128, channels: int = 3, sr_scale: Optional[int] = None,
                      instances: bool = False) -> tuple[Dataset, str]:
    """The held-out synthetic images the synthetic runs validate on (whole `size` x `size`
    images), and their description; `evaluate --data synthetic` scores the same ones. Items are
    (image, mask), or (image, mask, instance labels) with `instances` (segmentation only)."""
    from .synthetic import SyntheticNucleiDataset

    held = SyntheticNucleiDataset(n, size, seed=SYNTHETIC_HELDOUT_SEED, channels=channels,
                                  instances=instances and not sr_scale)
    return SyntheticCrops(held, None, 0, sr_scale), held.describe() + " (held out)"


def build_data(cfg: DataConfig) -> tuple[Dataset, Dataset, str, str]:
    """(train, validation, train description, validation description); raises ValueError /
    FileNotFoundError naming the file and the expected layout, before anything is trained."""
    sr = cfg.sr_scale if cfg.task == "super-resolution" else None
    if cfg.synthetic:
        from .synthetic import SyntheticNucleiDataset

        size = max(128, cfg.image_size)
        base = SyntheticNucleiDataset(cfg.n_train, size, seed=cfg.seed, channels=cfg.in_channels,
                                      target=cfg.target)
        held, held_text = synthetic_heldout(cfg.n_val, size, cfg.in_channels, sr, instances=True)
        return (SyntheticCrops(base, cfg.image_size, cfg.seed, sr), held,
                base.describe() + f", random {cfg.image_size}x{cfg.image_size} crops", held_text)
    from .datasets import SegmentationDataset
    if cfg.target == "contour":
        raise ValueError("--target contour needs instance labels; folder data sets are read as masks here: "
                         "train it on the synthetic data (no --train-data), or use --target mask")

    kw = dict(in_channels=cfg.in_channels, task=cfg.task, sr_scale=cfg.sr_scale, classes=cfg.classes)
    train = SegmentationDataset(cfg.train_data, cfg.data_format, image_size=cfg.image_size, train=True,
                                seed=cfg.seed, **kw)
    if cfg.image_size is None:
        m = cfg.size_multiple
        if len(set(train.shapes)) > 1 or train.shapes[0][0] % m or train.shapes[0][1] % m:
            raise ValueError(f"{cfg.train_data}: images of sizes {sorted(set(train.shapes))[:4]} (H, W) cannot "
                             f"be batched whole; pass --image-size (a multiple of {m}, e.g. {4 * m}) to train "
                             "on random crops")
    if cfg.valid_data:
        val = SegmentationDataset(cfg.valid_data, cfg.data_format, train=False, return_instances=True, **kw)
        return train, val, train.describe(), val.describe()
    if len(train.samples) < 2:
        raise ValueError(f"{cfg.train_data} holds one image: pass --valid-data DIR for validation")
    full = SegmentationDataset(cfg.train_data, cfg.data_format, train=False, return_instances=True, **kw)
    order = np.random.default_rng(cfg.seed).permutation(len(full))
    n_val = max(1, len(full) // 10)
    return (Subset(train, order[n_val:].tolist()), Subset(full, order[:n_val].tolist()),
            f"{train.describe()}; {len(full) - n_val} of them for training",
            f"the other {n_val} (no --valid-data given)")


def uniform_sizes(ds: Dataset) -> bool:
    """Whether every item of `ds` has the same image shape (so it can be batched): from the
    recorded sizes of a SegmentationDataset (or a Subset of one), else by reading every item."""
    base, idx = (ds.dataset, list(ds.indices)) if isinstance(ds, Subset) else (ds, range(len(ds)))
    if getattr(base, "image_size", None) is None and hasattr(base, "shapes") and hasattr(base, "items"):
        return len({tuple(base.shapes[base.items[i][0]]) for i in idx}) <= 1
    if getattr(base, "image_size", None) and hasattr(base, "items"):
        return True  # tiles / crops of one size
    return len({tuple(ds[i][0].shape) for i in range(len(ds))}) <= 1


def set_dataset_epoch(ds: Dataset, epoch: int) -> None:
    """Call ``set_epoch(epoch)`` on ``ds`` (or on the dataset a Subset wraps) where it has one."""
    ds = ds.dataset if isinstance(ds, Subset) else ds
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)
