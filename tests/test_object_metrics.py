"""Object metrics (AJI, PQ, object F1) against hand-computed cases and an independent brute-force
implementation over every pair of objects; predicted objects from probabilities; evaluate's
metrics.json and per_image.csv on annotated data."""
from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from bionet_fast.engine.prediction.instance_eval import probs_to_instances
from bionet_fast.metrics import ObjectMeter, object_counts, object_scores, scores_from_counts


def brute_force(pred: np.ndarray, truth: np.ndarray) -> dict:
    """AJI as Kumar et al. 2017 write it (a loop over the nuclei, the best-IoU prediction of each,
    first on ties), PQ / F1 from every pair with IoU > 0.5: boolean masks, no shared code."""
    gs = [truth == i for i in np.unique(truth) if i != 0]
    ss = [pred == j for j in np.unique(pred) if j != 0]
    if not gs and not ss:
        return dict(aji=1.0, pq=1.0, f1=1.0, precision=1.0, recall=1.0)
    iou = np.array([[(g & s).sum() / (g | s).sum() for s in ss] for g in gs]).reshape(len(gs), len(ss))
    c = u = 0
    used = set()
    for i, g in enumerate(gs):
        if len(ss) and iou[i].max() > 0:
            j = int(np.argmax(iou[i]))
            c += (g & ss[j]).sum()
            u += (g | ss[j]).sum()
            used.add(j)
        else:
            u += g.sum()
    u += sum(s.sum() for j, s in enumerate(ss) if j not in used)
    pairs = [(i, j) for i in range(len(gs)) for j in range(len(ss)) if iou[i, j] > 0.5]
    assert len({i for i, _ in pairs}) == len({j for _, j in pairs}) == len(pairs)  # unique matches
    tp, fp, fn = len(pairs), len(ss) - len(pairs), len(gs) - len(pairs)
    sq = sum(iou[i, j] for i, j in pairs) / tp if tp else 0.0
    f1 = 2 * tp / (2 * tp + fp + fn)
    return dict(aji=c / u, pq=f1 * sq, f1=f1, precision=tp / (tp + fp) if ss else 0.0,
                recall=tp / (tp + fn) if gs else 0.0)


def _check(pred, truth, **hand):
    got, ref = object_scores(pred, truth), brute_force(pred, truth)
    mine = dict(aji=got["aji"], pq=got["pq"], f1=got["object_f1"], precision=got["object_precision"],
                recall=got["object_recall"])
    assert mine == pytest.approx(ref, abs=1e-12)
    for k, v in hand.items():
        assert mine[k] == pytest.approx(v, abs=1e-12), k
    return got


def _blank():
    return np.zeros((6, 8), np.int32)


def test_hand_cases():
    truth, pred = _blank(), _blank()
    truth[0:2, 0:2], truth[3:6, 3:6] = 1, 5  # 4 px, 9 px
    pred[0:2, 0:3], pred[3:6, 3:5], pred[5, 0] = 2, 9, 3  # 6 px (IoU 4/6), 6 px (IoU 6/9), a speck
    got = _check(pred, truth, aji=10 / 16, f1=0.8, precision=2 / 3, recall=1.0, pq=0.8 * (2 / 3))
    assert got["dq"] == got["object_f1"] and got["sq"] == pytest.approx(2 / 3)


def test_empty_prediction_empty_truth_and_both_empty():
    truth = _blank()
    truth[1:3, 1:3] = 1
    _check(_blank(), truth, aji=0.0, pq=0.0, f1=0.0, recall=0.0, precision=0.0)
    _check(truth, _blank(), aji=0.0, pq=0.0, f1=0.0, recall=0.0, precision=0.0)
    _check(_blank(), _blank(), aji=1.0, pq=1.0, f1=1.0)


def test_many_to_one_merge_counts_the_prediction_in_each_union():
    truth, pred = _blank(), _blank()
    truth[0:2, 0:2], truth[0:2, 2:4] = 1, 2  # two touching nuclei
    pred[0:2, 0:4] = 1  # merged: IoU exactly 0.5 with each, not a match
    _check(pred, truth, aji=8 / 16, pq=0.0, f1=0.0, precision=0.0, recall=0.0)


def test_one_to_many_split_pairs_the_first_of_equal_ious():
    truth, pred = _blank(), _blank()
    truth[0:2, 0:4] = 3
    pred[0:2, 0:2], pred[0:2, 2:4] = 4, 7  # IoU 0.5 each: the nucleus pairs with id 4; 7 is unpaired
    _check(pred, truth, aji=4 / 12, pq=0.0, f1=0.0)
    pred[0, 2] = 4  # now 4 wins clearly: IoU 5/8
    _check(pred, truth, aji=5 / 11, f1=2 / 3, pq=(2 / 3) * (5 / 8))


def _random_labels(rng, shape, n):
    lab = np.zeros(shape, np.int32)
    for k in range(n):  # painted in order: later rectangles overlap earlier ones
        y, x = rng.integers(0, shape[0]), rng.integers(0, shape[1])
        h, w = rng.integers(1, 7, 2)
        lab[y:y + h, x:x + w] = rng.integers(1, 40)
    return lab


@pytest.mark.parametrize("seed", range(12))
def test_random_label_maps_equal_the_brute_force(seed):
    rng = np.random.default_rng(seed)
    truth = _random_labels(rng, (17, 23), int(rng.integers(0, 9)))
    pred = truth.copy() if seed % 3 == 0 else _random_labels(rng, (17, 23), int(rng.integers(0, 9)))
    if seed % 3 == 0:  # a perturbed copy: shifted objects, some merged
        pred = np.roll(pred, 1, axis=int(rng.integers(0, 2)))
        pred[pred == pred.max()] = max(int(pred.min()), 1)
    _check(pred, truth)


