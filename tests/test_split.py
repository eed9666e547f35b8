"""Touching nuclei separated (engine.split): the watershed splits two touching discs and keeps an
ellipse or an elongated, bent nucleus whole; the streaming writer gives the same objects for any
band height and through the window predictor (a nucleus on a band or window border stays one);
the contour target (data.targets) on a hand-made case; a contour model through train and predict."""
from __future__ import annotations

import json

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image
from scipy import ndimage

from bionet_fast.data.synthetic import make_synthetic_nuclei
from bionet_fast.data.targets import contour_target
from bionet_fast.engine.prediction.instances import InstanceWriter
from bionet_fast.engine.prediction.slide import TiffReader
from bionet_fast.engine.prediction.split import SplitOptions, label_image, resolve_split, split_component
from bionet_fast.engine.prediction.streaming import StreamOptions
from bionet_fast.engine.prediction.whole_slide import OutputOptions, predict_image

WS = SplitOptions("watershed")


def _discs(shape, discs) -> np.ndarray:
    """Instance labels (H, W) of discs (cy, cx, r), later ones over earlier ones."""
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    lab = np.zeros(shape, np.int32)
    for i, (cy, cx, r) in enumerate(discs, start=1):
        lab[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = i
    return lab


def _ellipse(shape, cy, cx, a, b, theta=0.0) -> np.ndarray:
    yy, xx = np.mgrid[:shape[0], :shape[1]]
    u = (xx - cx) * np.cos(theta) + (yy - cy) * np.sin(theta)
    v = (yy - cy) * np.cos(theta) - (xx - cx) * np.sin(theta)
    return (u / a) ** 2 + (v / b) ** 2 <= 1


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two label images hold the same objects (numbered in any order)."""
    pairs = np.unique(np.stack([a.ravel(), b.ravel()]), axis=1)
    return (a > 0).sum() == (b > 0).sum() and len(pairs.T) == len(np.unique(a)) == len(np.unique(b))


@pytest.mark.parametrize("distance, radii", [(17, (10, 10)), (14, (9, 7)), (19, (11, 9))])
def test_two_touching_discs_split_into_two(distance, radii):
    truth = _discs((40, 50), [(20, 14, radii[0]), (20, 14 + distance, radii[1])])
    assert ndimage.label(truth > 0)[1] == 1  # they touch: one component
    parts, n = split_component(truth > 0, WS)
    assert n == 2
    for i in (1, 2):  # each part is mostly one disc
        overlap = np.bincount(parts[truth == i], minlength=3)[1:]
        assert overlap.max() >= 0.9 * (truth == i).sum()
    assert split_component(truth > 0, SplitOptions("none"))[1] == 1


@pytest.mark.parametrize("a, b, theta", [(12, 6, 0.0), (20, 5, 0.7), (9, 8, 1.2), (25, 9, 2.0)])
def test_an_ellipse_or_elongated_nucleus_stays_one(a, b, theta):
    obj = _ellipse((64, 64), 32, 31.5, a, b, theta)
    assert split_component(obj, WS)[1] == 1


def test_a_bent_irregular_nucleus_stays_one():
    """A banana-shaped nucleus (an arc of constant width) and a wavy elongated one. (A deep notch,
    a third of the width, is cut: the distance map cannot tell it from two nuclei.)"""
    yy, xx = np.mgrid[:48, :64]
    banana = (np.abs(np.hypot(yy - 60, xx - 32) - 30) < 6) & (yy < 40)
    wavy = _ellipse((48, 64), 24, 32, 22, 7) & (np.abs(yy - 24 - 2 * np.sin(xx / 5)) < 7)
    for obj in (banana, wavy):
        assert ndimage.label(obj)[1] == 1 and split_component(obj, WS)[1] == 1


def test_label_image_splits_a_cluster_of_three():
    truth = _discs((48, 60), [(24, 14, 9), (24, 30, 9), (10, 22, 7)])
    prob = (truth > 0).astype(np.float32)[None] * 0.9
    lab = label_image(prob, 0.5)
    assert lab.max() == 3 and (lab[truth > 0] > 0).all()  # (plus the hole the three enclose, filled)
    for i in (1, 2, 3):
        assert np.bincount(lab[truth == i]).max() >= 0.85 * (truth == i).sum()
    assert label_image(prob, 0.5, opts=SplitOptions("none")).max() == 1


# Touching pairs across the band borders of the writer (multiples of 7 and 48) and across window
# borders of 64-pixel windows at stride 48 (48, 64, 96, 112, ...), plus single discs.
H, W = 200, 180
PAIRS = [((48, 40, 10), (48, 57, 9)), ((96, 100, 11), (112, 100, 8)), ((150, 60, 9), (163, 70, 8))]
SINGLES = [(20, 150, 10), (180, 150, 7)]


def _slide_prob() -> tuple[np.ndarray, np.ndarray]:
    truth = _discs((H, W), [d for pair in PAIRS for d in pair] + SINGLES)
    prob = np.where(truth > 0, 0.9, 0.1).astype(np.float32)
    return prob, truth


@pytest.mark.parametrize("band", [7, 48, 200])
@pytest.mark.parametrize("method", ["watershed", "contour"])
def test_streaming_split_is_the_same_for_any_band_height(tmp_path, band, method):
    prob, truth = _slide_prob()
    target = "contour" if method == "contour" else "mask"
    if method == "contour":  # a perfect contour model's output
        t = contour_target(truth)
        prob = np.stack([t == 0, t == 1, t == 2]).astype(np.float32) * 0.8 + 0.2 / 3
    else:
        prob = prob[None]
    opts = SplitOptions(method)
    w = InstanceWriter(tmp_path, f"b{band}", (H, W), geojson=True, split=opts, target=target)
    for y in range(0, H, band):
        w.put(prob[:, y:y + band])
    w.close()
    labels = tifffile.imread(tmp_path / f"b{band}_labels.tif").astype(np.int32)
    assert labels.max() == len(PAIRS) * 2 + len(SINGLES)
    assert _same_partition(labels, label_image(prob, 0.5, target, opts))
    for i in range(1, truth.max() + 1):  # every disc is (mostly) one object, and no object spans two
        assert np.bincount(labels[truth == i]).max() >= 0.85 * (truth == i).sum()
    geo = json.loads((tmp_path / f"b{band}.geojson").read_text())
    assert len(geo["features"]) == labels.max()


@pytest.mark.parametrize("window", [32, 64])
def test_split_through_the_window_predictor_keeps_border_nuclei_whole(tmp_path, window):
    """The image is the probability (a pointwise model): windows of 32 / 64 and the output's row
    bands cut every pair, which must still come out as its two discs."""
    prob, truth = _slide_prob()
    tifffile.imwrite(tmp_path / "p.tif", (prob * 255).round().astype(np.uint8), tile=(32, 32))
    reader = TiffReader(tmp_path / "p.tif")
    out = tmp_path / "out"
    predict_image(reader, lambda x: x, 1, 1, 16, StreamOptions(window, 0.25, 4, progress=False),
                  OutputOptions("tiff", True, split=WS), out, "p", torch.device("cpu"))
    reader.close()
    labels = tifffile.imread(out / "p_labels.tif").astype(np.int32)
    assert _same_partition(labels, label_image(prob[None], 0.5, opts=WS))
    assert labels.max() == truth.max()


def test_contour_target_by_hand():
    lab = np.zeros((6, 9), np.int32)
    lab[1:5, 0:4] = 1  # touches the left image edge: that edge is no boundary
    lab[1:5, 4:8] = 2  # touches nucleus 1 along a vertical line
    want = np.array([[0, 0, 0, 0, 0, 0, 0, 0, 0],
                     [2, 2, 2, 2, 2, 2, 2, 2, 0],
                     [1, 1, 1, 2, 2, 1, 1, 2, 0],
                     [1, 1, 1, 2, 2, 1, 1, 2, 0],
                     [2, 2, 2, 2, 2, 2, 2, 2, 0],
                     [0, 0, 0, 0, 0, 0, 0, 0, 0]], np.uint8)
    np.testing.assert_array_equal(contour_target(lab), want)
    # the interiors of touching nuclei never touch: their 4-components are the nuclei
    truth = _discs((40, 50), [(20, 14, 10), (20, 31, 10)])
    t = contour_target(truth)
    assert set(np.unique(t)) == {0, 1, 2} and ndimage.label(t == 1)[1] == 2
    np.testing.assert_array_equal(t > 0, truth > 0)
    with pytest.raises(ValueError, match="width"):
        contour_target(truth, width=0)


def test_contour_decoding_grows_interior_seeds():
    truth = _discs((40, 50), [(20, 14, 10), (20, 31, 10)])
    t = contour_target(truth)
    probs = np.stack([t == 0, t == 1, t == 2]).astype(np.float32)
    lab = label_image(probs, 0.5, "contour", SplitOptions("contour"))
    assert lab.max() == 2 and (lab > 0).sum() == (truth > 0).sum()
    for i in (1, 2):
        assert np.bincount(lab[truth == i]).max() >= 0.95 * (truth == i).sum()
    assert resolve_split("auto", "contour") == resolve_split("auto", "mask") == "watershed"
    with pytest.raises(ValueError, match="--target contour"):
        resolve_split("contour", "mask")


def test_synthetic_instances_and_crowded_option():
    rgb, mask = make_synthetic_nuclei(3, 64, seed=4)
    rgb2, lab = make_synthetic_nuclei(3, 64, seed=4, instances=True)
    np.testing.assert_array_equal(rgb, rgb2)
    np.testing.assert_array_equal(lab > 0, mask > 0)  # instances do not change the data
    assert lab.dtype == np.int32 and all(sorted(np.unique(x))[-1] == len(np.unique(x)) - 1 for x in lab)
    _, crowded = make_synthetic_nuclei(3, 64, seed=4, instances=True, density=1.5, children=1.5)
    assert (crowded > 0).mean() > (lab > 0).mean()


def test_contour_model_trains_and_round_trips_through_predict(tmp_path):
    from bionet_fast.predict import main as predict
    from bionet_fast.train import main as train

    run = tmp_path / "run"
    assert train(["--target", "contour", "--epochs", "1", "--steps", "1", "--batch-size", "2", "--n-train", "4",
                  "--n-val", "2", "--multiplier", "0.125", "--depth", "2", "--t", "2", "--image-size", "32",
                  "--precise-bn", "0", "--device", "cpu", "--out", str(run), "--quiet"]) == 0
    config = json.loads((run / "config.json").read_text())
    assert config["classes"] == 3 and config["inference"]["target"] == "contour"
    assert 0 <= config["inference"]["metrics"]["dice"] <= 1  # nucleus vs background
    rgb, _ = make_synthetic_nuclei(1, 64, seed=9)
    Image.fromarray(rgb[0]).save(tmp_path / "x.png")
    out = tmp_path / "out"
    assert predict(["--checkpoint", str(run), str(tmp_path / "x.png"), "--out", str(out), "--instances",
                    "--geojson", "--device", "cpu", "--no-progress", "--tile-size", "64"]) == 0
    labels = tifffile.imread(out / "x_labels.tif")
    prob = tifffile.imread(out / "x_prob.tif")  # (3, H, W): background, interior, boundary
    assert prob.shape[0] == 3 and labels.shape == (64, 64)
    want = label_image(prob, 0.5, "contour", SplitOptions("watershed"))  # --split auto
    assert labels.max() == want.max() and _same_partition(labels, want)
    for split in ("contour", "none"):
        out = tmp_path / split
        assert predict(["--checkpoint", str(run), str(tmp_path / "x.png"), "--out", str(out), "--instances",
                        "--split", split, "--device", "cpu", "--no-progress", "--tile-size", "64"]) == 0
        want = label_image(prob, 0.5, "contour", SplitOptions(split))
        assert _same_partition(tifffile.imread(out / "x_labels.tif").astype(np.int32), want)
