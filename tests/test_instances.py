"""Nucleus instances streamed band by band: one label and one polygon per nucleus, also for nuclei
cut by window borders and by the tile-row borders of the output; GeoJSON and CSV agree."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import tifffile
import torch
from scipy import ndimage

from bionet_fast.engine.prediction.instances import InstanceWriter, trace_outline, trace_rings
from bionet_fast.engine.prediction.slide import TiffReader
from bionet_fast.engine.prediction.streaming import StreamOptions
from bionet_fast.engine.prediction.whole_slide import OutputOptions, predict_image

H, W = 300, 200
# (cy, cx, r): across the output's tile-row border (y = 256), across window borders of 64-pixel
# windows at stride 48 (x = 48, 64, 96, 112; y = 48, 64, 96 ...), one with a hole, one tiny.
NUCLEI = [(256, 60, 12), (255, 150, 9), (64, 48, 10), (112, 100, 14), (180, 20, 7), (30, 170, 11)]


def _disks() -> np.ndarray:
    yy, xx = np.mgrid[:H, :W]
    p = np.full((H, W), 0.1, np.float32)
    for cy, cx, r in NUCLEI:
        p[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 0.8 + 0.01 * r
    p[110:115, 98:103] = 0.2  # a hole inside the nucleus at (112, 100)
    p[5, 5] = 0.9  # a one-pixel speck, dropped by min_area
    return p


def _polygon_area(ring) -> float:
    return 0.5 * abs(sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:])))


def _check_outputs(folder, name, prob):
    labels = tifffile.imread(folder / f"{name}_labels.tif")
    want, n = ndimage.label(ndimage.binary_fill_holes(prob > 0.5))
    sizes = ndimage.sum(np.ones_like(want), want, range(1, n + 1))
    assert labels.dtype == np.uint16 and labels.max() == len(NUCLEI) == (sizes >= 4).sum()
    for i in range(1, labels.max() + 1):  # each nucleus is exactly one reference component
        ref = np.unique(want[labels == i])
        assert len(ref) == 1 and ref[0] > 0
        np.testing.assert_array_equal(want == ref[0], labels == i)
    assert labels[112, 100] > 0  # hole filled
    geo = json.loads((folder / f"{name}.geojson").read_text())
    assert geo["type"] == "FeatureCollection" and len(geo["features"]) == labels.max()
    for f in geo["features"]:
        props = f["properties"]
        assert props["objectType"] == "detection" and f["geometry"]["type"] == "Polygon"
        area = (labels == props["label"]).sum()
        assert _polygon_area(f["geometry"]["coordinates"][0]) == props["measurements"]["Area px^2"] == area
    rows = list(csv.DictReader((folder / f"{name}_nuclei.csv").open()))
    assert sorted(int(r["label"]) for r in rows) == list(range(1, labels.max() + 1))
    for r in rows:
        ys, xs = np.nonzero(labels == int(r["label"]))
        assert float(r["centroid_x"]) == pytest.approx(xs.mean() + 0.5, abs=0.01)
        assert float(r["mean_probability"]) == pytest.approx(prob[ys, xs].mean(), abs=1e-3)


@pytest.mark.parametrize("band", [7, 48, 300])
def test_bands_of_any_height_give_the_whole_image_labels(tmp_path, band):
    prob = _disks()
    w = InstanceWriter(tmp_path, "x", (H, W), geojson=True, measurements=True, min_area=4)
    for y in range(0, H, band):
        w.put(prob[None, y:y + band])
    w.close()
    _check_outputs(tmp_path, "x", prob)


def test_nuclei_across_window_and_tile_row_borders_through_the_predictor(tmp_path):
    """The image itself is the probability (a pointwise 'model'), so every nucleus is cut by
    64-pixel windows and by the 256-row tiles of the outputs, and must still come out whole."""
    prob = _disks()
    tifffile.imwrite(tmp_path / "p.tif", (prob * 255).round().astype(np.uint8), tile=(32, 32))
    reader = TiffReader(tmp_path / "p.tif")
    out = tmp_path / "out"
    predict_image(reader, lambda x: x, 1, 1, 16, StreamOptions(64, 0.25, 4, progress=False),
                  OutputOptions("tiff", True, True, True, min_area=4), out, "p", torch.device("cpu"))
    reader.close()
    stored = (prob * 255).round() / 255
    _check_outputs(out, "p", stored)
    np.testing.assert_allclose(tifffile.imread(out / "p_prob.tif"), stored, atol=1e-6)
    assert not list(out.glob(".*"))


def test_trace_outline_area_equals_pixel_count():
    rng = np.random.default_rng(0)
    for _ in range(20):
        blob = ndimage.binary_fill_holes(ndimage.binary_dilation(rng.random((12, 15)) > 0.8, iterations=2))
        lab, n = ndimage.label(blob)
        obj = lab == 1 + np.argmax(ndimage.sum(blob, lab, range(1, n + 1)))
        ring = trace_outline(obj)
        assert ring[0] == ring[-1] and _polygon_area(ring) == obj.sum()
        xs, ys = zip(*ring)
        assert min(xs) == np.nonzero(obj)[1].min() and max(ys) == np.nonzero(obj)[0].max() + 1


def test_abort_leaves_nothing(tmp_path):
    w = InstanceWriter(tmp_path, "x", (H, W), geojson=True, measurements=True)
    w.put(_disks()[None, :100])
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_trace_outline_survives_corners_where_two_loops_touch():
    """Two unfilled holes (other nuclei) touching at a corner: the inner outlines pinch there; the
    outline is still traced (it raised a KeyError) and is the outer ring."""
    obj = np.array([[1, 1, 1, 1], [1, 0, 1, 1], [1, 1, 0, 1], [1, 1, 1, 1]], bool)
    assert trace_outline(obj) == [[0, 0], [4, 0], [4, 4], [0, 4], [0, 0]]
    rings = trace_rings(obj)  # the outer ring, then the two holes, touching at a corner
    assert rings[1:] == [[[1, 1], [1, 2], [2, 2], [2, 1], [1, 1]], [[2, 2], [2, 3], [3, 3], [3, 2], [2, 2]]]


def test_rings_of_objects_with_holes_and_pinches_have_the_pixel_area():
    rng = np.random.default_rng(3)
    for _ in range(60):
        lab, n = ndimage.label(rng.random((14, 14)) > 0.4)  # holes not filled: other nuclei inside
        for k in range(1, n + 1):
            rings = trace_rings(lab == k)
            assert _polygon_area(rings[0]) - sum(_polygon_area(r) for r in rings[1:]) == (lab == k).sum()
