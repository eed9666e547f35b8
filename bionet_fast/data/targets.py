"""Training targets built from instance labels.

The contour target (DCAN, Chen et al. 2016; CIA-Net, Zhou et al. 2019) gives a semantic network
what it needs to separate touching nuclei: three classes, 0 background, 1 nucleus interior,
2 nucleus boundary. A pixel of nucleus ``i`` is boundary when a pixel within ``width`` steps
(4-neighbour steps) belongs to another nucleus or to the background; the image edge is not a
boundary. Two touching nuclei therefore get a boundary band of 2 * ``width`` pixels between
their interiors, and the interiors of different nuclei never touch (not even diagonally), so the
4-connected interior components are the seeds of the decoding (engine.split).

A leaf module: numpy and scipy.
"""
from __future__ import annotations

import numpy as np

__all__ = ["TARGETS", "CONTOUR_CLASSES", "contour_target"]

TARGETS = ("mask", "contour")
CONTOUR_CLASSES = 3  # background, interior, boundary


def contour_target(labels: np.ndarray, width: int = 1) -> np.ndarray:
    """Instance labels (H, W) integer, 0 = background -> uint8 (H, W) class map: 0 background,
    1 interior, 2 boundary (see the module docstring)."""
    try:
        from scipy import ndimage
    except ImportError as err:
        raise ValueError("the contour target needs scipy: pip install scipy (or use --target mask)") from err
    if labels.ndim != 2:
        raise ValueError(f"contour_target needs one (H, W) label image, got shape {labels.shape}")
    if width < 1:
        raise ValueError(f"contour width must be >= 1 pixel, got {width}")
    lab = labels.astype(np.int64)
    cross = ndimage.iterate_structure(ndimage.generate_binary_structure(2, 1), width)
    # all neighbours within the diamond hold the same label <=> its max and min equal the label
    same = (ndimage.maximum_filter(lab, footprint=cross, mode="nearest") == lab) & \
           (ndimage.minimum_filter(lab, footprint=cross, mode="nearest") == lab)
    out = np.zeros(lab.shape, np.uint8)
    out[lab > 0] = 2
    out[(lab > 0) & same] = 1
    return out
