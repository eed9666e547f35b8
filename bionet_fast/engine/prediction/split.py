"""Touching nuclei separated: one connected component of the nucleus mask -> one label per nucleus.

Two ways, chosen by ``--split`` (default "auto" = "watershed" for every model: measured better
than the contour decoding also on contour models, see docs/objects.md):

- "watershed": a marker-controlled watershed of the component's Euclidean distance transform.
  Markers are the h-dome tops of the (slightly smoothed) distance: a nucleus is a hill of the
  distance map, and two touching nuclei are two hills joined by a saddle (the neck). A hill
  counts as its own nucleus when it rises more than ``h`` pixels above the saddle that joins it
  to a higher one, so a neck must be at least ``h`` pixels narrower than the smaller nucleus'
  radius to be cut: an ellipse (one ridge) or an irregular single nucleus stays one.
- "contour": the model predicts background / interior / boundary (DCAN, CIA-Net). The seeds are
  the 4-connected components of interior probability > 0.5 (of at least ``min_seed`` pixels);
  they are grown by a watershed of the boundary probability over the component.
- "none": the component is one object.

Each component is split on its own: the result depends only on the component's pixels and
probabilities, never on where a window or a row band cut the image, which is what keeps the
streaming writer's guarantee (engine.instances: a component is split once it is complete).
`label_image` labels a whole in-memory probability map the same way (evaluation, benchmarks).
scipy and scikit-image are needed (the `instances` extra).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

__all__ = ["SPLITS", "SplitOptions", "split_component", "resolve_split", "label_image", "decode_probs",
           "require_split_libs"]

SPLITS = ("auto", "watershed", "contour", "none")


@dataclass(frozen=True)
class SplitOptions:
    """How components are split. Defaults chosen on synthetic touching nuclei (bench/objects_split.py)."""

    method: str = "watershed"  # "watershed", "contour" or "none" (resolved: never "auto")
    h: float = 0.25  # watershed: a marker must rise this many pixels of distance above its saddle
    sigma: float = 1.0  # watershed: Gaussian smoothing of the distance map (pixels)
    min_seed: int = 3  # contour: interior components smaller than this many pixels are no seeds


def require_split_libs(opts: SplitOptions) -> None:
    """Raise the ValueError naming the extra now, before any work, when `opts` needs a missing library."""
    if opts.method != "none":
        _libs()


def _libs():
    try:
        from scipy import ndimage
        from skimage.morphology import local_maxima, reconstruction
        from skimage.segmentation import watershed
    except ImportError as err:
        raise ValueError("splitting touching nuclei needs scipy and scikit-image: pip install "
                         "'bionet_fast[instances]' (or --split none)") from err
    return ndimage, (reconstruction, local_maxima), watershed


def resolve_split(split: str, target: str) -> str:
    """--split (SPLITS) and the model's target ("mask" / "contour") -> the method used ("auto":
    watershed); raises ValueError for "contour" on a model that does not predict contours."""
    if split not in SPLITS:
        raise ValueError(f"--split {split!r}: choose one of {', '.join(SPLITS)}")
    if split == "auto":
        return "watershed"  # measured better than the contour decoding, on contour models too
    if split == "contour" and target != "contour":
        raise ValueError("--split contour needs a model trained with --target contour (its config.json's "
                         '"inference" block says "target": "contour"); use --split watershed')
    return split


def decode_probs(probs: np.ndarray, threshold: float, target: str = "mask"
                 ) -> tuple[np.ndarray, np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
    """probs (K, H, W) -> (nucleus mask (H, W) bool, nucleus probability (H, W) float32,
    seeds (H, W) bool or None, boundary probability (H, W) float32 or None).

    One class: p > threshold. A contour model (K = 3): nucleus = 1 - p(background) > threshold
    (interior + boundary, the mask pixel Dice scores), seeds = p(interior) > 0.5. Other K > 1:
    the argmax is not the background."""
    if probs.shape[0] == 1:
        p = probs[0].astype(np.float32)
        return p > threshold, p, None, None
    p = (1 - probs[0]).astype(np.float32)
    if target == "contour":
        return p > threshold, p, probs[1] > 0.5, probs[2].astype(np.float32)
    return probs.argmax(0) > 0, p, None, None


def split_component(obj: np.ndarray, opts: SplitOptions, seeds: Optional[np.ndarray] = None,
                    boundary: Optional[np.ndarray] = None) -> tuple[np.ndarray, int]:
    """One connected object obj (h, w) bool (its bounding box) -> (int32 labels (h, w), 0 outside
    obj and 1..n inside, n). `seeds` / `boundary` (h, w): the contour model's interior mask and
    boundary probability (method "contour"). An object without two markers stays one."""
    if opts.method == "none":
        return obj.astype(np.int32), 1
    nd, (reconstruction, local_maxima), watershed = _libs()
    if opts.method == "contour":
        markers, n = nd.label(seeds & obj)
        if n > 1 and opts.min_seed > 1:
            sizes = np.bincount(markers.ravel(), minlength=n + 1)
            keep = sizes >= opts.min_seed
            keep[0] = False
            remap = np.where(keep, np.cumsum(keep), 0).astype(np.int32)
            markers, n = remap[markers], int(keep.sum())
        elevation = boundary
    else:
        # distance to the background; the box is padded so the box edge is background
        dist = nd.distance_transform_edt(np.pad(obj, 1))
        if opts.sigma > 0:
            dist = nd.gaussian_filter(dist, opts.sigma)
        dist = dist[1:-1, 1:-1]
        # the h-dome tops: the distance reconstructed under itself lowered by h, whose regional
        # maxima are one connected plateau per hill at least h high (skimage's h_maxima would
        # give each equal-height pixel of a hill's top its own marker)
        domes = reconstruction(dist - opts.h, dist, method="dilation")
        markers, n = nd.label(local_maxima(domes, connectivity=2, allow_borders=True) & obj, np.ones((3, 3)))
        elevation = -dist
    if n < 2:
        return obj.astype(np.int32), 1
    parts = watershed(elevation, markers, mask=obj).astype(np.int32)
    return parts, n


def label_image(probs: np.ndarray, threshold: float = 0.5, target: str = "mask",
                opts: SplitOptions = SplitOptions(), min_area: int = 0) -> np.ndarray:
    """probs (K, H, W) -> int32 instance labels (H, W) of a whole in-memory image, exactly as
    engine.instances.InstanceWriter labels it (4-connected components of the nucleus mask, holes
    filled, each split by `opts`, objects under `min_area` pixels dropped)."""
    nd, _, _ = _libs()
    mask, _, seeds, boundary = decode_probs(probs, threshold, target)
    out = np.zeros(mask.shape, np.int32)
    comp, _ = nd.label(mask)
    count = 0
    for i, sl in enumerate(nd.find_objects(comp), start=1):
        if sl is None:
            continue
        obj = comp[sl] == i
        filled = nd.binary_fill_holes(obj) & (obj | ~mask[sl])
        parts, n = split_component(filled, opts, None if seeds is None else seeds[sl],
                                   None if boundary is None else boundary[sl])
        for j in range(1, n + 1):
            part = parts == j
            if part.sum() >= max(min_area, 1):
                count += 1
                out[sl][part] = count
    return out
