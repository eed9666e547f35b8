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

Outputs: NAME_labels.tif (uint32, tiled BigTIFF), NAME.geojson (FeatureCollection, image pixel
coordinates, one "detection" polygon per label, measurements area and mean probability: QuPath
imports it by drag and drop), NAME_nuclei.csv (the same table). scipy is needed (the `instances`
extra).
"""
from __future__ import annotations

import csv
import io
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from ..utils.files import commit, temp_beside
from .split import SplitOptions, decode_probs, require_split_libs, split_component
from .writers import TiledTiffWriter

__all__ = ["InstanceWriter", "trace_outline", "CSV_COLUMNS"]

CSV_COLUMNS = ["label", "centroid_x", "centroid_y", "area_px", "area_um2", "mean_probability",
               "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]
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
    the pixel count. Of several loops (an object enclosing another) the largest is returned."""
    p = np.pad(obj, 1)
    inner = p[1:-1, 1:-1]
    nxt = {}
    for (dy, dx), (a, b) in {(-1, 0): ((0, 0), (0, 1)), (0, 1): ((0, 1), (1, 1)),
                             (1, 0): ((1, 1), (1, 0)), (0, -1): ((1, 0), (0, 0))}.items():
        ys, xs = np.nonzero(inner & ~p[1 + dy:p.shape[0] - 1 + dy, 1 + dx:p.shape[1] - 1 + dx])
        for y, x in zip(ys.tolist(), xs.tolist()):
            nxt[(y + a[0], x + a[1])] = (y + b[0], x + b[1])
    best, best_area = [], -1.0
    while nxt:
        start = min(nxt)
        ring, v = [start], nxt.pop(start)
        while v != start:
            ring.append(v)
            v = nxt.pop(v)
        area = abs(_shoelace(ring))
        if area > best_area:
            best, best_area = ring, area
    pts = [pt for i, pt in enumerate(best) if not _collinear(best[i - 1], pt, best[(i + 1) % len(best)])]
    return [[x, y] for y, x in pts] + [[pts[0][1], pts[0][0]]]


def _shoelace(ring) -> float:
    return 0.5 * sum(y0 * x1 - x0 * y1 for (y0, x0), (y1, x1) in zip(ring, ring[1:] + ring[:1]))


def _collinear(a, b, c) -> bool:
    return (b[0] - a[0]) * (c[1] - b[1]) == (b[1] - a[1]) * (c[0] - b[0])


class _StreamFile:
    """A text file written incrementally under a temporary name, renamed on close (atomic)."""

    def __init__(self, path: Path):
        self.path = path
        fd, self.tmp = temp_beside(path)
        self.f = io.open(fd, "w", newline="")

    def close(self) -> Path:
        self.f.close()
        commit(self.tmp, self.path)  # as atomic_write: the umask's mode, fsync, rename, fsync
        return self.path

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


class InstanceWriter:
    """Streams (K, n, W) probability bands into labels / GeoJSON / CSV (see the module docstring)."""

    def __init__(self, folder: Path, name: str, shape: tuple[int, int], labels: bool = True,
                 geojson: bool = False, measurements: bool = False, min_area: int = 0,
                 mpp: Optional[float] = None, max_carry: int = 4096, threshold: float = 0.5,
                 split: SplitOptions = SplitOptions("none"), target: str = "mask"):
        self.nd = _ndimage()
        self.threshold, self.split, self.target = threshold, split, target
        if split.method == "contour" and target != "contour":
            raise ValueError("the contour split needs a contour model's (K = 3) probabilities")
        require_split_libs(split)  # before any file is opened
        self.h, self.w = shape
        self.min_area, self.mpp, self.max_carry = min_area, mpp, max_carry
        self.labels = TiledTiffWriter(folder / f"{name}_labels.tif", shape, np.uint32, mpp) if labels else None
        self.geo = _StreamFile(folder / f"{name}.geojson") if geojson else None
        self.csv = _StreamFile(folder / f"{name}_nuclei.csv") if measurements else None
        if self.geo:
            self.geo.f.write('{"type": "FeatureCollection", "features": [\n')
        if self.csv:
            self.table = csv.writer(self.csv.f)
            self.table.writerow(CSV_COLUMNS)
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
        ys, xs = np.nonzero(filled)
        y0, x0 = self.top + sl[0].start, sl[1].start
        row = {"label": self.count, "centroid_x": round(float(xs.mean()) + x0 + 0.5, 2),
               "centroid_y": round(float(ys.mean()) + y0 + 0.5, 2), "area_px": area,
               "area_um2": round(area * self.mpp ** 2, 4) if self.mpp else "",
               "mean_probability": round(float(self.prob[sl][filled].mean()), 4),
               "bbox_x0": x0 + int(xs.min()), "bbox_y0": y0 + int(ys.min()),
               "bbox_x1": x0 + int(xs.max()) + 1, "bbox_y1": y0 + int(ys.max()) + 1}
        if self.csv:
            self.table.writerow([row[c] for c in CSV_COLUMNS])
        if self.geo:
            ring = [[x + x0, y + y0] for x, y in trace_outline(filled)]
            measurements = {"Area px": area, "Mean probability": row["mean_probability"]}
            if self.mpp:
                measurements["Area um^2"] = row["area_um2"]
            feature = {"type": "Feature", "id": f"nucleus-{self.count}",
                       "geometry": {"type": "Polygon", "coordinates": [ring]},
                       "properties": {"objectType": "detection", "name": f"Nucleus {self.count}",
                                      "label": self.count, "measurements": measurements}}
            self.geo.f.write(("" if self.count == 1 else ",\n") + json.dumps(feature, separators=(",", ":")))

    def close(self) -> list[Path]:
        """Finish the files (rename them into place); returns their paths."""
        if self.mask.shape[0]:
            self._process(True)
        paths = []
        if self.labels is not None:
            paths.append(self.labels.close())
        if self.geo:
            self.geo.f.write("\n]}\n")
            paths.append(self.geo.close())
        if self.csv:
            paths.append(self.csv.close())
        return paths

    def abort(self) -> None:
        for part in (self.labels, self.geo, self.csv):
            if part is not None:
                part.abort()
