"""Data layer: readers, layout discovery and errors, SegmentationDataset items."""
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from hypothesis import given, settings, strategies as st
from PIL import Image

from bionet_fast.data.datasets import SegmentationDataset, Sample, degrade_bicubic, detect_format, discover
from bionet_fast.data.readers import binarize, read_image, read_mask, read_stack, to_float

RNG = np.random.default_rng(0)


def _rgb(h=40, w=48):
    return RNG.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _mask(h=40, w=48):
    return (RNG.random((h, w)) > 0.6).astype(np.uint8)


def _save(path: Path, arr: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix in (".tif", ".tiff"):  # (H, W, 3) is RGB, other 3-d arrays are page stacks
        rgb = arr.ndim == 3 and arr.shape[-1] == 3
        tifffile.imwrite(path, arr, photometric="rgb" if rgb else "minisblack")
    else:
        Image.fromarray(arr).save(path)
    return path


@pytest.fixture
def monuseg(tmp_path):
    """Official MoNuSeg layout: x/NAME.png RGB + y/NAME.png 0/255 masks."""
    for i in range(3):
        _save(tmp_path / "x" / f"img{i}.png", _rgb())
        _save(tmp_path / "y" / f"img{i}.png", _mask() * 255)
    return tmp_path


# ----------------------------------------------------------------------------- readers
def test_read_image_formats(tmp_path):
    rgb = _rgb()
    assert np.array_equal(read_image(_save(tmp_path / "a.png", rgb)), rgb)
    gray16 = RNG.integers(0, 65536, (20, 30), dtype=np.uint16)
    out = read_image(_save(tmp_path / "g16.png", gray16))
    assert out.dtype == np.uint16 and out.shape == (20, 30, 1) and np.array_equal(out[..., 0], gray16)
    out = read_image(_save(tmp_path / "g16.tif", gray16))
    assert out.dtype == np.uint16 and np.array_equal(out[..., 0], gray16)
    assert np.array_equal(read_image(_save(tmp_path / "rgb.tif", rgb)), rgb)
    flt = RNG.random((10, 12)).astype(np.float32)
    assert np.array_equal(read_image(_save(tmp_path / "f.tif", flt))[..., 0], flt)
    rgba = np.dstack([rgb, np.full(rgb.shape[:2], 255, np.uint8)])
    assert read_image(_save(tmp_path / "rgba.png", rgba)).shape == (40, 48, 4)
    Image.fromarray(rgb).convert("P").save(tmp_path / "pal.png")
    assert read_image(tmp_path / "pal.png").shape == (40, 48, 3)
    smooth = np.broadcast_to(np.arange(48, dtype=np.uint8)[None, :, None] * 5, (40, 48, 3))
    Image.fromarray(np.ascontiguousarray(smooth)).save(tmp_path / "a.jpg", quality=95)
    assert np.abs(read_image(tmp_path / "a.jpg").astype(int) - smooth).mean() < 3


def test_to_float():
    assert to_float(np.array([0, 255], np.uint8)).tolist() == [0.0, 1.0]
    assert to_float(np.array([0, 65535], np.uint16)).tolist() == [0.0, 1.0]
    assert to_float(np.array([-0.5, 0.25, 2.0], np.float32) / 2).tolist() == [0.0, 0.125, 1.0]
    np.testing.assert_allclose(to_float(np.array([0.0, 50.0, 200.0])), [0, 0.25, 1])
    assert to_float(np.array([0, 4095], np.int32)).tolist() == [0.0, 1.0]
    assert to_float(np.array([0, 255], np.uint8)).dtype == np.float32


def test_read_mask_variants(tmp_path):
    m = _mask()
    for name, arr in [("m255.png", m * 255), ("m01.png", m), ("m16.tif", m.astype(np.uint16) * 7),
                      ("rgb.png", np.dstack([m * 255, np.zeros_like(m), np.zeros_like(m)]))]:
        out = read_mask(_save(tmp_path / name, arr))
        assert out.dtype == np.uint8 and np.array_equal(out, m), name
    labels = m * RNG.integers(1, 300, m.shape)  # instance label map
    assert np.array_equal(read_mask(_save(tmp_path / "lab.tif", labels.astype(np.uint16))), m)
    rgba = np.dstack([m * 255] * 3 + [np.full(m.shape, 255, np.uint8)])
    assert np.array_equal(read_mask(_save(tmp_path / "rgba.png", rgba)), m)
    pal = Image.fromarray(m * 3).convert("P")  # palette indices are the labels
    pal.putpalette([255, 255, 255] + [0] * 765)  # index 0 drawn white: colours must not matter
    pal.save(tmp_path / "pal.png")
    assert np.array_equal(read_mask(tmp_path / "pal.png"), m)
    Image.fromarray(m * 255).save(tmp_path / "m.jpg", quality=90)
    assert (read_mask(tmp_path / "m.jpg") != m).mean() < 0.05  # lossy: thresholded at half range


@settings(max_examples=10, deadline=None)
@given(st.sampled_from([np.uint8, np.uint16, np.int32, np.float32]), st.integers(1, 4))
def test_binarize_any_dtype_and_channels(dtype, channels):
    m = _mask(7, 9)
    arr = np.repeat((m * 3).astype(dtype)[..., None], channels, axis=-1)
    if channels in (2, 4):
        arr[..., -1] = 1  # alpha is ignored
    assert np.array_equal(binarize(arr), m)


def test_unreadable_file(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    with pytest.raises(ValueError, match=r"bad\.png.*unreadable image"):
        read_image(bad)
    with pytest.raises(FileNotFoundError, match="missing.png"):
        read_image(tmp_path / "missing.png")


# --------------------------------------------------------------------------- layouts
def test_folder_layout_official(monuseg):
    assert detect_format(monuseg) == "folder"
    samples = discover(monuseg)
    assert [s.image.name for s in samples] == ["img0.png", "img1.png", "img2.png"]
    assert all(s.mask == monuseg / "y" / s.image.name and s.index is None for s in samples)


def test_folder_layout_images_masks_with_other_names(tmp_path):
    _save(tmp_path / "images" / "a.png", _rgb())
    _save(tmp_path / "masks" / "a_mask.png", _mask())
    _save(tmp_path / "images" / "b.png", _rgb())
    _save(tmp_path / "masks" / "b.tif", _mask())  # other extension
    samples = discover(tmp_path, "folder")
    assert [(s.image.name, s.mask.name) for s in samples] == [("a.png", "a_mask.png"),
                                                              ("b.png", "b.tif")]


def test_tnbc_layout(tmp_path):
    for slide in ("01", "02"):
        for k in (1, 2):
            _save(tmp_path / f"Slide_{slide}" / f"{slide}_{k}.png", _rgb())
            _save(tmp_path / f"GT_{slide}" / f"{slide}_{k}.png", _mask() * 255)
    assert detect_format(tmp_path) == "tnbc"
    samples = discover(tmp_path)
    assert len(samples) == 4
    assert all(s.mask.parent.name == "GT_" + s.image.parent.name[6:] for s in samples)
    assert all(s.mask.name == s.image.name for s in samples)


def test_tiff_stack_layouts(tmp_path):
    em = tmp_path / "isbi"
    _save(em / "train-volume.tif", RNG.integers(0, 256, (4, 16, 20), dtype=np.uint8))
    _save(em / "train-labels.tif", RNG.integers(0, 2, (4, 16, 20), dtype=np.uint8) * 255)
    assert detect_format(em) == "tiff-stack"
    samples = discover(em)
    assert [s.index for s in samples] == [0, 1, 2, 3] and samples[0].name == "train-volume[0]"
    two = tmp_path / "two"
    for k in (1, 2):
        _save(two / f"stack{k}_image.tif", RNG.integers(0, 256, (k + 1, 8, 8), dtype=np.uint8))
        _save(two / f"stack{k}_membrane.tif", RNG.integers(0, 2, (k + 1, 8, 8), dtype=np.uint8))
    samples = discover(two)
    assert [(s.image.name, s.mask.name, s.index) for s in samples] == [
        ("stack1_image.tif", "stack1_membrane.tif", 0), ("stack1_image.tif", "stack1_membrane.tif", 1),
        ("stack2_image.tif", "stack2_membrane.tif", 0), ("stack2_image.tif", "stack2_membrane.tif", 1),
        ("stack2_image.tif", "stack2_membrane.tif", 2)]
    xy = tmp_path / "xy"
    _save(xy / "x" / "s.tif", RNG.integers(0, 256, (3, 8, 8), dtype=np.uint8))
    _save(xy / "y" / "s.tif", RNG.integers(0, 2, (3, 8, 8), dtype=np.uint8))
    assert detect_format(xy) == "tiff-stack" and len(discover(xy)) == 3


def test_images_layout_for_prediction(tmp_path):
    _save(tmp_path / "a.png", _rgb())
    _save(tmp_path / "b.jpg", _rgb())
    assert detect_format(tmp_path, require_masks=False) == "images"
    assert [s.mask for s in discover(tmp_path, require_masks=False)] == [None, None]
    with pytest.raises(ValueError, match="no masks"):
        discover(tmp_path, "images")


# ---------------------------------------------------------------------------- errors
def test_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"(?s)nope.*does not exist.*folder:"):
        discover(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="nope"):
        SegmentationDataset(tmp_path / "nope")


def test_unknown_layout_lists_expected(tmp_path):
    (tmp_path / "junk.txt").write_text("hi")
    with pytest.raises(ValueError, match=r"junk\.txt(.|\n)*folder:(.|\n)*tnbc:(.|\n)*tiff-stack:"):
        discover(tmp_path)
    with pytest.raises(ValueError, match="unknown dataset format"):
        discover(tmp_path, "monuseg")


def test_image_without_mask(monuseg):
    _save(monuseg / "x" / "lonely.png", _rgb())
    with pytest.raises(ValueError, match=r"image .*lonely\.png has no mask: looked for .*y/lonely"
                                         r"(.|\n)*folder layout"):
        discover(monuseg)


def test_mask_without_image(monuseg):
    _save(monuseg / "y" / "orphan.png", _mask())
    with pytest.raises(ValueError, match=r"mask .*orphan\.png has no image(.|\n)*folder layout"):
        discover(monuseg)


def test_missing_mask_folder_and_tnbc_gt(tmp_path):
    _save(tmp_path / "x" / "a.png", _rgb())
    for fmt in ("folder", "auto"):
        with pytest.raises(FileNotFoundError, match=r"mask folder .*y does not exist.*folder layout"):
            discover(tmp_path, fmt)
    tnbc = tmp_path / "tnbc"
    _save(tnbc / "Slide_03" / "03_1.png", _rgb())
    with pytest.raises(FileNotFoundError, match=r"Slide_03 has no mask folder .*GT_03.*tnbc"):
        discover(tnbc)


def test_mismatched_sizes(monuseg):
    _save(monuseg / "y" / "img1.png", _mask(30, 48))
    with pytest.raises(ValueError, match=r"img1\.png is 48x40 but its mask .*img1\.png is 48x30"
                                         r".*folder layout"):
        SegmentationDataset(monuseg)


def test_empty_dataset(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    with pytest.raises(ValueError, match=r"empty dataset.*folder layout"):
        discover(tmp_path)


def test_unreadable_file_fails_at_construction(monuseg):
    (monuseg / "x" / "img2.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match=r"img2\.png: unreadable image"):
        SegmentationDataset(monuseg)


def test_stack_page_count_mismatch(tmp_path):
    _save(tmp_path / "vol_image.tif", np.zeros((3, 8, 8), np.uint8))
    _save(tmp_path / "vol_label.tif", np.zeros((2, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"vol_image\.tif has 3 pages.*vol_label\.tif has 2.*tiff-stack"):
        discover(tmp_path)


def test_multipage_tiff_in_folder_layout(tmp_path):
    _save(tmp_path / "x" / "a.tif", np.zeros((3, 8, 8), np.uint8))
    _save(tmp_path / "y" / "a.tif", np.zeros((3, 8, 8), np.uint8))
    with pytest.raises(ValueError, match=r"a\.tif is a multi-page TIFF.*--format tiff-stack"):
        SegmentationDataset(tmp_path, "folder")


def test_channel_mismatch_names_the_fix(monuseg):
    with pytest.raises(ValueError, match=r"img0\.png has 3 channels.*--in-channels 3"):
        SegmentationDataset(monuseg, in_channels=2)


# --------------------------------------------------------------------------- dataset
def test_segmentation_items_full_images(monuseg):
    ds = SegmentationDataset(monuseg)
    assert len(ds) == 3 and ds.samples == discover(monuseg)
    image, target = ds[1]
    assert image.shape == (3, 40, 48) and target.shape == (1, 40, 48)
    assert image.dtype == torch.float32 and target.dtype == torch.float32
    rgb = np.array(Image.open(monuseg / "x" / "img1.png"))
    m = np.array(Image.open(monuseg / "y" / "img1.png")) > 0
    assert torch.equal(image, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)
    assert torch.equal(target[0], torch.from_numpy(m).float())
    assert ds.describe() == f"3 images from {monuseg} (folder layout), 48x40, RGB"


def _aligned_dataset(root: Path, h=40, w=48) -> Path:
    """Images whose red channel equals 255 * mask, so crops can be checked for alignment."""
    for i in range(2):
        m = _mask(h, w)
        rgb = _rgb(h, w)
        rgb[..., 0] = m * 255
        _save(root / "x" / f"{i}.png", rgb)
        _save(root / "y" / f"{i}.png", m * 255)
    return root


def test_random_crops_aligned_reproducible_and_vary_by_epoch(tmp_path):
    root = _aligned_dataset(tmp_path)
    ds = SegmentationDataset(root, image_size=32, seed=3)
    crops = [ds[i] for i in range(2)]
    for image, target in crops:
        assert image.shape == (3, 32, 32) and torch.equal(image[0], target[0])
    again = SegmentationDataset(root, image_size=32, seed=3)
    assert all(torch.equal(a[0], b[0]) for a, b in zip(crops, (again[0], again[1])))
    seen = set()
    for epoch in range(8):
        ds.set_epoch(epoch)
        seen.add(ds[0][0].sum().item())
    assert len(seen) > 1


def test_small_images_reflect_padded(tmp_path):
    root = _aligned_dataset(tmp_path, 20, 24)
    image, target = SegmentationDataset(root, image_size=32)[0]
    assert image.shape == (3, 32, 32) and torch.equal(image[0], target[0])
    src = np.asarray(Image.open(root / "x" / "0.png"))[..., 1] / 255
    np.testing.assert_allclose(image[1, 20:22, :24].numpy(), src[[18, 17]], atol=1e-6)


def test_validation_tiles_cover_images(tmp_path):
    root = _aligned_dataset(tmp_path)
    ds = SegmentationDataset(root, image_size=32, train=False)
    assert len(ds) == 8  # 40x48 -> tiles at rows {0, 8} x cols {0, 16}, two images
    full = SegmentationDataset(root)[1][0]
    canvas = torch.zeros_like(full)
    for idx, (i, y, x) in enumerate(ds.items):
        image, target = ds[idx]
        assert torch.equal(image[0], target[0])
        if i == 1:
            canvas[:, y:y + 32, x:x + 32] = image
    assert torch.equal(canvas, full)
    assert "8 tiles of 32x32" in ds.describe()


def test_super_resolution_pairs(tmp_path):
    for i in range(2):
        _save(tmp_path / f"{i}.png", _rgb(32, 36))
    ds = SegmentationDataset(tmp_path, task="super-resolution", sr_scale=2)
    low, high = ds[0]
    assert low.shape == high.shape == (3, 32, 36)
    assert torch.equal(high, torch.from_numpy(read_image(tmp_path / "0.png")).permute(2, 0, 1) / 255)
    assert torch.equal(low, degrade_bicubic(high, 2))
    assert 0 <= low.min() and low.max() <= 1 and "super-resolution x2" in ds.describe()
    # Bicubic degradation removes the finest detail and keeps flat areas.
    checker = (torch.arange(16)[:, None] + torch.arange(16)[None]) % 2
    lr = degrade_bicubic(checker.float().expand(1, 16, 16), 2)
    assert (lr[0] - 0.5).abs()[2:-2, 2:-2].max() < 0.05
    torch.testing.assert_close(degrade_bicubic(torch.full((3, 8, 8), 0.3), 4), torch.full((3, 8, 8), 0.3))
    batch = degrade_bicubic(torch.rand(2, 3, 12, 12), 3)
    assert batch.shape == (2, 3, 12, 12)


def test_channel_conversions(tmp_path):
    gray = RNG.integers(0, 65536, (16, 16), dtype=np.uint16)
    _save(tmp_path / "g" / "x" / "a.png", gray)
    _save(tmp_path / "g" / "y" / "a.png", _mask(16, 16))
    image = SegmentationDataset(tmp_path / "g", in_channels=3)[0][0]
    assert image.shape == (3, 16, 16) and torch.equal(image[0], image[2])
    torch.testing.assert_close(image[0].double(), torch.from_numpy(gray / 65535.0), atol=1e-6, rtol=0)
    rgb = _rgb(16, 16)
    _save(tmp_path / "c" / "x" / "a.png", np.dstack([rgb, np.full((16, 16), 9, np.uint8)]))
    _save(tmp_path / "c" / "y" / "a.png", _mask(16, 16))
    ds = SegmentationDataset(tmp_path / "c", in_channels=1)
    luma = rgb.astype(np.float64) @ [0.299, 0.587, 0.114] / 255
    np.testing.assert_allclose(ds[0][0][0].numpy(), luma, atol=1e-5)
    assert "RGBA -> 1 channel" in ds.describe()
    rgba = SegmentationDataset(tmp_path / "c", in_channels=3)[0][0]
    assert torch.equal(rgba, torch.from_numpy(rgb).permute(2, 0, 1).float() / 255)


def test_stack_dataset_cached_and_uncached_agree(tmp_path):
    vol = RNG.integers(0, 256, (3, 16, 16), dtype=np.uint8)
    lab = RNG.integers(0, 3, (3, 16, 16), dtype=np.uint8)
    _save(tmp_path / "train-volume.tif", vol)
    _save(tmp_path / "train-labels.tif", lab)
    cached = SegmentationDataset(tmp_path, in_channels=1)
    uncached = SegmentationDataset(tmp_path, in_channels=1, cache=False)
    for k in range(3):
        for a, b in zip(cached[k], uncached[k]):
            assert torch.equal(a, b)
        assert torch.equal(cached[k][1][0], torch.from_numpy(lab[k] > 0).float())
        assert torch.equal(cached[k][0][0], torch.from_numpy(vol[k]).float() / 255)
    assert cached.describe() == f"3 slices of 1 stack from {tmp_path} (tiff-stack layout), 16x16, gray"
    loader = torch.utils.data.DataLoader(cached, batch_size=3)
    x, y = next(iter(loader))
    assert x.shape == (3, 1, 16, 16) and y.shape == (3, 1, 16, 16)


def test_sample_name():
    assert Sample(Path("a/b.tif"), None, 3).name == "b[3]"
    assert Sample(Path("a/b.png")).name == "b"


def test_read_stack_pages(tmp_path):
    rgb = RNG.integers(0, 256, (4, 6, 7, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "s.tif", rgb, photometric="rgb")
    assert np.array_equal(read_stack(tmp_path / "s.tif"), rgb)
    assert np.array_equal(read_stack(tmp_path / "s.tif", 2)[0], rgb[2])
