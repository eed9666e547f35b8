"""Bounded-memory prediction (engine.slide readers, engine.streaming) against the in-memory path,
and outputs the tools open: axes, pixel size, every page of a mixed-size TIFF."""
from __future__ import annotations

import numpy as np
import pytest
import tifffile
import torch

from bionet_fast.engine.prediction.inference import infer, window_predictor
from bionet_fast.engine.precision import autocast_context, default_precision, resolve_precision
from bionet_fast.engine.prediction.slide import ArrayReader, TiffReader, open_slide
from bionet_fast.engine.prediction.streaming import StreamOptions, predict_rows, tissue_mask
from bionet_fast.models import BiONet
from bionet_fast.predict import main as predict


def _model(classes: int = 1, in_channels: int = 3) -> BiONet:
    torch.manual_seed(0)
    m = BiONet(in_channels=in_channels, classes=classes, iterations=2, multiplier=0.125, depth=2,
               backend="reference").eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so outputs are not all ~0.5
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 1.5)
    return m


def _image(h: int = 200, w: int = 150, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    img = np.full((h, w, 3), 220, np.float32) + rng.normal(0, 10, (h, w, 3))
    for _ in range(25):
        cy, cx, r = rng.integers(0, h), rng.integers(0, w), rng.integers(5, 14)
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (90, 40, 140)
    return np.clip(img, 0, 255).astype(np.uint8)


def _streamed(reader, model, opts, autocast=None, channels_last=False) -> np.ndarray:
    run = window_predictor(model, "segmentation", autocast, channels_last)
    rows = list(predict_rows(reader, run, model.config.in_channels, model.size_multiple, opts, torch.device("cpu")))
    return np.concatenate(rows, axis=1)


@pytest.mark.parametrize("layout", [dict(tile=(64, 64)), dict(rowsperstrip=16, compression="zlib"), {}])
def test_lazy_reader_equals_the_whole_image(tmp_path, layout):
    img = _image(150, 130)
    path = tmp_path / "im.tif"
    tifffile.imwrite(path, img, photometric="rgb", **layout)
    r = open_slide(path)
    assert r.shape == (150, 130, 3) and r.dtype == np.uint8
    for y, x, h, w in [(0, 0, 150, 130), (17, 33, 100, 90), (140, 120, 10, 10), (63, 63, 2, 2)]:
        np.testing.assert_array_equal(r.read(y, x, h, w), img[y:y + h, x:x + w])
    thumb, factor = r.thumbnail(max_side=40)
    np.testing.assert_array_equal(thumb, img[::int(factor), ::int(factor)])
    r.close()


def test_bounded_equals_in_memory_fp32(tmp_path):
    """Tiled TIFF read lazily, one row of windows at a time == infer() on the whole image."""
    img = _image()
    path = tmp_path / "slide.tif"
    tifffile.imwrite(path, img, photometric="rgb", tile=(64, 64))
    model = _model()
    x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1) / 255)[None]
    want = infer(model, x, "segmentation", 64, 0.25, sw_batch_size=3)[0].numpy()
    reader = TiffReader(path)
    seen = []
    read = reader.read
    reader.read = lambda y, x0, h, w: seen.append(h) or read(y, x0, h, w)
    got = _streamed(reader, model, StreamOptions(64, 0.25, 5, progress=False))
    assert got.shape == (1, 200, 150) and 0.02 < want.std()  # a non-constant output
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    assert max(seen) <= 64  # never more than one window-high band of the input is read at once


def test_bf16_close_to_fp32():
    """bf16 keeps 8 mantissa bits (relative error 2**-9 per rounding); through ~10 conv layers the
    logits drift by ~1e-2 relative, and sigmoid's slope (<= 1/4) turns that into probability
    errors of a few 1e-3: we allow 0.03 at the worst pixel and 3e-3 on average."""
    img = _image(130, 100)
    model = _model()
    opts = StreamOptions(64, 0.25, 4, progress=False)
    fp32 = _streamed(ArrayReader(img), model, opts)
    bf16 = _streamed(ArrayReader(img), model, opts, autocast_context("bf16", torch.device("cpu")), True)
    err = np.abs(fp32 - bf16)
    assert err.max() < 0.03 and err.mean() < 3e-3
    assert err.max() > 0  # it really ran in bf16


