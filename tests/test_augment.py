"""Augment: Keras-semantics affine + flips, applied identically to image and mask."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from bionet_fast.data.augment import Augment, keras_matrices

NO_AFFINE = dict(rotation=0, shift=0, shear=0, zoom=0)


def _blobs(b=2, h=48, w=40, seed=0):
    """Binary masks (B, 1, H, W) of a few large discs (few boundary pixels)."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    masks = torch.zeros(b, 1, h, w)
    for i in range(b):
        for _ in range(3):
            cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w])
            masks[i, 0] += ((yy - cy) ** 2 + (xx - cx) ** 2 < 100).float()
    return masks.clamp(max=1)


def _params(b, **values):
    """Identity parameters for b samples, with some overridden."""
    p = Augment(**NO_AFFINE, hflip=False, vflip=False).sample(b, 8, 8)
    for k, v in values.items():
        p[k] = torch.full((b,), v, dtype=p[k].dtype)
    return p


def _keras_reference(img: np.ndarray, p: dict, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Keras apply_affine_transform, written out in numpy (rows/cols), bilinear, for sample i
    of img (H, W). Returns the output and a mask of pixels that sample strictly inside."""
    h, w = img.shape
    th, sh = float(p["theta"][i]), float(p["shear"][i])
    rot = np.array([[math.cos(th), -math.sin(th), 0], [math.sin(th), math.cos(th), 0], [0, 0, 1]])
    shift = np.array([[1, 0, float(p["tx"][i])], [0, 1, float(p["ty"][i])], [0, 0, 1]])
    shear = np.array([[1, -math.sin(sh), 0], [0, math.cos(sh), 0], [0, 0, 1]])
    zoom = np.diag([float(p["zx"][i]), float(p["zy"][i]), 1.0])
    o = np.array([[1, 0, (h - 1) / 2], [0, 1, (w - 1) / 2], [0, 0, 1]])
    t = o @ rot @ shift @ shear @ zoom @ np.linalg.inv(o)
    rr, cc = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    src = t @ np.stack([rr.ravel(), cc.ravel(), np.ones(rr.size)])
    r, c = src[0].reshape(h, w), src[1].reshape(h, w)
    inside = (r >= 0) & (r <= h - 1) & (c >= 0) & (c <= w - 1)
    r0 = np.clip(np.floor(r), 0, h - 2).astype(int)
    c0 = np.clip(np.floor(c), 0, w - 2).astype(int)
    fr, fc = r - r0, c - c0
    out = (img[r0, c0] * (1 - fr) * (1 - fc) + img[r0 + 1, c0] * fr * (1 - fc)
           + img[r0, c0 + 1] * (1 - fr) * fc + img[r0 + 1, c0 + 1] * fr * fc)
    return out, inside


def test_matches_numpy_keras_reference():
    aug = Augment(rotation=15, shift=0.05, shear=50, zoom=0.2, hflip=False, vflip=False)
    img = torch.rand(3, 1, 23, 31, dtype=torch.float32)
    p = aug.sample(3, 23, 31, torch.Generator().manual_seed(3))
    out, _ = aug.apply(img, torch.zeros_like(img), p)
    for i in range(3):
        ref, inside = _keras_reference(img[i, 0].double().numpy(), p, i)
        assert inside.mean() > 0.5
        np.testing.assert_allclose(out[i, 0].numpy()[inside], ref[inside], atol=1e-4)


def test_rotation_90_is_rot90_and_shift_is_exact():
    x = torch.rand(2, 3, 9, 9)
    m = (torch.rand(2, 1, 9, 9) > 0.5).float()
    aug = Augment(rotation=1)
    xi, mi = aug.apply(x, m, _params(2, theta=math.pi / 2))
    torch.testing.assert_close(xi, torch.rot90(x, -1, (-2, -1)), atol=1e-5, rtol=0)
    assert torch.equal(mi, torch.rot90(m, -1, (-2, -1)))
    xs, ms = aug.apply(x, m, _params(2, tx=2.0, ty=-1.0))  # out[r, c] = in[r + 2, c - 1]
    torch.testing.assert_close(xs[..., :7, 1:], x[..., 2:, :8], atol=1e-5, rtol=0)
    assert torch.equal(ms[..., :7, 1:], m[..., 2:, :8])


def test_shapes_dtypes_and_masks_stay_binary():
    aug = Augment()
    images, masks = torch.rand(4, 3, 48, 40), _blobs(4)
    out_i, out_m = aug(images, masks, torch.Generator().manual_seed(1))
    assert out_i.shape == images.shape and out_m.shape == masks.shape
    assert out_i.dtype == torch.float32 and out_m.dtype == masks.dtype
    assert set(out_m.unique().tolist()) <= {0.0, 1.0}
    assert 0 <= out_i.min() and out_i.max() <= 1
    assert not torch.equal(out_m, masks)
    bool_masks = masks.bool()
    assert aug(images, bool_masks)[1].dtype == torch.bool


def test_image_and_mask_transformed_together():
    masks = _blobs(6)
    images = masks.repeat(1, 3, 1, 1)  # image == mask: the warps must agree
    aug = Augment()
    out_i, out_m = aug(images, masks, torch.Generator().manual_seed(2))
    agree = ((out_i > 0.5).float() == out_m).float().mean()
    assert agree > 0.98, agree
    # With bilinear targets (super-resolution) the two warps are the very same function.
    aug_sr = Augment(mask_mode="bilinear")
    out_i, out_t = aug_sr(images, masks, torch.Generator().manual_seed(2))
    torch.testing.assert_close(out_i, out_t.repeat(1, 3, 1, 1))


def test_flips_exact_and_shared():
    aug = Augment(**NO_AFFINE, hflip=True, vflip=True)
    images = torch.rand(16, 2, 5, 7)
    masks = (torch.rand(16, 1, 5, 7) > 0.5).float()
    out_i, out_m = aug(images, masks, torch.Generator().manual_seed(0))
    seen = set()
    for i in range(16):
        cands = {(h, v): (images[i], masks[i]) for h in (0, 1) for v in (0, 1)}
        for (h, v), (im, m) in cands.items():
            im = im.flip(-1) if h else im
            m = m.flip(-1) if h else m
            cands[(h, v)] = (im.flip(-2) if v else im, m.flip(-2) if v else m)
        hit = [k for k, (im, m) in cands.items() if torch.equal(out_i[i], im)]
        assert len(hit) == 1 and torch.equal(out_m[i], cands[hit[0]][1])
        seen.add(hit[0])
    assert len(seen) == 4  # all four flip combinations occur in 16 samples


def test_identity_when_all_ranges_zero():
    aug = Augment(**NO_AFFINE, hflip=False, vflip=False)
    images, masks = torch.rand(3, 3, 17, 19), _blobs(3, 17, 19)
    out_i, out_m = aug(images, masks)
    assert torch.equal(out_i, images) and torch.equal(out_m, masks)


def test_reproducible_with_seeded_generator_and_global_seed():
    aug = Augment()
    images, masks = torch.rand(3, 3, 32, 32), _blobs(3, 32, 32)
    a = aug(images, masks, torch.Generator().manual_seed(7))
    b = aug(images, masks, torch.Generator().manual_seed(7))
    c = aug(images, masks, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    torch.manual_seed(5)
    d = aug(images, masks)
    torch.manual_seed(5)
    e = aug(images, masks)
    assert torch.equal(d[0], e[0]) and torch.equal(d[1], e[1])


def test_samples_get_different_transforms_and_ranges_respected():
    aug = Augment()
    p = aug.sample(2000, 100, 50, torch.Generator().manual_seed(0))
    assert p["theta"].abs().max() <= math.radians(15) and p["theta"].std() > 0.1
    assert p["tx"].abs().max() <= 5.0 and p["ty"].abs().max() <= 2.5
    assert p["shear"].abs().max() <= math.radians(50)
    for z in ("zx", "zy"):
        assert 0.8 <= p[z].min() and p[z].max() <= 1.2
    assert not torch.equal(p["zx"], p["zy"])  # Keras draws the two zoom factors independently
    assert 0.4 < p["hflip"].float().mean() < 0.6 and 0.4 < p["vflip"].float().mean() < 0.6


def test_keras_matrices_identity_and_bad_arguments():
    m = keras_matrices(_params(2), 10, 12)
    torch.testing.assert_close(m, torch.eye(3, dtype=torch.float64).expand(2, 3, 3))
    with pytest.raises(ValueError, match="zoom"):
        Augment(zoom=1.5)
    with pytest.raises(ValueError, match="padding"):
        Augment(padding="wrap")
    with pytest.raises(ValueError, match=r"\(B, C, H, W\)"):
        Augment()(torch.rand(1, 3, 8, 8), torch.rand(1, 1, 8, 9))


@settings(max_examples=8, deadline=None)
@given(b=st.integers(1, 3), h=st.integers(3, 21), w=st.integers(3, 21), seed=st.integers(0, 99))
def test_odd_shapes_consistent(b, h, w, seed):
    images = torch.rand(b, 1, h, w)
    out_i, out_t = Augment(mask_mode="bilinear")(images, images.clone(),
                                                 torch.Generator().manual_seed(seed))
    assert out_i.shape == (b, 1, h, w)
    torch.testing.assert_close(out_i, out_t)
    masks = (images > 0.5).float()
    out_m = Augment()(images, masks, torch.Generator().manual_seed(seed))[1]
    assert set(out_m.unique().tolist()) <= {0.0, 1.0}


def _kornia_apply(aug, images, masks, p):
    """The previous implementation (kornia's warp_affine), kept as the reference of the port."""
    from kornia.geometry.transform import warp_affine  # kornia is in the [test] extra only for this

    height, width = images.shape[-2:]
    fwd = torch.linalg.inv(keras_matrices(p, height, width))[:, :2].to(torch.float32)
    out_i = warp_affine(images, fwd, (height, width), mode="bilinear", padding_mode=aug.padding,
                        align_corners=True)
    out_m = warp_affine(masks.float(), fwd, (height, width), mode=aug.mask_mode,
                        padding_mode=aug.padding, align_corners=True)
    return out_i, out_m


@pytest.mark.parametrize("padding", ["reflection", "zeros", "border"])
def test_same_output_as_the_kornia_implementation(padding):
    """Images: both sample the same bilinear points, computed in float32 along different roundings
    (kornia inverts the matrix in float32 and normalises it itself); coordinates then differ by
    ~1e-5 px, so values in [0, 1] by at most ~1e-5 times the local gradient (< 1): atol 1e-4.
    Masks (nearest): a pixel can flip only where its source point lies within ~1e-5 px of a
    half-integer, i.e. on a rounding tie; we allow 0.1 % of the pixels and require 99.9 % equal."""
    aug = Augment(padding=padding, hflip=False, vflip=False)
    images, masks = torch.rand(6, 3, 48, 40), _blobs(6)
    p = aug.sample(6, 48, 40, torch.Generator().manual_seed(11))
    out_i, out_m = aug.apply(images, masks, p)
    ref_i, ref_m = _kornia_apply(aug, images, masks, p)
    torch.testing.assert_close(out_i, ref_i, atol=1e-4, rtol=0)
    assert (out_m != ref_m).float().mean() <= 1e-3
    aug_sr = Augment(padding=padding, mask_mode="bilinear", hflip=False, vflip=False)
    torch.testing.assert_close(aug_sr.apply(images, images[:, :1], p)[1],
                               _kornia_apply(aug_sr, images, images[:, :1], p)[1], atol=1e-4, rtol=0)
