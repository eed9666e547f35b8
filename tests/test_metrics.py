"""Metrics: IoU/Dice summed over the set, connected components, Rand F-score, PSNR."""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from bionet_fast.metrics import (PSNRMeter, RandMeter, SegmentationMeter, binary_counts, dice_iou,
                                 label_components, psnr, rand_f_score)


def test_dice_iou_known_values():
    pred = torch.tensor([[0.9, 0.6, 0.2, 0.5]])  # 0.5 is not > 0.5: background
    truth = torch.tensor([[1.0, 0.0, 1.0, 1.0]])
    i, p, t = binary_counts(pred, truth)
    assert (i, p, t) == (1.0, 2.0, 3.0)
    dice, iou = dice_iou(i, p, t)
    assert dice == pytest.approx(2 / 5) and iou == pytest.approx(1 / 4)
    assert dice_iou(0, 0, 0) == (1.0, 1.0)


def test_meter_sums_over_the_set_not_mean_of_images():
    m = SegmentationMeter()
    # image 1: perfect on 1 pixel; image 2: 3 truth pixels, 0 predicted
    probs = torch.zeros(2, 1, 2, 2)
    truth = torch.zeros(2, 1, 2, 2)
    probs[0, 0, 0, 0] = truth[0, 0, 0, 0] = 1
    truth[1, 0, :, 0] = 1
    truth[1, 0, 0, 1] = 1
    m.update(probs[:1], truth[:1])
    m.update(probs[1:], truth[1:])
    r = m.compute()
    assert r["dice"] == pytest.approx(2 * 1 / (1 + 4))
    assert r["iou"] == pytest.approx(1 / 4)
    assert r["dice_per_image"] == pytest.approx(0.5) and r["n_images"] == 2


def test_multiclass_meter_means_foreground_classes():
    labels = torch.tensor([[[0, 1], [2, 2]]])
    logits = torch.zeros(1, 3, 2, 2)
    logits[0, 0, 0, 0] = logits[0, 1, 0, 1] = logits[0, 2, 1, 0] = logits[0, 1, 1, 1] = 5
    m = SegmentationMeter(classes=3)
    m.update(logits.softmax(1), labels)
    r = m.compute()
    # class 1: pred {(0,1),(1,1)} truth {(0,1)} -> dice 2/3; class 2: pred {(1,0)} truth 2 px -> 2/3
    assert r["dice"] == pytest.approx(2 / 3) and r["iou"] == pytest.approx(0.5)


def test_psnr_meter_and_baseline():
    target = torch.full((2, 3, 4, 4), 0.5)
    m = PSNRMeter()
    m.update(target + 0.1, target, baseline=target + 0.2)
    r = m.compute()
    assert r["psnr"] == pytest.approx(20.0, abs=1e-4)  # mse 0.01
    assert r["psnr_bicubic"] == pytest.approx(10 * math.log10(1 / 0.04), abs=1e-4)
    assert psnr(0.0) == math.inf
    m2 = PSNRMeter()
    m2.update(torch.full((1, 1, 2, 2), 3.0), torch.ones(1, 1, 2, 2))  # clamped to 1 -> perfect
    assert m2.compute()["psnr"] == math.inf


def test_label_components_known_case():
    mask = np.array([[1, 1, 0, 1],
                     [0, 1, 0, 1],
                     [1, 0, 0, 0],
                     [1, 0, 1, 1]], bool)
    want4 = np.array([[1, 1, 0, 2],
                      [0, 1, 0, 2],
                      [3, 0, 0, 0],
                      [3, 0, 4, 4]])
    np.testing.assert_array_equal(label_components(mask, 4), want4)
    lab8 = label_components(mask, 8)  # (1,1)-(2,0) touch diagonally
    assert lab8.max() == 3 and lab8[2, 0] == lab8[0, 0]
    spiral = np.ones((7, 7), bool)
    spiral[1, 1:6] = spiral[1:6, 5] = spiral[5, 1:5] = spiral[3:5, 1] = spiral[3, 1:4] = False
    assert label_components(spiral).max() == 1
    assert label_components(np.zeros((3, 3), bool)).max() == 0