def test_precision_defaults_and_errors():
    assert default_precision(torch.device("cuda")) == "bf16"
    assert resolve_precision("fp32", torch.device("cpu")) == "fp32"
    with pytest.raises(ValueError, match="--precision fp16"):
        resolve_precision("fp16", torch.device("cpu"))


def test_tissue_only_skips_background_windows():
    img = np.full((128, 256, 3), 245, np.uint8)
    img[:, :64] = _image(128, 64)  # tissue on the left only
    calls = []

    def predictor(w):
        calls.append(w.shape[0])
        return torch.full((w.shape[0], 1, *w.shape[-2:]), 0.9)

    thumb = img[::4, ::4]
    opts = StreamOptions(64, 0.0, 8, tissue_only=True, progress=False)
    rows = np.concatenate(list(predict_rows(ArrayReader(img), predictor, 3, 16, opts, torch.device("cpu"),
                                            tissue=(tissue_mask(thumb), 4.0))), axis=1)
    assert sum(calls) == 2  # 2 of 8 windows hold tissue
    assert np.allclose(rows[0, :, :64], 0.9) and np.all(rows[0, :, 64:] == 0)
    # tissue only on the right, in the second row of windows, several classes: skipped = class 0
    img = np.full((128, 256, 3), 245, np.uint8)
    img[64:, 192:] = _image(64, 64)
    three = lambda w: torch.softmax(torch.ones(w.shape[0], 3, *w.shape[-2:]) * torch.arange(3.0)[:, None, None], 1)  # noqa: E731
    rows = np.concatenate(list(predict_rows(ArrayReader(img), three, 3, 16, opts, torch.device("cpu"),
                                            tissue=(tissue_mask(img[::4, ::4]), 4.0), classes=3)), axis=1)
    assert rows.shape == (3, 128, 256) and np.all(rows[0, :64] == 1) and np.all(rows.argmax(0)[64:, 192:] == 2)


def _ckpt(tmp_path, classes=1, in_channels=3):
    folder = tmp_path / f"model{classes}"
    _model(classes, in_channels).save_pretrained(folder)
    return folder


def test_cli_slide_pixel_size_round_trip_and_tiled_outputs(tmp_path):
    img = _image()
    src = tmp_path / "in" / "slide.tif"
    src.parent.mkdir()
    tifffile.imwrite(src, img, photometric="rgb", tile=(64, 64), resolution=(1e4 / 0.5, 1e4 / 0.5),
                     resolutionunit="CENTIMETER")
    out = tmp_path / "out"
    assert predict(["--checkpoint", str(_ckpt(tmp_path)), str(src), "--out", str(out), "--tile-size", "128",
                    "--precision", "fp32", "--instances", "--no-progress"]) == 0
    for name in ("slide_mask.tif", "slide_prob.tif", "slide_labels.tif"):
        with tifffile.TiffFile(out / name) as tif:
            page = tif.pages[0]
            assert tif.is_bigtiff and page.is_tiled and page.samplesperpixel == 1 and page.shape == (200, 150)
        r = open_slide(out / name)
        assert r.mpp == pytest.approx(0.5)
        r.close()
    prob = tifffile.imread(out / "slide_prob.tif")
    mask = tifffile.imread(out / "slide_mask.tif")
    assert prob.dtype == np.uint16 and set(np.unique(mask)) <= {0, 255}
    assert ((prob > 32767) == (mask == 255)).mean() > 0.999
    assert not list(out.glob(".*"))  # no temporary files left