def test_pooled_counts_and_per_image_means():
    rng = np.random.default_rng(5)
    maps = [(_random_labels(rng, (16, 16), 6), _random_labels(rng, (16, 16), 6)) for _ in range(3)]
    meter = ObjectMeter(lambda p: p[0].astype(np.int64))  # the probabilities ARE the labels here
    for pred, truth in maps:
        meter.update(torch.from_numpy(pred[None, None].astype(np.float32)), torch.from_numpy(truth[None]))
    out = meter.compute()
    pooled = scores_from_counts(sum(object_counts(p, t) for p, t in maps))
    assert out["aji"] == pytest.approx(pooled["aji"]) and out["pq"] == pytest.approx(pooled["pq"])
    per = [object_scores(p, t) for p, t in maps]
    assert out["aji_per_image"] == pytest.approx(np.mean([s["aji"] for s in per]))
    assert out["object_f1_per_image"] == pytest.approx(np.mean([s["object_f1"] for s in per]))
    assert [r["aji"] for r in meter.rows] == pytest.approx([s["aji"] for s in per])
    assert out["n_true_objects"] == sum(len(np.unique(t)) - 1 for _, t in maps)
    again = ObjectMeter(lambda p: p[0]).compute(meter.state() * 1)  # from an all-reduced state
    assert again["aji"] == pytest.approx(out["aji"])


def test_probs_to_instances_components_holes_min_area():
    p = np.zeros((1, 12, 14), np.float32)
    p[0, 1:6, 1:6] = 0.9
    p[0, 3, 3] = 0.2  # a hole: filled
    p[0, 1:6, 6:9] = 0.8  # touching the first: the same component (no split yet)
    p[0, 8:11, 10:13] = 0.7
    p[0, 10, 0] = 0.6  # one pixel: dropped by min_area
    lab = probs_to_instances(p, 0.5, min_area=2)
    want = np.zeros((12, 14), np.int32)
    want[1:6, 1:9], want[8:11, 10:13] = 1, 2
    np.testing.assert_array_equal(lab, want)
    assert probs_to_instances(p, 0.85).max() == 1  # the threshold is the model's
    two = np.stack([1 - p[0], p[0]])  # several classes: argmax > 0
    np.testing.assert_array_equal(probs_to_instances(two, 0.5, min_area=2), want)


def test_evaluate_writes_object_metrics_and_per_image_csv(tmp_path):
    from bionet_fast.evaluate import main as evaluate
    from bionet_fast.models import BiONet

    ckpt = tmp_path / "model"
    BiONet(in_channels=3, classes=1, iterations=1, multiplier=0.125, depth=2,
           backend="reference").save_pretrained(ckpt)
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(data / f"im{i}.png")
        feats = [{"type": "Feature", "properties": {"objectType": "detection"},
                  "geometry": {"type": "Polygon", "coordinates": [[[4, 4], [12, 4], [12, 12], [4, 12], [4, 4]]]}}]
        (data / f"im{i}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    out = tmp_path / "eval"
    assert evaluate(["--checkpoint", str(ckpt), "--data", str(data), "--out", str(out), "--device", "cpu",
                     "--quiet", "--tile-size", "32"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    for key in ("dice", "iou", "aji", "pq", "dq", "sq", "object_f1", "object_precision", "object_recall",
                "aji_per_image", "pq_per_image", "object_f1_per_image"):
        assert 0.0 <= metrics[key] <= 1.0, key
    assert metrics["n_true_objects"] == 2
    rows = list(csv.DictReader((out / "per_image.csv").open()))
    assert [r["image"] for r in rows] == ["im0", "im1"]
    assert np.mean([float(r["aji"]) for r in rows]) == pytest.approx(metrics["aji_per_image"], abs=1e-5)
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(metrics["dice_per_image"], abs=1e-5)


def test_synthetic_instance_labels_match_the_masks_and_split_touching_nuclei():
    from bionet_fast.data.synthetic import make_synthetic_nuclei
    from bionet_fast.data.training import synthetic_heldout
    from bionet_fast.metrics import label_components

    images, masks = make_synthetic_nuclei(6, size=64, seed=4)
    same, labels = make_synthetic_nuclei(6, size=64, seed=4, instances=True)
    assert np.array_equal(images, same) and np.array_equal(labels > 0, masks > 0)
    n_objects = sum(len(np.unique(lab)) - 1 for lab in labels)
    n_components = sum(int(label_components(m > 0).max()) for m in masks)
    assert n_objects > n_components  # touching nuclei: more instances than components
    assert len(synthetic_heldout(2, 64)[0][0]) == 2  # pairs unless asked
    held, _ = synthetic_heldout(2, 64, instances=True)
    image, mask, inst = held[0]
    assert held.has_instances and inst.shape == (64, 64) and torch.equal(mask[0] > 0, inst > 0)


def test_evaluate_synthetic_reports_objects(tmp_path):
    from bionet_fast.evaluate import main as evaluate
    from bionet_fast.models import BiONet

    ckpt = tmp_path / "model"
    BiONet(in_channels=3, classes=1, iterations=1, multiplier=0.125, depth=2,
           backend="reference").save_pretrained(ckpt)
    out = tmp_path / "eval"
    assert evaluate(["--checkpoint", str(ckpt), "--data", "synthetic", "--out", str(out), "--device", "cpu",
                     "--quiet", "--batch-size", "16"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_images"] == 48 and metrics["n_true_objects"] > 48 and 0 <= metrics["aji"] <= 1
    assert len(list(csv.DictReader((out / "per_image.csv").open()))) == 48