def _flood_fill_labels(mask: np.ndarray, conn: int) -> np.ndarray:
    """Reference labelling: breadth-first flood fill in raster order (scipy.ndimage.label's numbering)."""
    steps = [(0, 1), (1, 0), (0, -1), (-1, 0)] + ([(1, 1), (1, -1), (-1, 1), (-1, -1)] if conn == 8 else [])
    out = np.zeros(mask.shape, np.int64)
    n = 0
    for y, x in zip(*np.nonzero(mask)):
        if out[y, x]:
            continue
        n += 1
        out[y, x] = n
        queue = [(y, x)]
        while queue:
            cy, cx = queue.pop()
            for dy, dx in steps:
                ny, nx = cy + dy, cx + dx
                if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not out[ny, nx]:
                    out[ny, nx] = n
                    queue.append((ny, nx))
    return out


@settings(max_examples=40, deadline=None)
@given(arrays(bool, st.tuples(st.integers(1, 24), st.integers(1, 24))), st.sampled_from([4, 8]))
def test_label_components_matches_flood_fill(mask, conn):
    np.testing.assert_array_equal(label_components(mask, conn), _flood_fill_labels(mask, conn))


def test_rand_perfect_split_and_merge():
    truth = np.zeros((6, 8), bool)
    truth[1:5, 1:3] = truth[1:5, 5:7] = True  # two 8-pixel cells
    assert rand_f_score(truth, truth)["rand_f"] == pytest.approx(1.0)
    merged = truth.copy()
    merged[2, 3:5] = True  # the prediction bridges the two cells (bridge pixels lie in truth bg)
    r = rand_f_score(merged, truth)
    # restricted to truth foreground: one predicted segment of 16 pixels, truth 8 + 8
    assert r["rand_recall"] == pytest.approx(1.0)
    assert r["rand_precision"] == pytest.approx((64 + 64) / 256)
    split = truth.copy()
    split[2, 1:3] = False  # cell 1 split into a 2-px and a 4-px piece plus 2 singletons
    r = rand_f_score(split, truth)
    assert r["rand_precision"] == pytest.approx(1.0)
    assert r["rand_recall"] == pytest.approx((4 + 16 + 2 + 64) / 128)


def test_rand_matches_brute_force_pair_counting():
    rng = np.random.default_rng(0)
    t = rng.integers(0, 4, (6, 7))
    p = rng.integers(0, 3, (6, 7))
    r = rand_f_score(p, t, labelled=True)
    # pairs (ordered, self-pairs included) of truth-foreground pixels; predicted 0 = singleton
    idx = np.flatnonzero(t.ravel() > 0)
    tl, pl = t.ravel()[idx], p.ravel()[idx]
    same_t = tl[:, None] == tl[None, :]
    same_p = (pl[:, None] == pl[None, :]) & (pl[:, None] > 0) | np.eye(len(idx), dtype=bool)
    both = (same_t & same_p).sum()
    assert r["rand_precision"] == pytest.approx(both / same_p.sum())
    assert r["rand_recall"] == pytest.approx(both / same_t.sum())


def test_rand_meter_region_value_and_summing():
    truth = torch.zeros(2, 1, 6, 8)
    truth[:, :, 1:5, 1:3] = truth[:, :, 1:5, 5:7] = 1
    meter = RandMeter(region_value=1)
    meter.update(truth, truth)
    assert meter.compute()["rand_f"] == pytest.approx(1.0) and meter.compute()["n_images"] == 2
    # the same cells given as membranes = 1: regions are the zeros
    inv = RandMeter(region_value=0)
    inv.update(1 - truth, 1 - truth)
    assert inv.compute()["rand_f"] == pytest.approx(1.0)
    bad = RandMeter(region_value=1)
    bad.update(torch.ones_like(truth), truth)  # everything one segment: precision drops
    assert bad.compute()["rand_f"] < 0.7


def test_rand_meter_auto_region_value():
    truth = torch.ones(1, 1, 8, 8)
    truth[:, :, 4, :] = 0  # a horizontal membrane (0) splits two cells (1)
    pred = truth.clone()
    pred[:, :, 4, 3] = 1  # a gap in the predicted membrane merges the cells
    meter = RandMeter()
    meter.update(pred, truth)
    assert meter.region_value == 1
    r = meter.compute()
    assert r["rand_recall"] == pytest.approx(1.0) and r["rand_precision"] == pytest.approx(1600 / 3136)
    inv = RandMeter()
    inv.update(1 - pred, 1 - truth)  # membranes labelled 1: the same answer
    assert inv.region_value == 0 and inv.compute()["rand_f"] == pytest.approx(r["rand_f"])