def test_cli_three_class_probabilities_are_three_channels(tmp_path):
    ckpt = _ckpt(tmp_path, classes=3)
    img = _image(100, 90)
    tifffile.imwrite(tmp_path / "t.tif", img, photometric="rgb", tile=(32, 32))
    from PIL import Image
    Image.fromarray(img).save(tmp_path / "p.png")
    out = tmp_path / "out"
    assert predict(["--checkpoint", str(ckpt), str(tmp_path / "t.tif"), str(tmp_path / "p.png"), "--out", str(out),
                    "--tile-size", "64", "--precision", "fp32", "--no-progress"]) == 0
    with tifffile.TiffFile(out / "t_prob.tif") as tif:  # tiled slide output: OME, one grey page per class
        assert tif.series[0].axes == "CYX" and tif.series[0].shape == (3, 100, 90)
        assert len(tif.pages) == 3 and all(p.aspage().samplesperpixel == 1 for p in tif.pages)
        probs = tif.series[0].asarray()
    np.testing.assert_allclose(probs.astype(np.float64).sum(0) / 65535, 1, atol=3e-4)  # softmax
    with tifffile.TiffFile(out / "p_prob.tif") as tif:  # small image: ImageJ hyperstack, 3 channels
        assert tif.is_imagej and tif.imagej_metadata["channels"] == 3 and tif.series[0].shape == (3, 100, 90)
    mask = np.asarray(Image.open(out / "p_mask.png"))
    np.testing.assert_array_equal(mask, tifffile.imread(out / "p_prob.tif").argmax(0))


def test_cli_three_slice_stack_is_three_grey_pages(tmp_path):
    ckpt = _ckpt(tmp_path, in_channels=1)
    stack = _image(64, 48)[None].repeat(3, 0)[..., 0]  # (3, 64, 48) grey
    tifffile.imwrite(tmp_path / "s.tif", stack, imagej=True, resolution=(2.0, 2.0), metadata={"unit": "um"})
    out = tmp_path / "out"
    assert predict(["--checkpoint", str(ckpt), str(tmp_path / "s.tif"), "--out", str(out), "--tile-size", "32",
                    "--precision", "fp32", "--no-progress"]) == 0
    with tifffile.TiffFile(out / "s_mask.tif") as tif:
        assert tif.is_imagej and len(tif.pages) == 3 and all(p.aspage().samplesperpixel == 1 for p in tif.pages)
        assert tif.series[0].axes == "ZYX" and tif.imagej_metadata["unit"] == "um"
        assert tif.pages[0].resolution == pytest.approx((2.0, 2.0))
    with tifffile.TiffFile(out / "s_prob.tif") as tif:
        assert tif.series[0].shape == (3, 64, 48)  # Z = 3, one class


def test_cli_tiff_pages_of_different_sizes_are_all_predicted(tmp_path, capsys):
    ckpt = _ckpt(tmp_path)
    with tifffile.TiffWriter(tmp_path / "mixed.tif") as tw:
        tw.write(_image(40, 50), photometric="rgb")
        tw.write(_image(70, 30, seed=1), photometric="rgb")
    out = tmp_path / "out"
    assert predict(["--checkpoint", str(ckpt), str(tmp_path / "mixed.tif"), "--out", str(out), "--tile-size", "32",
                    "--precision", "fp32", "--no-progress"]) == 0
    assert "2 pages of different sizes" in capsys.readouterr().err
    with tifffile.TiffFile(out / "mixed_mask.tif") as tif:
        assert [p.shape for p in tif.pages] == [(40, 50), (70, 30)]


def test_reader_errors_name_the_fix(tmp_path):
    (tmp_path / "x.mrxs").write_bytes(b"")
    try:
        import tiffslide  # noqa: F401
    except ImportError:
        try:
            import openslide  # noqa: F401
        except ImportError:
            with pytest.raises(ValueError, match=r"bionet_fast\[slides\]"):
                open_slide(tmp_path / "x.mrxs")
    tifffile.imwrite(tmp_path / "plain.tif", _image(40, 40), photometric="rgb")
    with pytest.raises(ValueError, match="--level 2: .* 1 pyramid level"):
        open_slide(tmp_path / "plain.tif", level=2)
    with pytest.raises(ValueError, match="--mpp 0.5: .* does not record its pixel size"):
        open_slide(tmp_path / "plain.tif", mpp=0.5)


