"""Nucleus instances from streamed probability rows: label image, QuPath GeoJSON, measurements.

`InstanceWriter.put(probs)` takes (K, n, W) row bands top to bottom (as `predict_rows` yields
them). Objects are 4-connected components of the mask (p > threshold: the model's, 0.5 unless set;
several classes: argmax > 0; a contour model: 1 - p(background) > threshold), holes filled, each
split into touching nuclei by `split` (engine.split: watershed, contour seeds or none), smaller than
`min_area` dropped. A component is finished (and only then split) when it does not reach the
last buffered row; rows above the highest unfinished object are final and written out, the rest
is carried into the next band. So a nucleus cut by a window or row border is ONE object, labelled
and traced whole, while memory holds one band plus the carried rows (capped at `max_carry` rows:
a taller object is cut there, with a warning).

Outputs (engine.object_outputs, engine.label_writer), in the slide's level-0 coordinates when
the image was predicted at another pixel size (`geometry`): NAME_labels.tif (uint16 below 65,536
nuclei, else uint32; tiled BigTIFF), NAME.geojson (QuPath detections with QuPath's measurement
names and, for K classes, a classification), NAME_nuclei.csv (regionprops columns), NAME_rois.zip
(ImageJ ROIs). scipy is needed (the `instances` extra; scikit-image for the CSV, roifile for ROIs).
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import numpy as np

from .label_writer import LabelWriter
from .object_outputs import BASE_COLUMNS as CSV_COLUMNS, ObjectOutputs
from .pixel_size import SlideGeometry
from .split import SplitOptions, decode_probs, require_split_libs, split_component

__all__ = ["InstanceWriter", "trace_outline", "trace_rings", "CSV_COLUMNS"]

_DROPPED = np.iinfo(np.uint32).max  # finished but below --min-area: not re-labelled, written as 0


def _ndimage():
    try:
        from scipy import ndimage
    except ImportError as err:
        raise ValueError("--instances / --geojson / --measurements need scipy: "
                         "pip install 'bionet_fast[instances]'") from err
    return ndimage


def trace_outline(obj: np.ndarray) -> list[list[int]]:
    """The outer boundary of a hole-free 4-connected object (h, w) bool along pixel edges, as a
    closed ring of [x, y] corner coordinates (collinear corners dropped); its shoelace area equals
    the pixel count. See `trace_rings`; an object with holes: its outer ring."""
    return trace_rings(obj)[0]


def trace_rings(obj: np.ndarray) -> list[list[list[int]]]:
    """The boundary of a 4-connected object (h, w) bool along pixel edges: the outer ring, then
    one ring per hole (holes left where other nuclei sit), each closed, [x, y] corner coordinates,
    collinear corners dropped; outer area minus hole areas equals the pixel count. Where two of
    its pixels touch only at a corner (a pinch), the ring turns away from the object and passes
    that corner twice, so no ring is cut there."""
    p = np.pad(obj, 1)
    inner = p[1:-1, 1:-1]
    nxt: dict = {}
    for (dy, dx), (a, b) in {(-1, 0): ((0, 0), (0, 1)), (0, 1): ((0, 1), (1, 1)),
                             (1, 0): ((1, 1), (1, 0)), (0, -1): ((1, 0), (0, 0))}.items():
        ys, xs = np.nonzero(inner & ~p[1 + dy:p.shape[0] - 1 + dy, 1 + dx:p.shape[1] - 1 + dx])
        for y, x in zip(ys.tolist(), xs.tolist()):
            nxt.setdefault((y + a[0], x + a[1]), []).append((y + b[0], x + b[1]))
    rings = []
    while nxt:
        start = min(nxt)
        ring, prev, v = [start], start, _take(nxt, start, None)
        while v != start or start in nxt:
            ring.append(v)
            prev, v = v, _take(nxt, v, (v[0] - prev[0], v[1] - prev[1]))
        rings.append((abs(_shoelace(ring)), len(rings), ring))
    out = []
    for _, _, ring in sorted(rings, key=lambda r: (-r[0], r[1])):  # the outer ring encloses the others
        pts = [pt for i, pt in enumerate(ring) if not _collinear(ring[i - 1], pt, ring[(i + 1) % len(ring)])]
        out.append([[x, y] for y, x in pts] + [[pts[0][1], pts[0][0]]])
    return out


def _take(nxt: dict, v: tuple, heading) -> tuple:
    """Remove and return the edge out of corner v: at a pinch (two edges out) the one turning left
    of `heading` (dy, dx), away from the object (which lies right of the clockwise edges)."""
    outs = nxt[v]
    i = 0
    if len(outs) > 1 and heading is not None:
        left = (-heading[1], heading[0])
        i = next((k for k, w in enumerate(outs) if (w[0] - v[0], w[1] - v[1]) == left), 0)
    w = outs.pop(i)
    if not outs:
        del nxt[v]
    return w


def _shoelace(ring) -> float:
    return 0.5 * sum(y0 * x1 - x0 * y1 for (y0, x0), (y1, x1) in zip(ring, ring[1:] + ring[:1]))


def _collinear(a, b, c) -> bool:
    return (b[0] - a[0]) * (c[1] - b[1]) == (b[1] - a[1]) * (c[0] - b[0])


class InstanceWriter:
    """Streams (K, n, W) probability bands into labels / GeoJSON / CSV (see the module docstring)."""

    def __init__(self, folder: Path, name: str, shape: tuple[int, int], labels: bool = True,
                 geojson: bool = False, measurements: bool = False, min_area: int = 0,
                 mpp: Optional[float] = None, max_carry: int = 4096, threshold: float = 0.5,
                 rois: bool = False, geometry: Optional[SlideGeometry] = None, image=None,
                 class_names: Optional[list[str]] = None, split: SplitOptions = SplitOptions("none"),
                 target: str = "mask"):
        """shape: the predicted image (h, w); geometry: how it maps to the slide's level 0 (default:
        itself, `mpp` µm/px); image: its reader (engine.slide interface) for intensity columns;
        class_names: names of classes 0..K-1 for a classification of K-class predictions."""
        self.nd = _ndimage()
        self.threshold, self.split, self.target = threshold, split, target
        if split.method == "contour" and target != "contour":
            raise ValueError("the contour split needs a contour model's (K = 3) probabilities")
        require_split_libs(split)  # before any file is opened
        self.h, self.w = shape
        self.min_area, self.mpp, self.max_carry = min_area, mpp, max_carry
        geometry = geometry or SlideGeometry(tuple(shape), tuple(shape), mpp, mpp)
        self.labels = LabelWriter(folder / f"{name}_labels.tif", shape, geometry.level0_shape,
                                  geometry.level0_mpp) if labels else None
        self.objects = ObjectOutputs(folder, name, geometry, geojson, measurements, rois,
                                     image.read if image is not None else None,
                                     image.shape[2] if image is not None else 0, class_names)
        self.cls = np.zeros((0, self.w), np.uint8) if class_names else None  # argmax class rows (K classes)
        self.count, self.top, self._warned = 0, 0, False
        self.mask = np.zeros((0, self.w), bool)
        self.prob = np.zeros((0, self.w), np.float32)
        self.final = np.zeros((0, self.w), np.uint32)
        contour = split.method == "contour"
        self.seeds = np.zeros((0, self.w), bool) if contour else None  # interior p > 0.5
        self.bnd = np.zeros((0, self.w), np.float32) if contour else None  # boundary probability

    def put(self, probs: np.ndarray) -> None:
        """probs (K, n, W): the next n rows of probabilities."""
        fg, p, seeds, bnd = decode_probs(probs, self.threshold, self.target)
        self.mask = np.concatenate([self.mask, fg])
        self.prob = np.concatenate([self.prob, p])
        self.final = np.concatenate([self.final, np.zeros(fg.shape, np.uint32)])
        if self.cls is not None and probs.shape[0] > 1:
            self.cls = np.concatenate([self.cls, probs.argmax(0).astype(np.uint8)])
        if self.seeds is not None:
            self.seeds, self.bnd = np.concatenate([self.seeds, seeds]), np.concatenate([self.bnd, bnd])
        last = self.top + self.mask.shape[0] >= self.h
        self._process(last or self.mask.shape[0] > self.max_carry)

    def _process(self, last: bool) -> None:
        if not last and self.mask.shape[0] > self.max_carry and not self._warned:
            print(f"warning: an object taller than {self.max_carry} rows is cut at a row border", file=sys.stderr)
            self._warned = True
        lab, n = self.nd.label(self.mask & (self.final == 0))
        open_ids = set() if last else set(np.unique(lab[-1]).tolist()) - {0}
        cut = self.mask.shape[0]
        for i, sl in enumerate(self.nd.find_objects(lab), start=1):
            if sl is None:
                continue
            if i in open_ids:
                cut = min(cut, sl[0].start)
                continue
            self._split(lab[sl] == i, sl)
        out = self.final[:cut]
        if self.labels is not None and cut:
            self.labels.put(np.where(out == _DROPPED, 0, out))
        self.mask, self.prob, self.final = self.mask[cut:], self.prob[cut:], self.final[cut:]
        if self.cls is not None and len(self.cls):
            self.cls = self.cls[cut:]
        if self.seeds is not None:
            self.seeds, self.bnd = self.seeds[cut:], self.bnd[cut:]
        self.top += cut

    def _split(self, obj: np.ndarray, sl: tuple[slice, slice]) -> None:
        """A finished component: holes filled (not over other nuclei), split, each part written."""
        if self.split.method == "none":
            self._finish(obj, sl)
            return
        filled = self.nd.binary_fill_holes(obj) & (obj | ~self.mask[sl])
        contour = self.seeds is not None
        parts, n = split_component(filled, self.split, self.seeds[sl] if contour else None,
                                   self.bnd[sl] if contour else None)
        for j in range(1, n + 1):
            self._finish(parts == j, sl)

    def _finish(self, obj: np.ndarray, sl: tuple[slice, slice]) -> None:
        """Fill the object's holes (not over other nuclei), measure, label, trace and write it."""
        filled = self.nd.binary_fill_holes(obj) & (obj | ~self.mask[sl])
        area = int(filled.sum())
        if area < self.min_area:
            self.final[sl][obj] = _DROPPED
            return
        self.count += 1
        self.final[sl][filled] = self.count
        if self.objects.wanted:
            y0, x0 = self.top + sl[0].start, sl[1].start
            rings = trace_rings(filled) if self.objects.geo or self.objects.rois is not None else None
            cls = self.cls[sl] if self.cls is not None and len(self.cls) else None
            self.objects.add(self.count, filled, y0, x0, self.prob[sl], rings, cls)

    def close(self) -> list[Path]:
        """Finish the files (rename them into place); returns their paths."""
        if self.mask.shape[0]:
            self._process(True)
        paths = [self.labels.close(self.count)] if self.labels is not None else []
        return paths + self.objects.close()

    def abort(self) -> None:
        for part in (self.labels, self.objects):
            if part is not None:
                part.abort()
