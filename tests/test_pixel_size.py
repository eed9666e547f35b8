"""Pixel size end to end: read from the files with their units, recorded by training, honoured by
predict (the next finer pyramid level, resampled), outputs in level-0 coordinates; and the output
formats the tools open natively (uint16 labels, QuPath names and classes, ImageJ ROIs, regionprops
columns)."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from bionet_fast.data.pixel_size import dataset_mpp, file_mpp
from bionet_fast.engine.prediction.instances import InstanceWriter
from bionet_fast.engine.prediction.label_writer import LabelWriter
from bionet_fast.engine.prediction.pixel_size import (ResampledReader, SlideGeometry, level_index, min_area_pixels,
                                           open_for_prediction)
from bionet_fast.engine.prediction.slide import ArrayReader
from bionet_fast.engine.prediction.streaming import StreamOptions
from bionet_fast.engine.prediction.whole_slide import OutputOptions, predict_image

# true nuclei in level-0 pixels of a 0.25 um/px slide: (cy, cx, radius); radii 3-4 um
NUCLEI = [(40.3, 50.7, 14), (60.0, 180.2, 12), (150.5, 90.5, 16), (200.8, 200.1, 13), (120.2, 230.6, 12),
          (225.0, 40.4, 15)]
SIZE = 256


def _slide_level0() -> np.ndarray:
    """(256, 256, 3) uint8: dark discs (nuclei) on a light background, drawn by pixel centres."""
    yy, xx = np.mgrid[:SIZE, :SIZE] + 0.5
    img = np.full((SIZE, SIZE, 3), 225, np.uint8)
    for cy, cx, r in NUCLEI:
        img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (60, 30, 110)
    return img


def _pyramid(path, factor: int, mpp0: float = 0.25):
    """A two-level pyramidal TIFF: level 0 at mpp0, level 1 block-averaged by `factor`."""
    img = _slide_level0()
    low = img.reshape(SIZE // factor, factor, SIZE // factor, factor, 3).mean((1, 3)).round().astype(np.uint8)
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(img, tile=(64, 64), subifds=1, photometric="rgb", resolution=(1e4 / mpp0, 1e4 / mpp0),
                 resolutionunit="CENTIMETER")
        tw.write(low, tile=(32, 32), subfiletype=1, photometric="rgb")
    return img


def _dark(x: torch.Tensor) -> torch.Tensor:
    """A deterministic stand-in for a model: nucleus probability from darkness (N, 1, h, w)."""
    return torch.sigmoid((0.55 - x.mean(1, keepdim=True)) * 40)


def _ring_centroid(ring) -> tuple[float, float]:
    p = np.asarray(ring, np.float64)
    x0, y0, x1, y1 = p[:-1, 0], p[:-1, 1], p[1:, 0], p[1:, 1]
    cross = x0 * y1 - x1 * y0
    a = cross.sum() / 2
    return float(((x0 + x1) * cross).sum() / (6 * a)), float(((y0 + y1) * cross).sum() / (6 * a))


@pytest.mark.parametrize("factor", [2, 4])  # levels 0.25 / 0.5 (level 1 read as it is), 0.25 / 1.0 (level 0 resampled)
def test_centroids_land_on_the_level0_nuclei(tmp_path, factor):
    _pyramid(tmp_path / "s.tif", factor)
    reader, geo = open_for_prediction(tmp_path / "s.tif", target_mpp=0.5)
    assert reader.shape[:2] == (128, 128) and geo.level0_shape == (SIZE, SIZE)
    assert geo.mpp == pytest.approx(0.5) and geo.level0_mpp == pytest.approx(0.25)
    assert isinstance(reader, ResampledReader) == (factor == 4)
    opts = OutputOptions("tiff", True, True, True, min_area=min_area_pixels(None, geo), rois=True)
    out = tmp_path / "out"
    try:
        predict_image(reader, _dark, 3, 1, 8, StreamOptions(64, 0.25, 4, progress=False), opts, out, "s",
                      torch.device("cpu"), geo)
    finally:
        reader.close()
    with tifffile.TiffFile(out / "s_labels.tif") as tif:  # level-0 size and pixel size, uint16
        labels = tif.asarray()
        assert labels.shape == (SIZE, SIZE) and labels.dtype == np.uint16
        assert 1e4 / tif.pages[0].resolution[0] == pytest.approx(0.25)
    assert tifffile.imread(out / "s_mask.tif").shape == (SIZE, SIZE)
    feats = json.loads((out / "s.geojson").read_text())["features"]
    assert len(feats) == len(NUCLEI) == labels.max()
    rows = {int(r["label"]): r for r in csv.DictReader((out / "s_nuclei.csv").open())}
    for f in feats:
        cx, cy = _ring_centroid(f["geometry"]["coordinates"][0])
        dist = [np.hypot(cx - tx, cy - ty) for ty, tx, _ in NUCLEI]
        assert min(dist) < 1.0, (cx, cy)  # within one level-0 pixel of a true nucleus
        row = rows[f["properties"]["label"]]
        assert float(row["centroid_x"]) == pytest.approx(cx, abs=0.5)
        assert float(row["centroid_x_um"]) == pytest.approx(float(row["centroid_x"]) * 0.25, abs=3e-3)
        ty, tx, r = NUCLEI[int(np.argmin(dist))]
        m = f["properties"]["measurements"]
        assert m["Area µm^2"] == pytest.approx(np.pi * (r * 0.25) ** 2, rel=0.15)
        assert 0.85 < m["Circularity"] <= 1.0 and 0.85 < m["Solidity"] <= 1.0
        ys, xs = np.nonzero(labels == f["properties"]["label"])  # the labels agree with the polygon
        assert abs(xs.mean() + 0.5 - cx) < 0.5 and abs(ys.mean() + 0.5 - cy) < 0.5


def test_cli_predicts_at_the_models_pixel_size_and_writes_level0(tmp_path):
    from bionet_fast.models import BiONet
    from bionet_fast.models.config import InferenceInfo
    from bionet_fast.predict import main as predict

    _pyramid(tmp_path / "s.tif", 2)
    torch.manual_seed(0)
    model = BiONet(in_channels=3, classes=1, iterations=1, multiplier=0.125, depth=2, backend="reference")
    model.inference_info = InferenceInfo(mpp=0.5)
    model.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "config.json").read_text())["inference"]["mpp"] == 0.5
    common = ["--checkpoint", str(tmp_path / "m"), str(tmp_path / "s.tif"), "--tile-size", "64", "--precision",
              "fp32", "--no-progress", "--prob-format", "tiff"]
    assert predict(common + ["--out", str(tmp_path / "a"), "--instances"]) == 0
    assert predict(common + ["--out", str(tmp_path / "b"), "--level", "1"]) == 0
    assert predict(common + ["--out", str(tmp_path / "c"), "--mpp", "0.25"]) == 0
    a, b, c = (tifffile.imread(tmp_path / d / "s_prob.tif") for d in "abc")
    assert a.shape == b.shape == c.shape == (SIZE, SIZE)  # level-0 coordinates whatever was predicted
    np.testing.assert_array_equal(a, b)  # the model's 0.5 um/px is level 1, read as it is
    assert not np.array_equal(a, c)  # --mpp overrides
    assert np.array_equal(a[::2, ::2], a[1::2, 1::2])  # nearest: one predicted pixel per 2 x 2
    assert tifffile.imread(tmp_path / "a" / "s_labels.tif").shape == (SIZE, SIZE)
    Image.fromarray(_slide_level0()[:100, :120]).save(tmp_path / "p.png", dpi=(25400 / 0.25, 25400 / 0.25))
    assert predict(common[:2] + [str(tmp_path / "p.png")] + common[3:] + ["--out", str(tmp_path / "d")]) == 0
    assert tifffile.imread(tmp_path / "d" / "p_prob.tif").shape == (1, 100, 120)  # resampled, written at its size
    assert np.asarray(Image.open(tmp_path / "d" / "p_mask.png")).shape == (100, 120)


def test_slide_without_pixel_size_is_predicted_natively_with_one_warning(tmp_path):
    tifffile.imwrite(tmp_path / "plain.tif", _slide_level0(), photometric="rgb", tile=(64, 64))
    said = []
    reader, geo = open_for_prediction(tmp_path / "plain.tif", 0.5, warn=lambda m, **k: said.append(m))
    reader.close()
    assert geo.identity and geo.mpp is None and reader.shape[:2] == (SIZE, SIZE)
    assert len(said) == 1 and "records no pixel size" in said[0] and "native resolution" in said[0]


@pytest.mark.parametrize("size,unit,want", [(250, "nm", 0.25), (0.0005, "mm", 0.5), (0.5, "µm", 0.5),
                                            (2500, "Å", 0.25), (None, None, None)])
def test_ome_physical_size_units(tmp_path, size, unit, want):
    meta = {"axes": "YXS"}
    if size is not None:
        meta.update(PhysicalSizeX=size, PhysicalSizeY=size, PhysicalSizeXUnit=unit, PhysicalSizeYUnit=unit)
    tifffile.imwrite(tmp_path / "x.ome.tif", _slide_level0()[:32, :32], photometric="rgb", metadata=meta)
    assert file_mpp(tmp_path / "x.ome.tif") == (pytest.approx(want) if want else None)


def test_other_pixel_size_sources_and_implausible_values(tmp_path):
    img = _slide_level0()[:16, :16]
    tifffile.imwrite(tmp_path / "svs.tif", img, photometric="rgb", description="Aperio Image|MPP = 0.2520|AppMag = 40")
    tifffile.imwrite(tmp_path / "in.tif", img, photometric="rgb", resolution=(25400 / 0.5, 25400 / 0.5),
                     resolutionunit="INCH")
    tifffile.imwrite(tmp_path / "ij.tif", img[..., 0], imagej=True, resolution=(4.0, 4.0), metadata={"unit": "micron"})
    tifffile.imwrite(tmp_path / "dpi72.tif", img, photometric="rgb", resolution=(72, 72), resolutionunit="INCH")
    Image.fromarray(img).save(tmp_path / "p.png", dpi=(25400 / 0.5, 25400 / 0.5))
    Image.fromarray(img).save(tmp_path / "p96.png", dpi=(96, 96))
    got = {n: file_mpp(tmp_path / n) for n in ("svs.tif", "in.tif", "ij.tif", "dpi72.tif", "p.png", "p96.png")}
    assert got == {"svs.tif": pytest.approx(0.252), "in.tif": pytest.approx(0.5), "ij.tif": pytest.approx(0.25),
                   "dpi72.tif": None, "p.png": pytest.approx(0.5, rel=1e-3), "p96.png": None}
    mpp, note = dataset_mpp([tmp_path / "in.tif", tmp_path / "p.png", tmp_path / "dpi72.tif"])
    assert mpp == pytest.approx(0.5, rel=1e-3) and "1 of 3 images record none" in note


def test_level_choice_and_resampled_windows_agree_with_a_whole_read():
    assert level_index([0.25, 0.5, 1.0], 0.5) == 1 and level_index([0.25, 0.5, 1.0], 0.7) == 1
    assert level_index([0.25, 1.0], 0.5) == 0 and level_index([0.5, 1.0], 0.25) == 0  # none finer: level 0
    assert level_index([0.2527, 1.01], 0.25) == 0  # within 2 %
    rng = np.random.default_rng(0)
    base = ArrayReader(rng.integers(0, 255, (97, 83, 3), dtype=np.uint8), mpp=0.25)
    for target in (0.5, 0.37, 0.2):  # shrink by 2, by a non-integer factor; enlarge
        r = ResampledReader(base, 0.25, target)
        whole = r.read(0, 0, *r.shape[:2])
        assert whole.dtype == np.uint8 and r.shape[:2] == (round(97 * 0.25 / target), round(83 * 0.25 / target))
        for y, x, h, w in ((0, 0, 7, 9), (5, 11, 20, 13), (r.shape[0] - 6, r.shape[1] - 4, 6, 4)):
            np.testing.assert_array_equal(r.read(y, x, h, w), whole[y:y + h, x:x + w])
    flat = ResampledReader(ArrayReader(np.full((40, 40, 1), 77, np.uint8)), 0.25, 0.6)
    assert (flat.read(0, 0, *flat.shape[:2]) == 77).all()  # weights sum to 1, edges included


def test_min_area_units():
    known = SlideGeometry((100, 100), (200, 200), 0.5, 0.25)
    unknown = SlideGeometry((100, 100), (100, 100), None, None)
    assert min_area_pixels(None, known) == pytest.approx(10 / 0.25)  # 10 um^2 at 0.5 um/px: 40 predicted px
    assert min_area_pixels(None, unknown) == 15
    assert min_area_pixels("20px", known) == pytest.approx(5)  # level-0 pixels: 4 per predicted pixel
    assert min_area_pixels("5", known) == pytest.approx(20) and min_area_pixels("5", unknown) == 5
    assert min_area_pixels("2.5um2", known) == pytest.approx(10)
    with pytest.raises(ValueError, match="records no pixel size"):
        min_area_pixels("3um2", unknown)
    with pytest.raises(ValueError, match="--min-area"):
        min_area_pixels("-1", known)


def test_labels_are_uint16_below_65536_and_uint32_above(tmp_path, capsys):
    ids = np.arange(1, 300 * 300 + 1, dtype=np.uint32).reshape(300, 300)
    for count, dtype in ((100, np.uint16), (ids.size, np.uint32)):
        w = LabelWriter(tmp_path / f"l{count}.tif", (300, 300), (300, 300), 0.5)
        small = np.where(ids <= count, ids, 0).astype(np.uint32)
        for y in range(0, 300, 70):
            w.put(small[y:y + 70])
        path = w.close(count)
        with tifffile.TiffFile(path) as tif:
            got = tif.asarray()
            assert got.dtype == dtype and tif.pages[0].is_tiled
        np.testing.assert_array_equal(got, small)
    assert "is uint32" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l100.tif", f"l{ids.size}.tif"]  # no temporaries


def test_rois_csv_columns_and_classes(tmp_path):
    import roifile

    h, w = 60, 80
    probs = np.zeros((3, h, w), np.float32)
    probs[0] = 1
    yy, xx = np.mgrid[:h, :w]
    for (cy, cx, r), k in (((15, 20, 7), 1), ((40, 55, 9), 2), ((45, 15, 6), 2)):
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 <= r * r
        probs[:, disc] = 0.05
        probs[k, disc] = 0.9
    image = ArrayReader(np.dstack([np.full((h, w), v, np.uint8) for v in (10, 20, 30)]))
    geo = SlideGeometry((h, w), (2 * h, 2 * w), 0.5, 0.25)
    writer = InstanceWriter(tmp_path, "x", (h, w), True, True, True, min_area=4, geometry=geo, image=image,
                            rois=True, class_names=["Background", "Tumor", "Immune cells"])
    for y in range(0, h, 25):
        writer.put(probs[:, y:y + 25])
    writer.close()
    feats = json.loads((tmp_path / "x.geojson").read_text())["features"]
    assert [f["properties"]["classification"]["name"] for f in feats] == ["Tumor", "Immune cells", "Immune cells"]
    assert all(len(f["properties"]["classification"]["color"]) == 3 for f in feats)
    m = feats[0]["properties"]["measurements"]
    assert {"Area µm^2", "Length µm", "Circularity", "Solidity", "Red: Mean", "Detection probability"} <= set(m)
    assert (m["Red: Mean"], m["Green: Mean"], m["Blue: Mean"]) == (10, 20, 30)
    rows = list(csv.DictReader((tmp_path / "x_nuclei.csv").open()))
    for col in ("perimeter", "eccentricity", "solidity", "intensity_mean-0", "intensity_mean-2", "area_um2",
                "axis_major_length", "class"):
        assert col in rows[0], col
    assert [r["class"] for r in rows] == ["Tumor", "Immune cells", "Immune cells"]
    assert float(rows[1]["eccentricity"]) < 0.3 and float(rows[1]["solidity"]) > 0.9
    assert float(rows[1]["area_px"]) == pytest.approx(4 * np.pi * 81, rel=0.1)  # level-0 pixels: 2 x 2 each
    rois = roifile.roiread(tmp_path / "x_rois.zip")
    assert len(rois) == 3
    for roi, f in zip(rois, feats):
        ring = np.asarray(f["geometry"]["coordinates"][0])[:-1]
        np.testing.assert_allclose(roi.coordinates(), ring)
    labels = tifffile.imread(tmp_path / "x_labels.tif")
    assert labels.shape == (2 * h, 2 * w) and labels.dtype == np.uint16 and labels.max() == 3


def test_training_records_the_pixel_size(tmp_path):
    from bionet_fast.train import main as train

    for i in range(3):
        for folder, arr in (("images", _slide_level0()[i * 32:i * 32 + 32, :32]),
                            ("masks", (_slide_level0()[i * 32:i * 32 + 32, :32, 0] < 128).astype(np.uint8) * 255)):
            (tmp_path / "d" / folder).mkdir(parents=True, exist_ok=True)
            tifffile.imwrite(tmp_path / "d" / folder / f"im{i}.tif", arr, resolution=(1e4 / 0.25, 1e4 / 0.25),
                             resolutionunit="CENTIMETER", photometric="rgb" if arr.ndim == 3 else "minisblack")
    tiny = ["--t", "1", "--multiplier", "0.125", "--depth", "2", "--batch-size", "2", "--steps", "1", "--epochs", "1",
            "--precise-bn", "0", "--device", "cpu", "--quiet", "--workers", "0"]
    assert train(tiny + ["--train-data", str(tmp_path / "d"), "--out", str(tmp_path / "run")]) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["inference"]["mpp"] == pytest.approx(0.25)
    assert train(tiny + ["--train-data", str(tmp_path / "d"), "--out", str(tmp_path / "run2"), "--train-mpp", "0.5"]) == 0
    assert json.loads((tmp_path / "run2" / "config.json").read_text())["inference"]["mpp"] == 0.5


def test_shape_features_equal_skimage_regionprops_table():
    from scipy import ndimage
    from skimage.measure import regionprops_table

    from bionet_fast.engine.prediction.measurements import shape_features

    rng = np.random.default_rng(1)
    for i in range(12):
        blob = ndimage.binary_dilation(rng.random((14 + i, 19)) > 0.85, iterations=2)
        lab, n = ndimage.label(blob)
        obj = lab == 1 + int(np.argmax(ndimage.sum(blob, lab, range(1, n + 1))))
        sl = ndimage.find_objects(obj.astype(int))[0]
        obj = np.pad(obj[sl], 1)  # the object's box and a margin, as the instance writer passes it
        want = regionprops_table(obj.astype(np.uint8), properties=("perimeter", "eccentricity", "axis_major_length",
                                                                   "axis_minor_length", "orientation", "solidity"))
        got = shape_features(obj)
        for key in ("perimeter", "eccentricity", "axis_major_length", "axis_minor_length"):
            assert got[key] == pytest.approx(float(want[key][0]), abs=1e-6), key
        # orientation is defined modulo pi (a line at +pi/2 and at -pi/2 is the same line)
        assert abs((got["orientation"] - float(want["orientation"][0]) + np.pi / 2) % np.pi - np.pi / 2) < 1e-6
        # polygon hull of the pixel squares vs regionprops' convex hull image: within a few per cent
        assert got["solidity"] == pytest.approx(float(want["solidity"][0]), rel=0.03)


def test_abort_leaves_nothing_with_every_output(tmp_path):
    geo = SlideGeometry((40, 40), (80, 80), 0.5, 0.25)
    w = InstanceWriter(tmp_path, "x", (40, 40), True, True, True, rois=True, geometry=geo)
    p = np.zeros((1, 40, 40), np.float32)
    p[0, 5:12, 5:12] = 0.9
    w.put(p[:, :20])
    w.abort()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("compression", ["jpeg", "lzw"])
def test_jpeg_and_lzw_tiles_are_read(tmp_path, compression):
    """SVS / NDPI tiles are JPEG, MoNuSeg's images LZW: imagecodecs (installed with bionet_fast) decodes them."""
    from bionet_fast.engine.prediction.slide import open_slide

    img = _slide_level0()
    tifffile.imwrite(tmp_path / "j.tif", img, photometric="rgb", tile=(64, 64), compression=compression,
                     description="Aperio Image Library|MPP = 0.25")
    r = open_slide(tmp_path / "j.tif")
    got = r.read(10, 70, 100, 90)
    r.close()
    assert r.mpp == pytest.approx(0.25)
    tol = 12 if compression == "jpeg" else 0
    assert np.abs(got.astype(int) - img[10:110, 70:160]).mean() <= tol