def test_mpp_picks_the_nearest_pyramid_level(tmp_path):
    img = _image(128, 96)
    with tifffile.TiffWriter(tmp_path / "pyr.tif", bigtiff=True) as tw:
        tw.write(img, tile=(32, 32), subifds=1, photometric="rgb", resolution=(1e4 / 0.25, 1e4 / 0.25),
                 resolutionunit="CENTIMETER")
        tw.write(img[::2, ::2], tile=(32, 32), subfiletype=1, photometric="rgb")
    r = open_slide(tmp_path / "pyr.tif", mpp=0.6)
    assert r.shape == (64, 48, 3) and r.mpp == pytest.approx(0.5)
    np.testing.assert_array_equal(r.read(0, 0, 64, 48), img[::2, ::2])
    r.close()


@pytest.mark.parametrize("overlap", [0.0, 0.6, 0.8])
@pytest.mark.parametrize("shape", [(130, 70), (37, 50), (20, 200)])
def test_streamed_rows_equal_sliding_window_inference(overlap, shape):
    """Any overlap (the accumulator shifts by less or more than half a window) and images smaller
    than the window along one side (padded exactly as the in-memory path pads)."""
    from bionet_fast.engine.prediction.tiling import sliding_window_inference

    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 5, padding=2), torch.nn.Sigmoid())
    img = _image(*shape)
    x = torch.from_numpy(img.astype(np.float32).transpose(2, 0, 1) / 255)[None]
    with torch.no_grad():
        want = sliding_window_inference(x, 32, 3, conv, overlap, size_multiple=16)[0].numpy()
    got = _streamed_fn(ArrayReader(img), conv, StreamOptions(32, overlap, 3, progress=False))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def _streamed_fn(reader, fn, opts):
    rows = list(predict_rows(reader, fn, 3, 16, opts, torch.device("cpu")))
    return np.concatenate(rows, axis=1)


def _traced_peak(tmp_path, h: int, w: int) -> int:
    """tracemalloc's peak (numpy buffers, the readers' decoded tiles, the writers' tiles and the
    blend carry) while a (h, w) tiled TIFF goes through predict_image with a one-layer predictor."""
    import tracemalloc

    from bionet_fast.engine.prediction.whole_slide import OutputOptions, predict_image

    path = tmp_path / f"w{w}.tif"
    tile = np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    tifffile.imwrite(path, (tile for _ in range(-(-h // 64) * -(-w // 64))), shape=(h, w, 3), dtype=np.uint8,
                     tile=(64, 64), photometric="rgb")
    torch.manual_seed(0)
    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 1, 3, padding=1), torch.nn.Sigmoid()).eval()
    reader = TiffReader(path)
    out = tmp_path / f"out{w}"
    tracemalloc.start()
    try:
        predict_image(reader, conv, 3, 1, 16, StreamOptions(512, 0.125, 4, progress=False), OutputOptions(),
                      out, "s", torch.device("cpu"))
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
        reader.close()


def test_bounded_memory_does_not_grow_with_the_width(tmp_path):
    """Doubling the width (several rows of windows, tile rows cut by window rows, the blend carry)
    adds less than 20% to the peak: the input is read per window, each row of windows is blended
    and written in column blocks, and only the carried rows (and the tiles of one row of tiles)
    span the width. The previous row-band path held several float32 rows of windows' height."""
    narrow, wide = _traced_peak(tmp_path, 960, 1800), _traced_peak(tmp_path, 960, 3600)
    assert wide < 1.2 * narrow, (narrow, wide)
    with tifffile.TiffFile(tmp_path / "out3600" / "s_prob.tif") as tif:
        assert tif.pages[0].is_tiled and tif.pages[0].shape == (960, 3600)
