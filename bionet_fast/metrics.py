"""Segmentation and super-resolution metrics, as the BiO-Net paper reports them.

A leaf module: it imports nothing of bionet_fast.

* IoU and Dice: predictions thresholded at 0.5 and counted over the WHOLE batch or set (the
  intersections, prediction sums and truth sums are added up over all images before dividing), so
  that a large image weighs more than a small one. `SegmentationMeter` accumulates them over batches.
* Rand F-score (EM membranes): the foreground-restricted Rand F-score of the ISBI 2012 / CREMI
  challenges (Arganda-Carreras et al. 2015), on the connected components of both label maps.
* PSNR (super-resolution): 10 log10(1 / MSE) for images in [0, 1], the MSE taken over the whole set.
* Objects (nuclei as instances, `object_scores` / `ObjectMeter`): AJI (Kumar et al. 2017, MoNuSeg's
  challenge metric), PQ = DQ x SQ (Kirillov et al. 2019, matching at IoU > 0.5) and object precision /
  recall / F1 at IoU > 0.5 (F1 equals DQ). Definitions at `object_counts`.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np
import torch

__all__ = ["binary_counts", "dice_iou", "SegmentationMeter", "PSNRMeter", "psnr", "label_components",
           "rand_f_score", "RandMeter", "object_counts", "object_scores", "scores_from_counts", "ObjectMeter",
           "OBJECT_COUNTS"]


# --- IoU and Dice ---------------------------------------------------------------------------------
def binary_counts(pred: torch.Tensor, truth: torch.Tensor, threshold: float = 0.5) -> tuple[float, float, float]:
    """(intersection, prediction area, truth area) summed over every element.

    pred: probabilities of any shape, thresholded at `threshold` (strictly greater, as Keras'
    K.greater does); truth: the same shape, values {0, 1} (anything > 0.5 counts as foreground).
    """
    if pred.shape != truth.shape:
        raise ValueError(f"prediction shape {tuple(pred.shape)} differs from truth shape {tuple(truth.shape)}")
    p = pred > threshold
    t = truth > 0.5
    return float((p & t).sum()), float(p.sum()), float(t.sum())


def dice_iou(intersection: float, pred_area: float, truth_area: float) -> tuple[float, float]:
    """Dice = 2I / (P + T) and IoU = I / (P + T - I); both 1.0 when prediction and truth are empty."""
    total = pred_area + truth_area
    if total == 0:
        return 1.0, 1.0
    return 2.0 * intersection / total, intersection / (total - intersection)


class SegmentationMeter:
    """Accumulates IoU / Dice over batches.

    `classes == 1`: `update(probs (B, 1, H, W), truth (B, 1, H, W) in {0, 1})`, threshold 0.5.
    `classes > 1`: `update(probs (B, K, H, W), labels (B, H, W) or (B, 1, H, W) integer class map)`;
    the prediction is the argmax, and IoU / Dice are the means over the foreground classes 1..K-1
    (class 0 is background), each counted over the whole set.
    `compute()` -> {"dice", "iou", "dice_per_image", "iou_per_image", "n_images"}; the *_per_image
    entries average per-image scores (images with neither prediction nor truth count as 1).
    """

    def __init__(self, classes: int = 1, threshold: float = 0.5):
        self.classes, self.threshold = classes, threshold
        k = max(classes - 1, 1)
        self.inter, self.pred, self.truth = np.zeros(k), np.zeros(k), np.zeros(k)
        self.per_image = np.zeros(2)  # sums of per-image Dice and IoU
        self.n_images = 0

    def _masks(self, probs: torch.Tensor, truth: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """One (pred bool (B, H, W), truth bool (B, H, W)) pair per foreground class."""
        if self.classes == 1:
            if truth.dim() == probs.dim() - 1:
                truth = truth.unsqueeze(1)
            if probs.shape != truth.shape:
                raise ValueError(f"prediction {tuple(probs.shape)} and truth {tuple(truth.shape)} differ")
            return [((probs > self.threshold)[:, 0], (truth > 0.5)[:, 0])]
        labels = truth[:, 0] if truth.dim() == 4 else truth
        labels = labels.round().long()
        arg = probs.argmax(1)
        return [(arg == c, labels == c) for c in range(1, self.classes)]

    @torch.no_grad()
    def update(self, probs: torch.Tensor, truth: torch.Tensor) -> None:
        probs, truth = probs.detach().float(), truth.detach()
        pairs = self._masks(probs, truth)
        b = probs.shape[0]
        img = np.zeros((b, len(pairs), 3))
        for c, (p, t) in enumerate(pairs):
            i, ps, ts = (p & t).flatten(1).sum(1), p.flatten(1).sum(1), t.flatten(1).sum(1)
            img[:, c] = torch.stack([i, ps, ts], 1).double().cpu().numpy()
        self.inter += img[:, :, 0].sum(0)
        self.pred += img[:, :, 1].sum(0)
        self.truth += img[:, :, 2].sum(0)
        for row in img:
            scores = np.array([dice_iou(*row[c]) for c in range(len(pairs))])
            self.per_image += scores.mean(0)
        self.n_images += b

    def state(self) -> np.ndarray:
        """Every count as one flat float64 array, for an all-reduce (sum) across processes."""
        return np.concatenate([self.inter, self.pred, self.truth, self.per_image, [self.n_images]])

    def compute(self, counts: Optional[np.ndarray] = None) -> dict[str, float]:
        """Scores from this meter's counts, or from `counts` (a summed `state()`)."""
        state = self.state() if counts is None else np.asarray(counts, dtype=np.float64)
        k = len(self.inter)
        inter, pred, truth = state[:k], state[k:2 * k], state[2 * k:3 * k]
        per, n = state[3 * k:3 * k + 2], int(state[-1])
        scores = np.array([dice_iou(i, p, t) for i, p, t in zip(inter, pred, truth)])
        return {"dice": float(scores[:, 0].mean()), "iou": float(scores[:, 1].mean()),
                "dice_per_image": float(per[0] / max(n, 1)), "iou_per_image": float(per[1] / max(n, 1)),
                "n_images": n}


