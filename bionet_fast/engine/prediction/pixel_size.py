"""Predicting at the model's pixel size, writing in the slide's own (level-0) coordinates.

    reader, geo = open_for_prediction("slide.svs", target_mpp=0.5)   # the model's, or --mpp
    reader.shape        # the slide at 0.5 um/px: the next finer pyramid level, resampled
    geo.scale           # level-0 pixels per predicted pixel (y, x): outputs are mapped back by it

A model sees nuclei at the size it was trained at: config.json's "inference" block records that
pixel size (`InferenceInfo.mpp`), and predict reads every slide at it: from the coarsest pyramid
level that is at least as fine (never upsampled when a finer level exists), resampled with a
triangle (antialiasing) filter whose weights depend only on the output pixel's position, so two
overlapping windows read the same values. The outputs (labels, GeoJSON, CSV, ROIs, masks) are
mapped back to level 0 with level-0 pixel size, so they overlay the original in QuPath, napari and
Fiji. A slide that records no pixel size is predicted at its native resolution, with one warning.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from .slide import ArrayReader, open_slide

__all__ = ["ResampledReader", "SlideGeometry", "open_for_prediction", "min_area_pixels", "MIN_AREA_UM2",
           "MIN_AREA_PX", "level_index"]

# --min-area defaults: 10 um^2 (a disc of 3.6 um diameter; the smallest lymphocyte nuclei are
# ~5 um across, ~20 um^2) where the pixel size is known; Cellpose's 15 px otherwise.
MIN_AREA_UM2 = 10.0
MIN_AREA_PX = 15.0
_SAME = 0.02  # pixel sizes within 2 %: read as they are (resampling by 2 % changes nothing for the model)


@dataclass(frozen=True)
class SlideGeometry:
    """How predicted pixels map to the slide's level 0: shapes (H, W) and pixel sizes (um/px, None
    when unknown) of both."""

    shape: tuple[int, int]  # predicted image (h, w)
    level0_shape: tuple[int, int]
    mpp: Optional[float] = None  # of the predicted image
    level0_mpp: Optional[float] = None

    @property
    def scale(self) -> tuple[float, float]:
        """Level-0 pixels per predicted pixel, (y, x)."""
        return self.level0_shape[0] / self.shape[0], self.level0_shape[1] / self.shape[1]

    @property
    def identity(self) -> bool:
        return tuple(self.shape) == tuple(self.level0_shape)


def nearest_index(src: int, dst: int) -> np.ndarray:
    """For each of `dst` output pixels, the source pixel (of `src`) whose area holds its centre."""
    return np.minimum(((np.arange(dst) + 0.5) * (src / dst)).astype(np.int64), src - 1)


def _taps(n_src: int, n_dst: int, ratio: float) -> tuple[np.ndarray, np.ndarray]:
    """Separable resampling table of one axis: source indices (n_dst, T) and weights (n_dst, T)
    of a triangle filter (half-width max(ratio, 1): antialiased when shrinking, bilinear when
    enlarging), edge pixels repeated, weights summing to 1."""
    half = max(ratio, 1.0)
    centre = (np.arange(n_dst) + 0.5) * ratio - 0.5
    first = np.floor(centre - half).astype(np.int64) + 1
    offsets = np.arange(int(np.ceil(2 * half)) + 1)
    idx = first[:, None] + offsets[None]
    wts = np.maximum(0.0, 1.0 - np.abs(idx - centre[:, None]) / half)
    wts /= wts.sum(1, keepdims=True)
    return np.clip(idx, 0, n_src - 1), wts.astype(np.float32)


class ResampledReader:
    """A reader (engine.slide interface) of `base` resampled from `base_mpp` to `mpp` µm/px."""

    def __init__(self, base, base_mpp: float, mpp: float):
        self.base, self.mpp, self.path = base, mpp, getattr(base, "path", "image")
        self.ratio = mpp / base_mpp  # source pixels per output pixel
        bh, bw = base.shape[:2]
        h, w = max(1, round(bh / self.ratio)), max(1, round(bw / self.ratio))
        self.shape, self.dtype = (h, w, base.shape[2]), base.dtype
        self._ry, self._rx = _taps(bh, h, bh / h), _taps(bw, w, bw / w)

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h, w, C) resampled pixels of the window at (y, x), in the stored dtype."""
        iy, wy = self._ry[0][y:y + h], self._ry[1][y:y + h]
        ix, wx = self._rx[0][x:x + w], self._rx[1][x:x + w]
        y0, x0 = int(iy.min()), int(ix.min())
        src = self.base.read(y0, x0, int(iy.max()) + 1 - y0, int(ix.max()) + 1 - x0).astype(np.float32)
        rows = sum(wy[:, t, None, None] * src[iy[:, t] - y0] for t in range(iy.shape[1]))
        out = sum(wx[None, :, t, None] * rows[:, ix[:, t] - x0] for t in range(ix.shape[1]))
        if np.issubdtype(self.dtype, np.integer):
            info = np.iinfo(self.dtype)
            return np.clip(np.rint(out), info.min, info.max).astype(self.dtype)
        return out.astype(self.dtype)

    def plan_windows(self, roi_h: int, roi_w: int) -> None:
        if hasattr(self.base, "plan_windows"):
            taps = self._ry[0].shape[1]
            self.base.plan_windows(int(np.ceil(roi_h * self.ratio)) + taps, int(np.ceil(roi_w * self.ratio)) + taps)

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """The base's thumbnail, its downsample factor counted in output pixels."""
        if hasattr(self.base, "thumbnail"):
            thumb, factor = self.base.thumbnail(max_side)
        else:
            thumb, factor = self.base.read(0, 0, *self.base.shape[:2]), 1.0
        return thumb, factor * self.base.shape[1] / self.shape[1]

    def close(self) -> None:
        self.base.close()


