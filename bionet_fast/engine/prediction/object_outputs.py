"""One record per nucleus, in the slide's level-0 coordinates, written as the tools take them.

`ObjectOutputs.add` takes a finished nucleus as `engine.instances` found it, at the pixel size it
was predicted at, and maps it to level 0 (`engine.pixel_size.SlideGeometry`):

- NAME.geojson: a FeatureCollection of QuPath detections (drag and drop onto the slide). The
  polygon has a hole where another nucleus sits inside it. The measurements carry QuPath's own
  names: "Area µm^2" (the pixel count: the polygon's area), "Length
  µm" (the perimeter, as `skimage.measure.perimeter` estimates it: the outline along pixel edges
  would overestimate a disc's by 4/pi), "Circularity" (4 pi area / length^2, at most 1),
  "Solidity" (area / convex hull area); "Area px^2" and "Length px" where the pixel size is
  unknown; "Red: Mean", "Green: Mean", "Blue: Mean" ("Channel 1: Mean" ... for other images) as
  QuPath's intensity features name them; "Detection probability" (the mean probability, as the
  StarDist extension names its score). With K classes, a "classification" {"name", "color"}:
  the class most of the nucleus' pixels take.
- NAME_nuclei.csv: label, centroid, area, bounding box (level-0 pixels) and µm columns, and the
  columns of `skimage.measure.regionprops_table` under its names: perimeter, eccentricity,
  solidity, axis_major_length, axis_minor_length, orientation, intensity_mean-0..C-1 (the image
  as stored: 0..255 for 8-bit). Lengths are in level-0 pixels.
- NAME_rois.zip: one ImageJ ROI per nucleus (roifile; Fiji: File > Open, or drag the zip onto
  the ROI Manager); traced ROIs along pixel edges, polygons where the outline was scaled.

Every file is written under a temporary name and renamed when complete.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import zipfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np

from ...utils.files import commit, temp_beside
from .measurements import shape_features
from .pixel_size import SlideGeometry

__all__ = ["ObjectOutputs", "csv_columns", "CLASS_COLORS", "geojson_measurements"]

BASE_COLUMNS = ["label", "centroid_x", "centroid_y", "centroid_x_um", "centroid_y_um", "area_px", "area_um2",
                "perimeter", "perimeter_um", "eccentricity", "solidity", "axis_major_length", "axis_minor_length",
                "orientation", "mean_probability", "bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1"]
# QuPath's default class colours (Tumor, Stroma, Immune cells, Necrosis, Other ...), then more
CLASS_COLORS = [(200, 0, 0), (150, 200, 150), (160, 90, 160), (50, 50, 50), (255, 200, 0), (0, 128, 255),
                (255, 128, 0), (0, 200, 200), (128, 128, 0), (128, 0, 255)]
_RGB = ("Red", "Green", "Blue")


def csv_columns(channels: int = 0, classes: bool = False) -> list[str]:
    """The CSV header: BASE_COLUMNS, `class` with K classes, intensity_mean-c per image channel."""
    cols = list(BASE_COLUMNS)
    if classes:
        cols.insert(1, "class")
    return cols + [f"intensity_mean-{c}" for c in range(channels)]


class _StreamFile:
    """A file written incrementally under a temporary name, renamed on close (atomic)."""

    def __init__(self, path: Path, binary: bool = False):
        self.path = path
        fd, self.tmp = temp_beside(path)
        self.f = io.open(fd, "wb" if binary else "w", **({} if binary else {"newline": ""}))

    def close(self) -> Path:
        self.f.close()
        commit(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def geojson_measurements(area: float, perimeter: float, solidity: float, mpp: Optional[float]) -> dict:
    """QuPath's shape measurements from the area and perimeter in level-0 pixels and the solidity
    (see the module docstring)."""
    unit, s = ("µm", mpp) if mpp else ("px", 1.0)
    return {f"Area {unit}^2": round(area * s * s, 4), f"Length {unit}": round(perimeter * s, 4),
            "Circularity": round(min(1.0, 4 * math.pi * area / perimeter ** 2), 4) if perimeter else 0.0,
            "Solidity": round(solidity, 4)}


class ObjectOutputs:
    """The GeoJSON / CSV / ROI zip of one image (see the module docstring).

    image: read(y, x, h, w) -> (h, w, C) of the predicted image (for intensities), or None.
    class_names: names of classes 1..K-1 (index 0 = background unused) for a classification, or None."""

    def __init__(self, folder: Path, name: str, geometry: SlideGeometry, geojson: bool = False,
                 measurements: bool = False, rois: bool = False, image: Optional[Callable] = None,
                 channels: int = 0, class_names: Optional[Sequence[str]] = None):
        self.geometry, self.image, self.class_names = geometry, image, class_names
        self.channels = channels if image is not None else 0
        self.geo = _StreamFile(folder / f"{name}.geojson") if geojson else None
        self.csv = _StreamFile(folder / f"{name}_nuclei.csv") if measurements else None
        self.rois = None
        if rois:
            try:
                import roifile
            except ImportError as err:
                raise ValueError("--rois needs roifile: pip install 'bionet_fast[rois]'") from err
            self.roifile = roifile
            self.rois = _StreamFile(folder / f"{name}_rois.zip", binary=True)
            self.zip = zipfile.ZipFile(self.rois.f, "w", zipfile.ZIP_DEFLATED)
        if self.geo:
            self.geo.f.write('{"type": "FeatureCollection", "features": [\n')
        if self.csv:
            self.columns = csv_columns(self.channels, class_names is not None)
            self.table = csv.writer(self.csv.f)
            self.table.writerow(self.columns)
        self.count = 0

    @property
    def wanted(self) -> bool:
        return bool(self.geo or self.csv or self.rois)

    def add(self, label: int, obj: np.ndarray, y0: int, x0: int, prob: np.ndarray,
            rings: Optional[list], cls: Optional[np.ndarray] = None) -> None:
        """One nucleus: obj (h, w) bool at predicted pixels (y0, x0) of the predicted image; prob
        (h, w) its probability patch; rings its outline, outer ring first, then holes
        (engine.instances.trace_rings, patch corner coordinates); cls (h, w) the argmax class patch
        (K classes)."""
        self.count += 1
        sy, sx = self.geometry.scale
        mpp0 = self.geometry.level0_mpp
        ys, xs = np.nonzero(obj)
        pixels = len(ys)
        cx, cy = (float(xs.mean()) + 0.5 + x0) * sx, (float(ys.mean()) + 0.5 + y0) * sy
        klass = self._class(cls, obj) if cls is not None and self.class_names is not None else None
        mean_p = round(float(prob[obj].mean()), 4)
        rings0 = [self._to_level0(r, x0, y0) for r in rings] if rings is not None else None
        means = self._means(obj, y0, x0) if self.geo or self.csv else []
        rp = shape_features(obj) if self.geo or self.csv else None
        if self.geo:
            self._feature(label, rings0, pixels * sy * sx, rp, mean_p, klass, means)
        if self.csv:
            self._row(label, rp, ys, xs, y0, x0, pixels, cx, cy, mean_p, klass, mpp0, means)
        if self.rois is not None:
            self._roi(label, rings0[0])

    def _to_level0(self, ring: list, x0: int, y0: int) -> np.ndarray:
        sy, sx = self.geometry.scale
        ring0 = (np.asarray(ring, np.float64) + [x0, y0]) * [sx, sy]
        if np.array_equal(ring0, np.round(ring0)):  # pixel corners (an integer scale): exact
            return ring0.astype(np.int64)
        return np.round(ring0, 3)

    def _class(self, cls: np.ndarray, obj: np.ndarray) -> Optional[int]:
        counts = np.bincount(cls[obj].ravel(), minlength=len(self.class_names))
        counts[0] = 0
        return int(counts.argmax()) if counts.any() else None

    def _means(self, obj: np.ndarray, y0: int, x0: int) -> list[float]:
        if not self.channels:
            return []
        patch = self.image(y0, x0, *obj.shape).reshape(*obj.shape, -1).astype(np.float64)
        return [round(float(patch[..., c][obj].mean()), 3) for c in range(patch.shape[-1])]

    def _feature(self, label, rings0, area, rp, mean_p, klass, means) -> None:
        length = math.sqrt(self.geometry.scale[0] * self.geometry.scale[1])  # level-0 px per predicted px
        measurements = geojson_measurements(area, rp["perimeter"] * length, rp["solidity"], self.geometry.level0_mpp)
        names = _RGB if self.channels == 3 else [f"Channel {c + 1}" for c in range(self.channels)]
        for n, v in zip(names, means):
            measurements[f"{n}: Mean"] = v
        measurements["Detection probability"] = mean_p
        props = {"objectType": "detection", "name": f"Nucleus {label}", "label": label,
                 "measurements": measurements}
        if klass is not None:
            props["classification"] = {"name": self.class_names[klass],
                                       "color": list(CLASS_COLORS[(klass - 1) % len(CLASS_COLORS)])}
        feature = {"type": "Feature", "id": f"nucleus-{label}",
                   "geometry": {"type": "Polygon", "coordinates": [r.tolist() for r in rings0]}, "properties": props}
        self.geo.f.write(("" if self.count == 1 else ",\n") + json.dumps(feature, separators=(",", ":"),
                                                                         ensure_ascii=False))

    def _row(self, label, rp, ys, xs, y0, x0, pixels, cx, cy, mean_p, klass, mpp0, means) -> None:
        sy, sx = self.geometry.scale
        length = math.sqrt(sy * sx)  # level-0 pixels per predicted pixel along a line
        area = pixels * sy * sx
        perimeter = rp["perimeter"] * length
        row = {"label": label, "centroid_x": round(cx, 2), "centroid_y": round(cy, 2),
               "centroid_x_um": round(cx * mpp0, 3) if mpp0 else "", "centroid_y_um": round(cy * mpp0, 3) if mpp0 else "",
               "area_px": int(area) if self.geometry.identity else round(area, 2),
               "area_um2": round(area * mpp0 ** 2, 4) if mpp0 else "",
               "perimeter": round(perimeter, 3), "perimeter_um": round(perimeter * mpp0, 3) if mpp0 else "",
               "eccentricity": round(rp["eccentricity"], 4), "solidity": round(rp["solidity"], 4),
               "axis_major_length": round(rp["axis_major_length"] * length, 3),
               "axis_minor_length": round(rp["axis_minor_length"] * length, 3),
               "orientation": round(rp["orientation"], 4), "mean_probability": mean_p,
               "bbox_x0": math.floor((x0 + int(xs.min())) * sx), "bbox_y0": math.floor((y0 + int(ys.min())) * sy),
               "bbox_x1": math.ceil((x0 + int(xs.max()) + 1) * sx), "bbox_y1": math.ceil((y0 + int(ys.max()) + 1) * sy)}
        if klass is not None or "class" in self.columns:
            row["class"] = self.class_names[klass] if klass is not None else ""
        for c, v in enumerate(means):
            row[f"intensity_mean-{c}"] = v
        self.table.writerow([row.get(c, "") for c in self.columns])

    def _roi(self, label: int, ring0: np.ndarray) -> None:
        rf = self.roifile
        points = ring0[:-1]
        roi = rf.ImagejRoi.frompoints(points, name=f"nucleus-{label}")
        integer = points.dtype.kind in "iu"
        roi.roitype = rf.ROI_TYPE.TRACED if integer else rf.ROI_TYPE.POLYGON
        self.zip.writestr(f"nucleus-{label:06d}.roi", roi.tobytes())

    def close(self) -> list[Path]:
        paths = []
        if self.geo:
            self.geo.f.write("\n]}\n")
            paths.append(self.geo.close())
        if self.csv:
            paths.append(self.csv.close())
        if self.rois is not None:
            self.zip.close()
            paths.append(self.rois.close())
        return paths

    def abort(self) -> None:
        if self.rois is not None:
            try:  # the zip's directory is written into a file that is then deleted
                self.zip.close()
            except (OSError, ValueError):
                pass
        for part in (self.geo, self.csv, self.rois):
            if part is not None:
                part.abort()