# --- PSNR -----------------------------------------------------------------------------------------
def psnr(mse: float, data_range: float = 1.0) -> float:
    """10 log10(range^2 / mse); infinity for a perfect reconstruction."""
    return math.inf if mse <= 0 else 10.0 * math.log10(data_range ** 2 / mse)


class PSNRMeter:
    """PSNR over the whole set: the squared errors of all pixels summed, then one PSNR.

    `update(pred (B, C, H, W), target (B, C, H, W), baseline=None)`: predictions are clamped to
    [0, 1] first (images are stored in [0, 1]). `baseline` (the bicubic upsampling that the network
    receives as input) gets its own PSNR beside the network's, so the gain is visible.
    """

    def __init__(self):
        self.se, self.se_base, self.count, self.n_images = 0.0, 0.0, 0, 0

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor, baseline: Optional[torch.Tensor] = None) -> None:
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and target {tuple(target.shape)} differ")
        target = target.double()
        self.se += float(((pred.double().clamp(0, 1) - target) ** 2).sum())
        if baseline is not None:
            self.se_base += float(((baseline.double().clamp(0, 1) - target) ** 2).sum())
        self.count += target.numel()
        self.n_images += target.shape[0]

    def state(self) -> np.ndarray:
        return np.array([self.se, self.se_base, self.count, self.n_images], dtype=np.float64)

    def compute(self, counts: Optional[np.ndarray] = None) -> dict[str, float]:
        se, se_base, count, n = self.state() if counts is None else counts
        count = max(count, 1)
        return {"psnr": psnr(se / count), "psnr_bicubic": psnr(se_base / count), "mse": se / count,
                "n_images": int(n)}


