"""Writers that map predicted pixels onto the slide's level 0, and the label image's dtype.

`ScaledBlocks(writer, src, dst)`: a TiledTiffWriter-like sink taking blocks at the predicted
pixel size and placing them at level 0 (nearest: each level-0 pixel takes the predicted pixel that
holds its centre; for an integer factor each predicted pixel becomes an f x f square, so the
labels match the GeoJSON outlines, which are scaled by f, pixel for pixel).

`LabelWriter`: NAME_labels.tif as uint16 when the image holds fewer than 65,536 nuclei (napari
opens it as labels, Fiji as a 16-bit image), uint32 above (said once, on stderr). The count is
known only at the end: the labels stream into a temporary uint32 tiled TIFF, converted tile by
tile (a few tiles in memory) when they fit in uint16.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import tifffile

from ...utils.files import atomic_write, commit
from .pixel_size import nearest_index
from .writers import TILE, TiledTiffWriter, tiff_resolution

__all__ = ["ScaledBlocks", "LabelWriter", "UINT16_LABELS"]

UINT16_LABELS = 65535  # most labels a uint16 image holds (0 is background)


class ScaledBlocks:
    """put_block / put of (n, m[, S]) blocks of a (h, w) image into `writer` of a (H, W) image."""

    def __init__(self, writer, src: tuple[int, int], dst: tuple[int, int]):
        self.writer, self.src, self.dst = writer, tuple(src), tuple(dst)
        self.iy, self.ix = nearest_index(src[0], dst[0]), nearest_index(src[1], dst[1])
        self._rows = 0

    def put_block(self, y: int, x: int, block: np.ndarray) -> None:
        if self.src == self.dst:
            self.writer.put_block(y, x, block)
            return
        n, m = block.shape[:2]
        y0, y1 = np.searchsorted(self.iy, [y, y + n])
        x0, x1 = np.searchsorted(self.ix, [x, x + m])
        if y1 > y0 and x1 > x0:
            self.writer.put_block(int(y0), int(x0), block[self.iy[y0:y1] - y][:, self.ix[x0:x1] - x])

    def put(self, rows: np.ndarray) -> None:
        self.put_block(self._rows, 0, rows)
        self._rows += rows.shape[0]

    def close(self) -> Path:
        return self.writer.close()

    def abort(self) -> None:
        self.writer.abort()


class LabelWriter:
    """NAME_labels.tif from rows of uint32 labels at the predicted size (see the module docstring)."""

    def __init__(self, path: Path, src: tuple[int, int], dst: tuple[int, int], mpp: Optional[float] = None):
        self.path, self.shape, self.mpp = Path(path), tuple(dst), mpp
        self.tmp = self.path.parent / f".{self.path.stem}.uint32.tmp"
        self.rows = ScaledBlocks(TiledTiffWriter(self.tmp, dst, np.uint32, mpp), src, dst)

    def put(self, rows: np.ndarray) -> None:
        self.rows.put(rows)

    def close(self, count: int) -> Path:
        """Finish the file for `count` labels: uint16 when they fit, else uint32 (with a note)."""
        self.rows.close()
        if count > UINT16_LABELS:
            print(f"note: {count:,} nuclei: {self.path.name} is uint32 (more than {UINT16_LABELS:,} labels); "
                  "napari opens it as labels, Fiji as a 32-bit image", file=sys.stderr)
            commit(str(self.tmp), self.path)
            return self.path
        try:
            return _to_uint16(self.tmp, self.path, self.shape, self.mpp)
        finally:
            os.unlink(self.tmp)

    def abort(self) -> None:
        self.rows.abort()
        if self.tmp.exists():
            self.tmp.unlink()


def _to_uint16(src: Path, dst: Path, shape: tuple[int, int], mpp: Optional[float]) -> Path:
    """The tiled uint32 TIFF `src` re-encoded as a tiled uint16 BigTIFF `dst`, tile by tile."""
    def tiles():
        with tifffile.TiffFile(src) as tif:
            page = tif.pages[0]
            fh = tif.filehandle
            for index, (offset, count) in enumerate(zip(page.dataoffsets, page.databytecounts)):
                fh.seek(offset)
                tile = page.decode(fh.read(count), index)[0]
                yield tile.reshape(TILE, TILE).astype(np.uint16)

    def write(tmp: str) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
            tw.write(tiles(), shape=shape, dtype=np.uint16, tile=(TILE, TILE), compression="zlib",
                     photometric="minisblack", metadata=None, **tiff_resolution(mpp))
    return atomic_write(dst, write)