def level_index(mpps: list[float], target: float) -> int:
    """The pyramid level to read for `target` µm/px: the coarsest level at least as fine (within
    2 %); level 0 when every level is coarser."""
    fine = [i for i, m in enumerate(mpps) if m <= target * (1 + _SAME)]
    return max(fine, key=lambda i: mpps[i]) if fine else 0


def open_for_prediction(path: str | Path, target_mpp: Optional[float] = None, level: Optional[int] = None,
                        warn=print) -> tuple[object, SlideGeometry]:
    """A reader of `path` at `target_mpp` µm/px (the next finer level, resampled; see the module
    docstring), or at pyramid `level`, or level 0; and how its pixels map to level 0.
    No pixel size in the file: level 0 as it is, and one warning through `warn`."""
    path = Path(path)
    reader = open_slide(path, level=level)
    shape0, mpp0 = _level0(reader)
    if level is not None or target_mpp is None:
        return reader, SlideGeometry(reader.shape[:2], shape0, getattr(reader, "mpp", None), mpp0)
    if not mpp0:
        warn(f"warning: {path} records no pixel size: predicted at its native resolution, not at "
             f"{target_mpp:g} um/px (the model's pixel size, or --mpp)", file=sys.stderr)
        return reader, SlideGeometry(reader.shape[:2], shape0, None, None)
    shapes = getattr(reader, "level_shapes", [shape0])
    mpps = [mpp0 * shape0[1] / w for _, w in shapes]
    lv = level_index(mpps, target_mpp)
    if lv:
        reader.close()
        reader = open_slide(path, level=lv)
    if abs(mpps[lv] / target_mpp - 1) > _SAME:
        base_w = reader.shape[1]
        reader = ResampledReader(reader, mpps[lv], target_mpp)
        mpp = mpps[lv] * base_w / reader.shape[1]  # exact: the rounded width covers the same slide
    else:
        mpp = mpps[lv]
    return reader, SlideGeometry(reader.shape[:2], shape0, mpp, mpp0)


def _level0(reader) -> tuple[tuple[int, int], Optional[float]]:
    """(H, W) and µm/px of the slide's level 0 behind `reader`."""
    shapes = getattr(reader, "level_shapes", None)
    if isinstance(reader, ArrayReader) or not shapes:
        return tuple(reader.shape[:2]), getattr(reader, "mpp", None)
    return tuple(shapes[0]), getattr(reader, "base_mpp", None)


def _split_area(value) -> tuple[float, Optional[str]]:
    """'10um2' -> (10.0, 'um2'), '15px' -> (15.0, 'px'), '12' -> (12.0, None); ValueError otherwise."""
    text = str(value).strip().lower().replace("\u00b5", "u").replace("\u03bc", "u")
    for suffix, unit in (("um^2", "um2"), ("um2", "um2"), ("px", "px")):
        if text.endswith(suffix):
            text, found = text[:-len(suffix)].strip(), unit
            break
    else:
        found = None
    try:
        number = float(text)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise ValueError(f"--min-area {value}: give an area >= 0, as 10um2 (square micrometres), 15px "
                         "(level-0 pixels) or a bare number (um2 where the pixel size is known, else px)")
    return number, found


def parse_min_area(value: str) -> str:
    """argparse type of --min-area: checks the value (a number >= 0, optional unit um2 / px)."""
    _split_area(value)
    return str(value)


def min_area_pixels(value: Optional[str], geo: SlideGeometry) -> float:
    """--min-area in predicted pixels: VALUE with a unit (10um2, 40px) or a bare number, read as
    µm² where the pixel size is known and as (level-0) pixels otherwise; None: 10 µm² where the
    pixel size is known, else 15 px."""
    if value is None:
        number, unit = (MIN_AREA_UM2, "um2") if geo.mpp else (MIN_AREA_PX, "px")
    else:
        number, unit = _split_area(value)
        unit = unit or ("um2" if geo.mpp else "px")
    if unit == "px":  # pixels of the slide's level 0 (what the outputs count), in predicted pixels
        return number / (geo.scale[0] * geo.scale[1])
    if not geo.mpp:
        raise ValueError(f"--min-area {value}: the image records no pixel size; give the area in pixels (e.g. 15px)")
    return number / geo.mpp ** 2
