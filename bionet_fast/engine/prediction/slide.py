"""Lazy window readers for images of any size: only the tiles or strips a window touches are
decoded, so host memory is set by the window, not by the slide.

    reader = open_slide("slide.tif", level=0)        # or mpp=0.5: the pyramid level nearest 0.5 um/px
    reader.shape                                      # (H, W, C)
    reader.read(y, x, h, w)                           # (h, w, C) in the stored dtype

TIFF, BigTIFF, OME-TIFF, SVS and NDPI (what tifffile reads; pyramid levels from
`TiffFile.series[0].levels`): tiled and stripped pages are decoded segment by segment with
tifffile's own decoder, uncompressed contiguous pages are memory-mapped. Other whole-slide formats
(MRXS, VMS, SCN, ...) go through tiffslide or openslide-python when one is installed (the `slides`
extra). PNG / JPEG / BMP have no random access: they are read whole (they are small).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile

from ...data.pixel_size import file_mpp, tiff_mpp
from ...data.readers import TIFF_EXTS, read_image

__all__ = ["open_slide", "file_mpp", "TiffReader", "ArrayReader", "OpenSlideReader", "SLIDE_EXTS", "page_shapes"]

SLIDE_EXTS = (".svs", ".ndpi", ".mrxs", ".vms", ".vmu", ".scn", ".bif", ".svslide")
_TIFFLIKE = TIFF_EXTS + (".svs", ".ndpi", ".btf", ".tf8", ".tf2")


class ArrayReader:
    """An in-memory (H, W, C) array behind the reader interface (PNG / JPEG / small images)."""

    def __init__(self, array: np.ndarray, mpp: Optional[float] = None):
        self.array = array if array.ndim == 3 else array[..., None]
        self.shape = self.array.shape
        self.dtype = self.array.dtype
        self.mpp = self.base_mpp = mpp
        self.level_shapes = [self.shape[:2]]

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        return self.array[y:y + h, x:x + w]

    def close(self) -> None:
        pass


class TiffReader:
    """One page (one pyramid level) of a TIFF, decoded lazily segment by segment.

    Decoded tiles/strips are kept in a small LRU cache (two rows of segments; `plan_windows` sizes
    it to about two windows instead, so it does not grow with the width), so overlapping windows
    read left to right decode each segment about once."""

    def __init__(self, path: str | Path, level: int = 0, page: int = 0):
        self.path = Path(path)
        self.tif = tifffile.TiffFile(self.path)
        series = self.tif.series[0]
        if not 0 <= level < len(series.levels):
            self.tif.close()
            raise ValueError(f"--level {level}: {self.path} has {len(series.levels)} pyramid level(s) "
                             f"(0..{len(series.levels) - 1})")
        self.level_shapes = [_yx(lv.shape, lv.axes) for lv in series.levels]
        self.base_mpp = tiff_mpp(self.tif)
        self.mpp = self.base_mpp * self.level_shapes[0][1] / self.level_shapes[level][1] if self.base_mpp else None
        self.page = series.levels[level].pages[page]
        self.page = self.page.keyframe if not isinstance(self.page, tifffile.TiffPage) else self.page
        p = self.page
        self.shape = (p.imagelength, p.imagewidth, p.samplesperpixel)
        self.dtype = p.dtype
        self._memmap = None
        if p.is_memmappable and (p.planarconfig == 1 or p.samplesperpixel == 1):
            # uncompressed and contiguous: the OS pages in only what a window touches
            self._memmap = np.memmap(self.path, dtype=p.dtype.newbyteorder(self.tif.byteorder), mode="r",
                                     offset=p.dataoffsets[0], shape=self.shape)
        self._seg_h = p.tilelength if p.is_tiled else p.rowsperstrip
        self._seg_w = p.tilewidth if p.is_tiled else p.imagewidth
        self._seg_h = min(self._seg_h or p.imagelength, p.imagelength)
        self._ny = -(-p.imagelength // self._seg_h)
        self._nx = -(-p.imagewidth // self._seg_w)
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._cache_size = 2 * self._nx + 4

    def plan_windows(self, roi_h: int, roi_w: int) -> None:
        """Size the segment cache for windows of roi_h x roi_w read left to right along a row of
        windows: the segments of about two windows, so it does not grow with the image's width
        (stripped pages: the strips of one window's rows)."""
        rows = -(-roi_h // self._seg_h) + 1
        cols = min(self._nx, -(-roi_w // self._seg_w) + 2)
        self._cache_size = rows * cols

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h, w, C) pixels of the window at (y, x), decoding only the segments it touches."""
        if self._memmap is not None:
            return np.array(self._memmap[y:y + h, x:x + w]).reshape(h, w, -1)
        out = np.empty((h, w, self.shape[2]), self.dtype)
        for ty in range(y // self._seg_h, (y + h - 1) // self._seg_h + 1):
            for tx in range(x // self._seg_w, (x + w - 1) // self._seg_w + 1):
                seg = self._segment(ty, tx)
                sy, sx = ty * self._seg_h, tx * self._seg_w
                y0, y1 = max(y, sy), min(y + h, sy + seg.shape[0])
                x0, x1 = max(x, sx), min(x + w, sx + seg.shape[1])
                out[y0 - y:y1 - y, x0 - x:x1 - x] = seg[y0 - sy:y1 - sy, x0 - sx:x1 - sx]
        return out

    def _segment(self, ty: int, tx: int) -> np.ndarray:
        """Segment (ty, tx) as (seg_h, seg_w, C); separate sample planes are stacked."""
        key = ty * self._nx + tx
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        p = self.page
        planes = p.samplesperpixel if p.planarconfig == 2 else 1
        parts = []
        for s in range(planes):
            index = s * self._ny * self._nx + key
            fh = self.tif.filehandle
            fh.seek(p.dataoffsets[index])
            data = fh.read(p.databytecounts[index])
            seg = p.decode(data, index, jpegtables=p.jpegtables, jpegheader=getattr(p, "jpegheader", None))[0]
            parts.append(seg.reshape(seg.shape[-3], seg.shape[-2], -1))
        seg = parts[0] if planes == 1 else np.concatenate(parts, axis=-1)
        self._cache[key] = seg
        if len(self._cache) > self._cache_size:
            self._cache.popitem(last=False)
        return seg

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """A low-resolution (h, w, C) view and its downsample factor: the coarsest pyramid level of
        at least 256 px read with a stride, in bounded memory (engine.thumbnail)."""
        from .thumbnail import coarse_level, strided_read

        lv = coarse_level(self.level_shapes, self.shape[1])
        sub = TiffReader(self.path, level=lv)
        try:
            thumb, step = strided_read(sub, max_side)
        finally:
            sub.close()
        return thumb, self.shape[1] / sub.shape[1] * step

    def close(self) -> None:
        self._cache.clear()
        self._memmap = None
        self.tif.close()


class OpenSlideReader:
    """A whole-slide format read through tiffslide or openslide-python (RGB, uint8)."""

    def __init__(self, path: str | Path, level: int = 0):
        lib = _openslide_module(path)
        self.slide = lib.open_slide(str(path)) if hasattr(lib, "open_slide") else lib.OpenSlide(str(path))
        if not 0 <= level < self.slide.level_count:
            raise ValueError(f"--level {level}: {path} has {self.slide.level_count} levels")
        self.level = level
        w, h = self.slide.level_dimensions[level]
        self.shape, self.dtype = (h, w, 3), np.dtype(np.uint8)
        self.scale = self.slide.level_downsamples[level]
        mpp = self.slide.properties.get("openslide.mpp-x") or self.slide.properties.get("tiffslide.mpp-x")
        self.mpp = float(mpp) * self.scale if mpp else None
        self.base_mpp = float(mpp) if mpp else None
        self.level_shapes = [(h, w) for w, h in self.slide.level_dimensions]

    def read(self, y: int, x: int, h: int, w: int) -> np.ndarray:
        region = self.slide.read_region((int(x * self.scale), int(y * self.scale)), self.level, (w, h))
        return np.asarray(region.convert("RGB"))

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """A low-resolution RGB view (the library's thumbnail) and its downsample factor."""
        thumb = np.asarray(self.slide.get_thumbnail((max_side, max_side)).convert("RGB"))
        return thumb, self.shape[1] / thumb.shape[1]

    def close(self) -> None:
        self.slide.close()


def _openslide_module(path):
    for name in ("tiffslide", "openslide"):
        try:
            return __import__(name)
        except ImportError:
            continue
    raise ValueError(f"{path}: reading {Path(path).suffix} slides needs tiffslide or openslide-python; "
                     "install the slides extra: pip install 'bionet_fast[slides]' (tiffslide)")


def _yx(shape, axes: str) -> tuple[int, int]:
    return shape[axes.index("Y")], shape[axes.index("X")]


def page_shapes(path: str | Path) -> list[tuple[int, ...]]:
    """(H, W) of every page of a TIFF's first series, without decoding pixels."""
    with tifffile.TiffFile(path) as tif:
        return [(p.imagelength, p.imagewidth) for p in tif.pages if getattr(p, "imagelength", None)]


def open_slide(path: str | Path, level: Optional[int] = None, mpp: Optional[float] = None):
    """A lazy reader of `path` at pyramid `level`, or at the level whose pixel size is nearest to
    `mpp` micrometres (an error when the file has no pixel size); level 0 by default."""
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix in _TIFFLIKE:
        reader = TiffReader(path, level=level or 0)
        if mpp is not None:
            reader.close()
            reader = TiffReader(path, level=_nearest_level(path, reader, mpp))
        return reader
    if suffix in SLIDE_EXTS:
        reader = OpenSlideReader(path, level=level or 0)
        return reader
    if level or mpp is not None:
        flag = f"--level {level}" if level else f"--mpp {mpp}"
        raise ValueError(f"{flag}: {path} is not a pyramidal image and records no pixel size; drop the flag")
    return ArrayReader(read_image(path), mpp=file_mpp(path))


def _nearest_level(path: Path, reader: TiffReader, mpp: float) -> int:
    if not reader.base_mpp:
        raise ValueError(f"--mpp {mpp}: {path} does not record its pixel size; pick a level with --level")
    sizes = [reader.base_mpp * reader.level_shapes[0][1] / w for _, w in reader.level_shapes]
    return int(np.argmin([abs(np.log(s / mpp)) for s in sizes]))
