"""Nucleus annotations as pathologists have them, rasterised into instance label maps.

* Aperio ImageScope XML (MoNuSeg's ``Annotations/NAME.xml``):
  ``Annotations/Annotation/Regions/Region/Vertices/Vertex X= Y=``, one polygon per nucleus.
* QuPath GeoJSON (``NAME.geojson``): a FeatureCollection or a bare list of features, annotations,
  detections and cells alike (a cell's ``nucleusGeometry`` is used when present: the nucleus, not
  the cell), Polygon and MultiPolygon geometries whose holes are cleared; an optional
  ``properties.classification`` (``{"name": ...}`` or a plain string) names each object's class.
  Points and lines (no area) are skipped.

The rules, the same for both formats:

* Ids are the objects' order in the file, 1-based: the k-th polygon object (region or feature)
  gets id k. A region with fewer than 3 vertices is skipped and takes no id.
* Later objects win on overlap: each object is painted over the ones before it, so a pixel
  claimed by two nuclei belongs to the one written last. An object painted over entirely (or too
  small to hold a pixel centre) leaves its id unused: ids are not renumbered.
* A pixel belongs to a polygon when its centre, (x + 0.5, y + 0.5) in the file's coordinates,
  lies inside it: coordinates are those of pixel corners, as in QuPath (pixel (0, 0) covers
  [0, 1) x [0, 1)). A polygon traced along pixel edges (``predict --geojson``) therefore covers
  exactly the pixels it outlines. Parts outside the image are clipped.
* A hole (a Polygon's inner ring) clears the pixels of its own object only; an Aperio region
  with ``NegativeROA="1"`` clears every object under it (an exclusion).

scikit-image draws the polygons (the ``instances`` extra). A leaf module (data layer).
"""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

__all__ = ["Annotation", "read_annotation", "read_aperio_xml", "read_geojson", "rasterize", "parse_annotation",
           "read_target", "instance_map", "class_index", "stated_mpp", "ANNOTATION_EXTS", "is_annotation"]

ANNOTATION_EXTS = (".xml", ".geojson", ".json")


@dataclass
class Annotation:
    """Rasterised annotation: ``labels`` int32 (H, W), 0 = background, object k has id k;
    ``names[k - 1]`` the class name of object k (None where unclassified); ``mpp`` the pixel size
    in µm the file states (Aperio's MicronsPerPixel), else None."""

    labels: np.ndarray
    names: list = field(default_factory=list)
    mpp: Optional[float] = None


def is_annotation(path) -> bool:
    return Path(path).suffix.lower() in ANNOTATION_EXTS


def read_annotation(path, shape: tuple[int, int]) -> Annotation:
    """An Aperio XML (.xml) or QuPath GeoJSON (.geojson, .json) file rasterised at (H, W) `shape`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotation file")
    return read_aperio_xml(path, shape) if path.suffix.lower() == ".xml" else read_geojson(path, shape)


def parse_annotation(path) -> tuple[list, list, list, Optional[float]]:
    """The objects of an annotation file without drawing them: (polygons, negative flags, class
    names, mpp), as :func:`rasterize` takes them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such annotation file")
    return _parse_xml(path) if path.suffix.lower() == ".xml" else _parse_geojson(path)


# --------------------------------------------------------------------------------- Aperio XML
def read_aperio_xml(path, shape: tuple[int, int]) -> Annotation:
    """Aperio ImageScope XML -> instance labels (module docstring: ids, overlap, pixel centres)."""
    polys, negative, names, mpp = _parse_xml(Path(path))
    return Annotation(rasterize(polys, shape, negative), names, mpp)


def _parse_xml(path: Path):
    try:
        root = ET.parse(path).getroot()
    except (ET.ParseError, OSError) as exc:
        raise ValueError(f"{path}: unreadable Aperio XML ({exc})") from exc
    if root.tag != "Annotations":
        raise ValueError(f"{path}: not an Aperio ImageScope XML (root element <{root.tag}>, expected "
                         "<Annotations>); annotation files must be Aperio XML or QuPath GeoJSON")
    objects = []  # (rings, negative)
    for region in root.iter("Region"):
        try:
            ring = [(float(v.attrib["X"]), float(v.attrib["Y"])) for v in region.iter("Vertex")]
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path}: region {region.attrib.get('Id', '?')} has a vertex without "
                             f"numeric X and Y ({exc})") from exc
        if len(ring) >= 3:
            objects.append(([[ring]], region.attrib.get("NegativeROA", "0") == "1"))
    mpp = root.attrib.get("MicronsPerPixel")
    try:
        mpp = float(mpp) if mpp else None
    except ValueError:
        mpp = None
    return [o[0] for o in objects], [o[1] for o in objects], [None] * len(objects), mpp if mpp and mpp > 0 else None


