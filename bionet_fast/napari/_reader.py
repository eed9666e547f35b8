"""Open predict's outputs in napari: NAME_labels.tif as labels, NAME_prob.tif as an image (uint16
0..65535 shown as 0..1; several classes: one layer per class), NAME.geojson as a shapes layer of
the nucleus outlines (image pixel coordinates, as predict writes them). Layers are in pixels, like
the input image opened by napari's own reader."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np

PathLike = Union[str, Path]
SUFFIXES = ("_labels.tif", "_prob.tif", ".geojson")


def get_reader(path: Union[PathLike, list[PathLike]]) -> Optional[Callable]:
    """napari's reader hook: `read_outputs` when every path is one of predict's outputs, else None."""
    paths = path if isinstance(path, list) else [path]
    if not paths or not all(str(p).lower().endswith(SUFFIXES) for p in paths):
        return None
    return read_outputs


def read_outputs(path: Union[PathLike, list[PathLike]]) -> list[tuple]:
    """[(data, kwargs, layer type)] for each path."""
    paths = path if isinstance(path, list) else [path]
    return [_read(Path(p)) for p in paths]


def _read(path: Path) -> tuple:
    name = path.name.lower()
    if name.endswith(".geojson"):
        return _geojson(path)
    import tifffile

    data = tifffile.imread(path)
    if name.endswith("_labels.tif"):
        return data, {"name": path.stem}, "labels"
    if data.dtype == np.uint16:  # predict's 16-bit probability: 0..65535 = 0..1
        data = data.astype(np.float32) / np.float32(65535)
    if data.ndim == 3 and data.shape[0] == 1:  # one class stored as a single-channel ImageJ file
        data = data[0]
    kwargs = {"name": path.stem, "colormap": "magma", "contrast_limits": (0.0, 1.0), "opacity": 0.6,
              "blending": "additive"}
    if data.ndim == 3:  # several classes, channel first
        kwargs.update(channel_axis=0, name=[f"{path.stem} class {k}" for k in range(data.shape[0])])
    return data, kwargs, "image"


def _geojson(path: Path) -> tuple:
    try:
        doc = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid GeoJSON ({err})") from None
    features = doc.get("features") if isinstance(doc, dict) else None
    if not isinstance(features, list):
        raise ValueError(f"{path}: expected a GeoJSON FeatureCollection (as predict --geojson writes)")
    shapes, labels = [], []
    for i, feat in enumerate(features):
        geom = feat.get("geometry") or {}
        kind, coords = geom.get("type"), geom.get("coordinates")
        polys = [coords] if kind == "Polygon" else coords if kind == "MultiPolygon" else []
        for poly in polys:
            if poly and len(poly[0]) >= 3:
                shapes.append(np.asarray(poly[0], np.float64)[:, ::-1])  # outer ring, [x, y] -> (y, x)
                labels.append(int((feat.get("properties") or {}).get("label", i + 1)))
    kwargs = {"name": path.stem, "shape_type": "polygon", "edge_color": "yellow", "face_color": "transparent",
              "edge_width": 1, "properties": {"label": np.asarray(labels, np.int64)}}
    return shapes, kwargs, "shapes"