# --- connected components and the Rand F-score -------------------------------------------------------
def label_components(mask: np.ndarray, connectivity: int = 4) -> np.ndarray:
    """Label the connected components of the True pixels of a 2-D mask: int64 map, 0 = background,
    components numbered 1..N in raster order of their first pixel (as scipy.ndimage.label does).

    A vectorised union-find in numpy (no scipy needed): every foreground edge hooks the larger root
    onto the smaller one, then pointers are compressed, until no edge joins two different roots.
    """
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"label_components expects a 2-D mask, got shape {mask.shape}")
    if connectivity not in (4, 8):
        raise ValueError(f"connectivity={connectivity}; use 4 (edges) or 8 (edges and corners)")
    h, w = mask.shape
    idx = np.arange(h * w).reshape(h, w)
    pairs = [(mask[:, :-1] & mask[:, 1:], idx[:, :-1], idx[:, 1:]),
             (mask[:-1, :] & mask[1:, :], idx[:-1, :], idx[1:, :])]
    if connectivity == 8:
        pairs += [(mask[:-1, :-1] & mask[1:, 1:], idx[:-1, :-1], idx[1:, 1:]),
                  (mask[:-1, 1:] & mask[1:, :-1], idx[:-1, 1:], idx[1:, :-1])]
    a = np.concatenate([p[1][p[0]] for p in pairs])
    b = np.concatenate([p[2][p[0]] for p in pairs])
    parent = np.arange(h * w)
    while True:
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        lo, hi = np.minimum(ra[differ], rb[differ]), np.maximum(ra[differ], rb[differ])
        np.minimum.at(parent, hi, lo)
        while True:  # pointer jumping until every node points at a root
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
    roots = parent.reshape(h, w)
    out = np.zeros((h, w), dtype=np.int64)
    fg_roots = roots[mask]
    uniq, first = np.unique(fg_roots, return_index=True)
    order = np.argsort(first)  # number components by their first pixel in raster order
    rank = np.empty(len(uniq), dtype=np.int64)
    rank[order] = np.arange(1, len(uniq) + 1)
    out[mask] = rank[np.searchsorted(uniq, fg_roots)]
    return out


def _rand_sums(truth_labels: np.ndarray, pred_labels: np.ndarray) -> np.ndarray:
    """(sum_ij n_ij^2, sum_i a_i^2, sum_j b_j^2) restricted to truth foreground; predicted
    background pixels (label 0) inside it count as singletons, one segment each."""
    t = np.asarray(truth_labels).ravel().astype(np.int64)
    p = np.asarray(pred_labels).ravel().astype(np.int64)
    keep = t > 0
    t, p = t[keep], p[keep]
    single = float((p == 0).sum())
    _, a = np.unique(t, return_counts=True)
    joint = t[p > 0] * (int(p.max(initial=0)) + 1) + p[p > 0]
    _, nij = np.unique(joint, return_counts=True)
    _, b = np.unique(p[p > 0], return_counts=True)
    sq = lambda v: float((v.astype(np.float64) ** 2).sum())  # noqa: E731
    return np.array([sq(nij) + single, sq(a), sq(b) + single])


def _rand_from_sums(sums: np.ndarray) -> dict[str, float]:
    s_ab, s_a, s_b = sums
    if s_a == 0:  # no foreground in the truth: nothing to score
        return {"rand_f": 1.0, "rand_precision": 1.0, "rand_recall": 1.0}
    precision, recall = s_ab / s_b, s_ab / s_a
    f = 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
    return {"rand_f": float(f), "rand_precision": float(precision), "rand_recall": float(recall)}


def rand_f_score(pred: np.ndarray, truth: np.ndarray, connectivity: int = 4,
                 labelled: bool = False) -> dict[str, float]:
    """Foreground-restricted Rand F-score (ISBI 2012 / CREMI "adapted Rand"), 1 - adapted Rand error.

    pred, truth: 2-D binary masks whose True pixels are the regions (EM: the cell interiors, with
    membranes False); each is split into connected components (`connectivity` 4 or 8). With
    `labelled=True` they are label maps already (0 = background / membrane).
    Pixels that are background in the truth are ignored; predicted-background pixels inside the
    truth's foreground count as singleton segments. With n_ij the pixel counts of truth segment i
    and predicted segment j: precision = sum n_ij^2 / sum_j b_j^2, recall = sum n_ij^2 / sum_i a_i^2,
    F = 2PR / (P + R). (CREMI's script adds the singletons divided by the image size, a known quirk;
    here each singleton is its own segment.)
    Returns {"rand_f", "rand_precision", "rand_recall"}.
    """
    if np.shape(pred) != np.shape(truth):
        raise ValueError(f"prediction shape {np.shape(pred)} differs from truth shape {np.shape(truth)}")
    if not labelled:
        pred, truth = label_components(pred, connectivity), label_components(truth, connectivity)
    return _rand_from_sums(_rand_sums(truth, pred))