# ------------------------------------------------------------------------------------ GeoJSON
def read_geojson(path, shape: tuple[int, int]) -> Annotation:
    """QuPath GeoJSON -> instance labels and class names (see the module docstring)."""
    polys, _, names, _ = _parse_geojson(Path(path))
    return Annotation(rasterize(polys, shape), names)


def _parse_geojson(path: Path):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable GeoJSON ({exc})") from exc
    if isinstance(data, dict) and data.get("type") == "FeatureCollection":
        features = data.get("features", [])
    elif isinstance(data, dict) and data.get("type") == "Feature":
        features = [data]
    elif isinstance(data, list):
        features = data
    else:
        raise ValueError(f"{path}: not a GeoJSON FeatureCollection, Feature or list of features")
    polygons, names = [], []
    for k, feat in enumerate(features):
        if not isinstance(feat, dict):
            raise ValueError(f"{path}: feature {k} is not a JSON object")
        props = feat.get("properties") or {}
        geom = feat.get("nucleusGeometry") or props.get("nucleusGeometry") or feat.get("geometry")
        parts = _polygon_parts(geom, path, k)
        if parts:
            polygons.append(parts)
            names.append(_class_name(props.get("classification")))
    return polygons, [False] * len(polygons), names, None


def _polygon_parts(geom, path: Path, k: int) -> list:
    """The polygons of a geometry, each a list of rings (outer, holes...) of (x, y); [] for none."""
    if not geom:
        return []
    kind, coords = geom.get("type"), geom.get("coordinates")
    try:
        if kind == "Polygon":
            polys = [coords]
        elif kind == "MultiPolygon":
            polys = coords
        elif kind == "GeometryCollection":
            return [p for g in geom.get("geometries", []) for p in _polygon_parts(g, path, k)]
        else:  # Point, LineString ...: no area
            return []
        return [[[(float(x), float(y)) for x, y, *_ in ring] for ring in poly] for poly in polys if poly]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: feature {k} has malformed {kind} coordinates ({exc})") from exc


def _class_name(classification) -> Optional[str]:
    if isinstance(classification, dict):
        return classification.get("name")
    return classification if isinstance(classification, str) else None


# -------------------------------------------------------------------------------- rasterising
def rasterize(objects: list, shape: tuple[int, int], negative: Optional[list] = None) -> np.ndarray:
    """Paint polygon objects into an int32 (H, W) label map, object k (1-based, list order) as k.

    objects: one entry per object, a list of polygons, each a list of rings [(x, y), ...]: the
    outer ring, then its holes. Later objects overwrite earlier ones; holes clear only their own
    object's pixels; a `negative` object clears every label under it (and takes its id unused).
    """
    draw = _skimage_polygon()
    h, w = shape
    labels = np.zeros((h, w), np.int32)
    for k, polys in enumerate(objects, start=1):
        rings = [np.asarray(r, np.float64) - 0.5 for poly in polys for r in poly if len(r) >= 3]
        if not rings:  # pixel centres sit at integer coordinates, hence the - 0.5
            continue
        pts = np.concatenate(rings)
        # draw in the object's bounding box only (MoNuSeg: hundreds of small nuclei per image)
        y0, x0 = (max(int(np.floor(v)), 0) for v in pts.min(0)[::-1])
        y1, x1 = min(int(np.ceil(pts[:, 1].max())) + 1, h), min(int(np.ceil(pts[:, 0].max())) + 1, w)
        if y0 >= y1 or x0 >= x1:
            continue
        mask = np.zeros((y1 - y0, x1 - x0), bool)
        for poly in polys:
            for j, ring in enumerate(r for r in poly if len(r) >= 3):
                xy = np.asarray(ring, np.float64) - 0.5
                rr, cc = draw(xy[:, 1] - y0, xy[:, 0] - x0, shape=mask.shape)
                mask[rr, cc] = j == 0  # the outer ring fills, the holes clear
        box = labels[y0:y1, x0:x1]
        box[mask] = 0 if negative is not None and negative[k - 1] else k
    return labels


