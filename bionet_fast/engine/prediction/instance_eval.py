"""Predicted nuclei for the object metrics: one call from a probability map to instance labels.

`object_meter` is the single place where evaluation (evaluate, the trainer's validation) turns
probabilities into objects: engine.split.label_image, exactly the objects `predict --instances`
writes (touching nuclei split). `probs_to_instances` (numpy only: the 4-connected components of
the mask, holes filled, objects under `min_area` dropped) is its fallback where scipy /
scikit-image are not installed.
"""
from __future__ import annotations

import sys
from functools import partial

import numpy as np

from ...metrics import ObjectMeter, label_components

__all__ = ["probs_to_instances", "fill_holes", "object_meter"]


def probs_to_instances(probs: np.ndarray, threshold: float = 0.5, min_area: int = 0) -> np.ndarray:
    """probs (K, H, W) or (H, W) -> int32 (H, W) nucleus labels 1..N (raster order of their first
    pixel), 0 = background. Foreground: probability > threshold (one class) or argmax > 0 (K > 1)."""
    probs = np.asarray(probs)
    if probs.ndim == 2:
        probs = probs[None]
    fg = probs[0] > threshold if probs.shape[0] == 1 else probs.argmax(0) > 0
    labels = fill_holes(label_components(fg, 4))
    if min_area > 0:
        areas = np.bincount(labels.ravel())
        labels[areas[labels] < min_area] = 0
    if labels.any():  # renumber 1..N (hole filling and dropping leave the order, not the gaps)
        ids, inv = np.unique(labels, return_inverse=True)
        labels = inv.reshape(labels.shape) + int(ids[0] != 0)
    return labels.astype(np.int32)


def fill_holes(labels: np.ndarray) -> np.ndarray:
    """Fill each object's holes: a 4-connected background region that touches no image border and
    borders one object only becomes part of it. A region bordering several objects stays background:
    a gap closed off by two nuclei, and also (unlike predict's writer, which fills a ring's hole
    around a nucleus inside it) the background between a ring-shaped nucleus and one inside it."""
    bg = label_components(labels == 0, 4)
    if bg.max() == 0:
        return labels
    border = np.unique(np.concatenate([bg[0], bg[-1], bg[:, 0], bg[:, -1]]))
    pairs = []  # (background region, neighbouring object) across every 4-neighbour edge
    for a, b in ((np.s_[:, :-1], np.s_[:, 1:]), (np.s_[:-1, :], np.s_[1:, :])):
        for x, y in ((a, b), (b, a)):
            edge = (bg[x] > 0) & (labels[y] > 0)
            pairs.append(np.stack([bg[x][edge], labels[y][edge]], 1))
    pairs = np.unique(np.concatenate(pairs), axis=0)
    regions, counts = np.unique(pairs[:, 0], return_counts=True)
    single = regions[(counts == 1) & ~np.isin(regions, border)]
    if not len(single):
        return labels
    owner = np.zeros(bg.max() + 1, labels.dtype)
    owner[pairs[np.isin(pairs[:, 0], single), 0]] = pairs[np.isin(pairs[:, 0], single), 1]
    return np.where(labels == 0, owner[bg], labels)


def object_meter(threshold: float = 0.5, min_area: int = 0, objects: bool = True, target: str = "mask",
                 split: str = "auto") -> ObjectMeter:
    """An ObjectMeter whose predicted objects are those `predict --instances --split SPLIT` makes
    (engine.split.label_image: components, holes filled, touching nuclei split) at `threshold`, for a
    model trained on `target`; without scipy / scikit-image, the plain components of
    `probs_to_instances` (said once). `objects` False: per-image pixel rows only, for data without
    instance labels."""
    from .split import SplitOptions, label_image, require_split_libs, resolve_split

    opts = SplitOptions(resolve_split(split, target))
    try:
        require_split_libs(opts)
    except ImportError as err:
        if opts.method != "none" or target != "mask":
            print(f"note: object metrics of unsplit components ({err})", file=sys.stderr)
        return ObjectMeter(partial(probs_to_instances, threshold=threshold, min_area=min_area), threshold, objects)
    return ObjectMeter(partial(label_image, threshold=threshold, target=target, opts=opts, min_area=min_area),
                       threshold, objects)