class RandMeter:
    """Rand F-score over a set of 2-D slices: the pair counts of all slices summed, then one score.

    `update(probs (B, 1, H, W), truth (B, 1, H, W))`; regions are the pixels where the truth equals
    `region_value` (1: the masks mark cell interiors; 0: the masks mark membranes) and, for the
    prediction, where `(probs > 0.5) == region_value`. "auto" decides on the first batch: membranes
    are thin, so the value covering most of the truth is the cells'.
    """

    def __init__(self, region_value: int | str = "auto", connectivity: int = 4):
        if region_value not in ("auto", 0, 1):
            raise ValueError(f"region_value={region_value!r}; use 'auto', 0 or 1")
        self.region_value, self.connectivity = region_value, connectivity
        self.sums, self.n_images = np.zeros(3), 0

    @torch.no_grad()
    def update(self, probs: torch.Tensor, truth: torch.Tensor) -> None:
        p = (probs.detach().float() > 0.5).cpu().numpy().reshape(probs.shape[0], *probs.shape[-2:])
        t = (truth.detach().float() > 0.5).cpu().numpy().reshape(truth.shape[0], *truth.shape[-2:])
        if self.region_value == "auto":
            self.region_value = int(t.mean() >= 0.5)
        want = bool(self.region_value)
        for pi, ti in zip(p, t):
            self.sums += _rand_sums(label_components(ti == want, self.connectivity),
                                    label_components(pi == want, self.connectivity))
            self.n_images += 1

    def state(self) -> np.ndarray:
        return np.append(self.sums, self.n_images)

    def compute(self, counts: Optional[np.ndarray] = None) -> dict[str, float]:
        state = self.state() if counts is None else counts
        return {**_rand_from_sums(state[:3]), "n_images": int(state[3])}


# --- objects: AJI, PQ, object F1 -------------------------------------------------------------------
OBJECT_COUNTS = ("aji_inter", "aji_union", "tp", "fp", "fn", "iou_sum", "n_true", "n_pred")