def _skimage_polygon():
    try:
        from skimage.draw import polygon
    except ImportError as err:
        raise ValueError("reading Aperio XML / QuPath GeoJSON annotations needs scikit-image: "
                         "pip install 'bionet_fast[instances]'") from err
    return polygon


# ------------------------------------------------------------------------------ training targets
def instance_map(mask: np.ndarray, path) -> Optional[np.ndarray]:
    """A raw mask (H, W, C) as read -> its instance labels int32 (H, W) when it is an instance label
    map (the Cellpose / StarDist training format: one integer channel, gray or with alpha, holding
    two or more distinct non-zero values; JPEGs never), else None (a binary mask)."""
    if mask.shape[-1] in (2, 4):
        mask = mask[..., :-1]
    if mask.shape[-1] != 1 or not np.issubdtype(mask.dtype, np.integer) or \
            Path(path).suffix.lower() in (".jpg", ".jpeg"):
        return None
    labels = mask[..., 0]
    values = np.unique(labels)
    if (values > 0).sum() < 2:
        return None
    if values[0] < 0:
        raise ValueError(f"{path}: negative values in an instance label map; ids must be 0 (background) or positive")
    return labels.astype(np.int32)


def read_target(path, shape: tuple[int, int], classes: int = 1,
                class_index: Optional[dict] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """The training target of a mask or annotation file for an (H, W) image: (mask uint8 (H, W),
    instances int32 (H, W) or None). mask: {0, 1} with one class; with ``classes`` > 1 the class
    indices (label maps as :func:`readers.label_map`; annotation objects by ``class_index``: class
    name -> index 1..K-1). instances: annotation files and instance label maps; None for binary
    masks and class label maps."""
    from .readers import binarize, label_map, read_stack

    path = Path(path)
    if is_annotation(path):
        ann = read_annotation(path, shape)
        if classes == 1:
            return (ann.labels > 0).astype(np.uint8), ann.labels
        return _class_map(ann, class_index or {}, classes, path), ann.labels
    raw = read_stack(path)  # as read_mask reads: palette indices are the labels
    if raw.shape[0] != 1:
        raise ValueError(f"{path} is a multi-page TIFF stack of {raw.shape[0]} pages: a mask must be one "
                         "image (use the tiff-stack layout, --format tiff-stack, for stacks)")
    raw = raw[0]
    if classes > 1:
        return label_map(raw, classes, path), None
    return binarize(raw, lossy=path.suffix.lower() in (".jpg", ".jpeg")), instance_map(raw, path)


def _class_map(ann: Annotation, index: dict, classes: int, path: Path) -> np.ndarray:
    """Each object's pixels set to its class index (``index[name]``)."""
    lut = np.zeros(len(ann.names) + 1, np.uint8)
    for k, name in enumerate(ann.names, start=1):
        if name is None:
            raise ValueError(f"{path}: object {k} has no classification; with --classes {classes} every "
                             "annotated object needs properties.classification.name (or use --classes 1)")
        lut[k] = index[name]
    return lut[ann.labels]


def class_index(paths, classes: int) -> dict:
    """Class name -> index 1..K-1 for the annotation files of a dataset: the names in sorted order.
    More names than ``classes - 1`` is a ValueError naming them and the fix."""
    names = sorted({n for p in paths if is_annotation(p) for n in parse_annotation(p)[2] if n is not None})
    if len(names) > classes - 1:
        raise ValueError(f"the annotations name {len(names)} classes ({', '.join(names[:8])}) but --classes "
                         f"{classes} leaves room for {classes - 1} besides background: pass --classes "
                         f"{len(names) + 1}")
    return {n: i for i, n in enumerate(names, start=1)}


def stated_mpp(paths) -> Optional[float]:
    """The pixel size (µm) the Aperio XML files among ``paths`` state (MicronsPerPixel on their
    root element; MoNuSeg's do), read without parsing the regions: their median, None if none."""
    values = []
    for p in paths:
        if p is None or Path(p).suffix.lower() != ".xml":
            continue
        try:
            with open(p, "rb") as f:  # the root element only
                _, root = next(ET.iterparse(f, events=("start",)))
                values.append(float(root.attrib["MicronsPerPixel"]))
        except (ET.ParseError, OSError, StopIteration, KeyError, ValueError):
            continue
    values = [v for v in values if v > 0]
    return float(np.median(values)) if values else None
