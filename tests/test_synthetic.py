"""Synthetic H&E-like nuclei: shapes, determinism, appearance, speed, Dataset wrapper."""

import numpy as np
import pytest
import torch

from bionet_fast.data.synthetic import SyntheticNucleiDataset, make_synthetic_nuclei


@pytest.fixture(scope="module")
def batch():
    return make_synthetic_nuclei(40, size=128, seed=0)


def test_shapes_dtypes_and_binary_masks(batch):
    images, masks = batch
    assert images.shape == (40, 128, 128, 3) and images.dtype == np.uint8
    assert masks.shape == (40, 128, 128) and masks.dtype == np.uint8
    assert set(np.unique(masks)) <= {0, 1}
    frac = masks.mean(axis=(1, 2))
    assert 0.02 < frac.mean() < 0.35 and (frac > 0).mean() > 0.9


def test_deterministic_per_seed_and_prefix_stable(batch):
    images, masks = make_synthetic_nuclei(20, seed=0)
    assert np.array_equal(images, batch[0][:20]) and np.array_equal(masks, batch[1][:20])
    other = make_synthetic_nuclei(20, seed=1)
    assert not np.array_equal(other[1], masks)
    # Images differ from one another within a seed too.
    assert not np.array_equal(images[0], images[1])


def test_nuclei_darker_and_bluer_than_background(batch):
    images, masks = batch
    rgb = images.astype(np.float64)
    luma = rgb @ np.array([0.299, 0.587, 0.114])
    for img, lum, m in zip(rgb, luma, masks.astype(bool)):
        if m.sum() < 50:
            continue
        assert lum[m].mean() < lum[~m].mean() - 30
        # Hematoxylin is purple-blue, eosin pink: blue/red is higher inside nuclei.
        blue_red = img[..., 2] / (img[..., 0] + 1)
        assert blue_red[m].mean() > blue_red[~m].mean()
    # Background is pink: red above green on average.
    bg = rgb[~masks.astype(bool)]
    assert bg[:, 0].mean() > bg[:, 1].mean() + 20


def test_learnable_but_varied(batch):
    """A per-dataset threshold already separates most pixels (the task is learnable), while
    stain intensity varies between images (it is not one fixed colour)."""
    images, masks = batch
    red = images[..., 0].astype(np.float64)
    dice = max(2 * ((red < t) & (masks > 0)).sum() / ((red < t).sum() + masks.sum())
               for t in range(60, 240, 10))
    assert dice > 0.8
    bg_means = [img[m == 0].mean() for img, m in zip(images, masks)]
    assert np.std(bg_means) > 3


def test_gray_and_other_sizes():
    gray, masks = make_synthetic_nuclei(3, size=64, seed=2, channels=1)
    assert gray.shape == (3, 64, 64, 1) and masks.shape == (3, 64, 64)
    rgb, masks_rgb = make_synthetic_nuclei(3, size=64, seed=2)
    assert np.array_equal(masks, masks_rgb)
    luma = rgb.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    assert np.abs(gray[..., 0] - luma).max() <= 0.5 + 1e-9
    big = make_synthetic_nuclei(2, size=200, seed=0)[1]
    assert big.shape == (2, 200, 200)
    assert make_synthetic_nuclei(0)[0].shape == (0, 128, 128, 3)
    with pytest.raises(ValueError, match="channels"):
        make_synthetic_nuclei(1, channels=2)


def test_dataset_items():
    ds = SyntheticNucleiDataset(6, size=64, seed=4)
    assert len(ds) == 6
    image, mask = ds[5]
    assert image.shape == (3, 64, 64) and mask.shape == (1, 64, 64)
    assert image.dtype == torch.float32 and mask.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert set(mask.unique().tolist()) <= {0.0, 1.0}
    images, masks = make_synthetic_nuclei(6, size=64, seed=4)
    assert torch.equal(image, torch.from_numpy(images[5]).permute(2, 0, 1).float() / 255)
    assert torch.equal(mask[0], torch.from_numpy(masks[5]).float())
    held_out = SyntheticNucleiDataset(6, size=64, seed=5)
    assert not torch.equal(held_out[0][1], ds[0][1])
    assert SyntheticNucleiDataset(2, channels=1)[0][0].shape == (1, 128, 128)
    assert "6 synthetic" in ds.describe() and "64x64" in ds.describe()
    loader = torch.utils.data.DataLoader(ds, batch_size=4)
    x, y = next(iter(loader))
    assert x.shape == (4, 3, 64, 64) and y.shape == (4, 1, 64, 64)