def _index(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Label map -> (flat index 0..n, 0 = background, object k the k-th smallest id; areas (n,))."""
    ids, inv = np.unique(np.asarray(labels).ravel(), return_inverse=True)
    if ids.size == 0 or ids[0] != 0:  # no background pixel: index 0 stays background
        inv, ids = inv + 1, np.concatenate([[0], ids])
    return inv.ravel(), np.bincount(inv.ravel(), minlength=len(ids))[1:].astype(np.float64)


def object_counts(pred: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """The counts behind AJI, PQ and object F1 of one image, in OBJECT_COUNTS order (summable over
    images). pred, truth: (H, W) integer label maps, 0 = background, any ids.

    AJI (Kumar et al. 2017): each true nucleus G is paired with the prediction S of highest IoU with
    it (ties: the smallest id; none if it overlaps none); aji_inter = sum |G & S|, aji_union = sum
    |G | S| over the pairs + |G| of the unpaired true nuclei + |S| of the predictions paired with no
    nucleus. A prediction may pair with several nuclei (it is then counted in each union), as in the
    MoNuSeg challenge code. AJI = aji_inter / aji_union.
    PQ and F1: a prediction and a nucleus match when their IoU exceeds 0.5 (such a match is unique);
    tp matches, fp unmatched predictions, fn unmatched nuclei, iou_sum the IoUs of the matches.
    """
    if np.shape(pred) != np.shape(truth):
        raise ValueError(f"prediction shape {np.shape(pred)} differs from truth shape {np.shape(truth)}")
    pi, pa = _index(pred)
    ti, ta = _index(truth)
    both = (pi > 0) & (ti > 0)
    keys, inter = np.unique(ti[both] * (len(pa) + 1) + pi[both], return_counts=True)
    t, p = keys // (len(pa) + 1) - 1, keys % (len(pa) + 1) - 1  # 0-based object indices
    inter = inter.astype(np.float64)
    union = ta[t] + pa[p] - inter
    iou = inter / union
    best = np.lexsort((p, -iou, t))  # per nucleus: highest IoU first, then the smallest id
    first = best[np.r_[True, t[best][1:] != t[best][:-1]]] if len(t) else best
    paired_pred = np.zeros(len(pa), bool)
    paired_pred[p[first]] = True
    paired_true = np.zeros(len(ta), bool)
    paired_true[t[first]] = True
    c = inter[first].sum()
    u = union[first].sum() + ta[~paired_true].sum() + pa[~paired_pred].sum()
    match = iou > 0.5
    tp = int(match.sum())
    return np.array([c, u, tp, len(pa) - tp, len(ta) - tp, iou[match].sum(), len(ta), len(pa)], np.float64)


def scores_from_counts(counts: np.ndarray) -> dict[str, float]:
    """AJI, PQ, DQ, SQ, object precision / recall / F1 from (summed) `object_counts`. Nothing to find
    and nothing found scores 1.0 everywhere (as Dice here); otherwise an empty ratio scores 0."""
    c, u, tp, fp, fn, iou_sum, n_true, n_pred = (float(v) for v in counts)
    if n_true == 0 and n_pred == 0:
        return {"aji": 1.0, "pq": 1.0, "dq": 1.0, "sq": 1.0, "object_precision": 1.0, "object_recall": 1.0,
                "object_f1": 1.0}
    dq = tp / (tp + 0.5 * fp + 0.5 * fn)
    sq = iou_sum / tp if tp else 0.0
    return {"aji": c / u if u else 0.0, "pq": dq * sq, "dq": dq, "sq": sq,
            "object_precision": tp / (tp + fp) if tp + fp else 0.0,
            "object_recall": tp / (tp + fn) if tp + fn else 0.0, "object_f1": dq}


def object_scores(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """AJI, PQ (DQ, SQ), object precision / recall / F1 of one image: label maps (H, W), 0 = background."""
    return scores_from_counts(object_counts(pred, truth))


class ObjectMeter:
    """Per-image rows and pooled object scores over batches.

    `update(probs (B, K, H, W), truth (B, [1,] H, W))`: with `objects`, truth holds instance labels
    (0 = background) and the predicted objects are `to_instances(probs[b] as numpy (K, H, W))` (the
    engine's `probs_to_instances`); without, truth is the target and only pixel rows are kept.
    Every image gets a row in `rows`: its foreground pixel Dice and IoU (probability > threshold, or
    argmax > 0 with K > 1, against truth > 0) and, with `objects`, its object scores and counts.
    `compute()` -> the pooled scores (`object_counts` summed over the images, then one score each)
    and their per-image means (`aji_per_image`, `pq_per_image`, `object_f1_per_image`); {} without
    `objects` (the pooled pixel scores are SegmentationMeter's).
    """

    def __init__(self, to_instances: Callable[[np.ndarray], np.ndarray], threshold: float = 0.5,
                 objects: bool = True):
        self.to_instances, self.threshold, self.objects = to_instances, threshold, objects
        self.counts, self.per_image, self.n_images = np.zeros(len(OBJECT_COUNTS)), np.zeros(3), 0
        self.rows: list[dict] = []

    @torch.no_grad()
    def update(self, probs: torch.Tensor, instances: torch.Tensor) -> None:
        probs = probs.detach().float().cpu().numpy()
        truth = instances.detach().cpu().numpy().reshape(probs.shape[0], *probs.shape[-2:])
        for p, t in zip(probs, truth):
            fg = p[0] > self.threshold if p.shape[0] == 1 else p.argmax(0) > 0
            dice, iou = dice_iou(float((fg & (t > 0.5)).sum()), float(fg.sum()), float((t > 0.5).sum()))
            if not self.objects:
                self.rows.append({"dice": dice, "iou": iou})
                continue
            counts = object_counts(self.to_instances(p), t)
            scores = scores_from_counts(counts)
            self.counts += counts
            self.per_image += [scores["aji"], scores["pq"], scores["object_f1"]]
            self.n_images += 1
            self.rows.append({"dice": dice, "iou": iou, **scores,
                              "n_true": int(counts[6]), "n_pred": int(counts[7]), "tp": int(counts[2])})

    def state(self) -> np.ndarray:
        return np.concatenate([self.counts, self.per_image, [self.n_images]])

    def compute(self, counts: Optional[np.ndarray] = None) -> dict[str, float]:
        if not self.objects:
            return {}
        state = self.state() if counts is None else np.asarray(counts, dtype=np.float64)
        k, n = len(OBJECT_COUNTS), max(int(state[-1]), 1)
        out = scores_from_counts(state[:k])
        out.update(aji_per_image=float(state[k] / n), pq_per_image=float(state[k + 1] / n),
                   object_f1_per_image=float(state[k + 2] / n), n_true_objects=int(state[6]),
                   n_pred_objects=int(state[7]))
        return out
