"""Output writers of evaluate and predict: masks, probability maps, label images, super-resolved
images, written atomically (temporary name, then rename) in layouts QuPath, napari and ImageJ open
as they are:

- single 2-D outputs: grey PNG / grey TIFF pages; several classes: ImageJ hyperstack, axes CYX;
- stacks: ImageJ hyperstacks, axes ZYX (masks) and ZCYX (probabilities);
- whole slides: tiled (256 x 256), zlib-compressed BigTIFF written tile by tile, as blocks of the
  output are finished, from a background thread (`TiledTiffWriter`): memory holds the partly
  filled tiles and compressed tiles waiting for their turn, not the slide;
- the input's pixel size (micrometres per pixel, `mpp`) carried over: TIFF resolution tags in
  centimetres (QuPath, Bio-Formats), ImageJ's unit "um", PNG pHYs (dots per inch).
"""
from __future__ import annotations

import queue
import threading
import zlib
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import tifffile
import torch
from PIL import Image

from ...utils.files import atomic_write
from .names import safe_name

TILE = 256


_safe = safe_name  # one rule for every writer and for predict's name checks (engine.names)


def tiff_resolution(mpp: Optional[float]) -> dict:
    """tifffile keywords recording `mpp` micrometres per pixel as pixels per centimetre."""
    return {} if not mpp else {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}


def imwrite_imagej(path: Path, data: np.ndarray, axes: str, mpp: Optional[float] = None) -> Path:
    """An ImageJ hyperstack (axes such as "YX", "CYX", "ZYX", "ZCYX"), pixel size in um; atomic."""
    meta = {"axes": axes}
    kwargs = {}
    if mpp:
        meta["unit"] = "um"
        kwargs = {"resolution": (1 / mpp, 1 / mpp)}
    if data.dtype == np.uint32 or data.shape[0] == 1 and axes == "CYX":
        # ImageJ has no uint32; one channel is one plain grey page (tifffile keeps the (1, H, W) shape)
        return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, photometric="minisblack",
                                                               metadata={"axes": axes}, **tiff_resolution(mpp)))
    return atomic_write(path, lambda tmp: tifffile.imwrite(tmp, data, imagej=True, metadata=meta,
                                                           photometric="minisblack", **kwargs))


def _png(path: Path, array: np.ndarray, mpp: Optional[float]) -> Path:
    extra = {"dpi": (25400 / mpp, 25400 / mpp)} if mpp else {}
    return atomic_write(path, lambda tmp: Image.fromarray(array).save(tmp, format="PNG", **extra))


def prob_to_uint16(probs: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] -> 0..65535, rounded (one float temporary, not three)."""
    tmp = np.clip(probs, 0, 1)
    np.multiply(tmp, 65535, out=tmp)
    return np.rint(tmp, out=tmp).astype(np.uint16)


def mask_of(probs: np.ndarray, axis: int = 0, threshold: float = 0.5) -> np.ndarray:
    """Probabilities (..., K, ...) -> uint8 mask: 0/255 at p > threshold (one class; the model's
    stored threshold, 0.5 unless set), else the argmax."""
    if probs.shape[axis] == 1:
        return (np.take(probs, 0, axis=axis) > threshold).astype(np.uint8) * 255
    return probs.argmax(axis).astype(np.uint8)


def write_outputs(folder: str | Path, name: str, out: torch.Tensor | np.ndarray, task: str = "segmentation",
                  prob_format: str = "png", mpp: Optional[float] = None, threshold: float = 0.5) -> list[Path]:
    """Write one output (K, H, W): segmentation -> NAME_mask.png + NAME_prob.png (16-bit grey, one
    class) or NAME_prob.tif (float32; several classes: ImageJ hyperstack CYX); super-resolution ->
    NAME_sr.png. Returns the paths written."""
    folder, name = Path(folder), _safe(name)
    a = out.detach().float().cpu().numpy() if isinstance(out, torch.Tensor) else np.asarray(out, np.float32)
    if task == "super-resolution":
        rgb = np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8)
        return [_png(folder / f"{name}_sr.png", rgb[0] if rgb.shape[0] == 1 else np.moveaxis(rgb, 0, -1), mpp)]
    paths = [_png(folder / f"{name}_mask.png", mask_of(a, threshold=threshold), mpp)]
    if prob_format == "png" and a.shape[0] == 1:
        paths.append(_png(folder / f"{name}_prob.png", prob_to_uint16(a[0]), mpp))
    else:
        paths.append(imwrite_imagej(folder / f"{name}_prob.tif", a.astype(np.float32), "CYX", mpp))
    return paths


def write_stack(folder: Path, name: str, outs: torch.Tensor, task: str, mpp: Optional[float] = None,
                threshold: float = 0.5) -> list[Path]:
    """(N, K, H, W) of a TIFF stack -> NAME_mask.tif (N grey pages, axes ZYX) and NAME_prob.tif
    (axes ZCYX: N slices of K channels), or NAME_sr.tif."""
    folder = Path(folder)
    a = outs.float().cpu().numpy() if isinstance(outs, torch.Tensor) else np.asarray(outs, np.float32)
    if task == "super-resolution":
        sr = np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8)
        if sr.shape[1] == 1:
            return [imwrite_imagej(folder / f"{name}_sr.tif", sr[:, 0], "ZYX", mpp)]
        return [imwrite_imagej(folder / f"{name}_sr.tif", sr, "ZCYX", mpp)]
    return [imwrite_imagej(folder / f"{name}_mask.tif", mask_of(a, axis=1, threshold=threshold), "ZYX", mpp),
            imwrite_imagej(folder / f"{name}_prob.tif", a.astype(np.float32), "ZCYX", mpp)]


def write_pages(folder: Path, name: str, outs: Sequence[np.ndarray], mpp: Optional[float] = None,
                threshold: float = 0.5) -> list[Path]:
    """Outputs (K, H_i, W_i) of the pages of a TIFF whose pages differ in size: one grey page per
    input page (mask) and K grey pages per input page (probabilities), in page order."""
    def pages(path: Path, arrays: list[np.ndarray]) -> Path:
        def write(tmp):
            with tifffile.TiffWriter(tmp) as tw:
                for arr in arrays:
                    tw.write(arr, photometric="minisblack", contiguous=False, **tiff_resolution(mpp))
        return atomic_write(path, write)

    masks = [mask_of(np.asarray(o, np.float32), threshold=threshold) for o in outs]
    probs = [page.astype(np.float32) for o in outs for page in o]
    return [pages(Path(folder) / f"{name}_mask.tif", masks), pages(Path(folder) / f"{name}_prob.tif", probs)]


class TiledTiffWriter:
    """A tiled BigTIFF page (H, W[, S]) written while its pixels arrive, in any order of blocks:
    `put_block(y, x, block)` places an (n, m[, S]) block; `put(rows)` appends rows (n, W[, S]) below
    the previous ones. A tile is handed to a background thread when its last pixel arrives; the
    thread zlib-compresses it and writes tiles in the row-major order TIFF readers expect, keeping
    tiles that finish ahead of their turn compressed in memory. Memory: the partly filled tiles
    (for blocks that go left to right along rows of tiles: one row of tiles) plus compressed tiles
    waiting for their turn. The file appears under its name only when `close()` succeeds (atomic);
    `abort()` leaves nothing behind."""

    def __init__(self, path: str | Path, shape: tuple[int, ...], dtype, mpp: Optional[float] = None,
                 tile: int = TILE, compression: Optional[str] = "zlib", description: Optional[str] = None):
        if compression not in ("zlib", None):
            raise ValueError(f"compression={compression!r}; TiledTiffWriter writes 'zlib' or None")
        self.path, self.shape, self.dtype, self.tile = Path(path), tuple(shape), np.dtype(dtype), tile
        self.compression = compression
        self._kwargs = dict(tile=(tile, tile), compression=compression, photometric="minisblack",
                            planarconfig="contig" if len(shape) == 3 else None, metadata=None,
                            description=description, **tiff_resolution(mpp))
        self._ny, self._nx = -(-shape[0] // tile), -(-shape[1] // tile)
        self._open: dict[int, list] = {}  # tile index -> [zero-padded tile, pixels still missing]
        self._rows = 0
        self._queue: queue.Queue = queue.Queue(maxsize=64)
        self._error: Optional[BaseException] = None
        self._ended = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def put(self, rows: np.ndarray) -> None:
        """Append rows (n, W[, S]) below those put so far."""
        self.put_block(self._rows, 0, rows)
        self._rows += rows.shape[0]

    def put_block(self, y: int, x: int, block: np.ndarray) -> None:
        """Place the (n, m[, S]) pixels at rows y.., columns x.. (each pixel exactly once)."""
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error
        t, (n, m) = self.tile, block.shape[:2]
        for ty in range(y // t, (y + n - 1) // t + 1):
            for tx in range(x // t, (x + m - 1) // t + 1):
                y0, y1 = max(y, ty * t), min(y + n, (ty + 1) * t)
                x0, x1 = max(x, tx * t), min(x + m, (tx + 1) * t)
                key = ty * self._nx + tx
                if key not in self._open:
                    area = (min(self.shape[0], (ty + 1) * t) - ty * t) * (min(self.shape[1], (tx + 1) * t) - tx * t)
                    self._open[key] = [np.zeros((t, t) + self.shape[2:], self.dtype), area]
                entry = self._open[key]
                entry[0][y0 - ty * t:y1 - ty * t, x0 - tx * t:x1 - tx * t] = block[y0 - y:y1 - y, x0 - x:x1 - x]
                entry[1] -= (y1 - y0) * (x1 - x0)
                if entry[1] <= 0:
                    self._queue.put((key, self._open.pop(key)[0]))

    def close(self) -> Path:
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing {self.path} failed: {self._error}") from self._error
        return self.path

    def abort(self) -> None:
        self._queue.put(_ABORT)
        self._thread.join()

    def _run(self) -> None:
        def write(tmp: str) -> None:
            with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
                tw.write(self._tiles(), shape=self.shape, dtype=self.dtype, **self._kwargs)
        try:
            atomic_write(self.path, write)
        except BaseException as err:  # noqa: BLE001 - reported by put/close in the caller's thread
            self._error = err
            while not self._ended:  # drain so the producer never blocks
                item = self._queue.get()
                self._ended = item is None or item is _ABORT

    def _encode(self, tile: np.ndarray) -> bytes:
        data = tile.tobytes()
        return zlib.compress(data, 6) if self.compression == "zlib" else data

    def _tiles(self) -> Iterator[bytes]:
        """Encoded tiles in row-major order; tiles that arrive early wait here, compressed."""
        waiting: dict[int, bytes] = {}
        total, nxt = self._ny * self._nx, 0
        while nxt < total:
            if nxt in waiting:
                yield waiting.pop(nxt)
                nxt += 1
                continue
            item = self._queue.get()
            self._ended = item is None or item is _ABORT
            if item is _ABORT:
                raise _Aborted()
            if item is None:
                raise ValueError(f"{self.path}: {nxt + len(waiting)} of {total} tiles delivered "
                                 f"for an image of {self.shape}")
            key, tile = item
            waiting[key] = self._encode(tile)
        if self._queue.get() is not None:  # close() follows the last tile
            self._ended = True
            raise _Aborted()
        self._ended = True


class _Aborted(Exception):
    pass


_ABORT = object()


def split_channels(src: Path, dst: Path, classes: int, mpp: Optional[float] = None, tile: int = TILE) -> Path:
    """A tiled (H, W, K) TIFF -> a tiled BigTIFF of K grey pages (OME axes CYX), tile by tile (a
    few decoded tiles in memory); atomic."""
    from .slide import TiffReader

    reader = TiffReader(src)
    reader.plan_windows(tile, tile)  # a few segments cached, not rows of them
    h, w = reader.shape[:2]

    def tiles() -> Iterator[np.ndarray]:
        for k in range(classes):
            for y in range(0, h, tile):
                for x in range(0, w, tile):
                    yield reader.read(y, x, min(tile, h - y), min(tile, w - x))[..., k]

    meta = {"axes": "CYX"}
    if mpp:
        meta.update(PhysicalSizeX=mpp, PhysicalSizeY=mpp, PhysicalSizeXUnit="µm", PhysicalSizeYUnit="µm")

    def write(tmp: str) -> None:
        with tifffile.TiffWriter(tmp, bigtiff=True, ome=True) as tw:
            tw.write(tiles(), shape=(classes, h, w), dtype=reader.dtype, tile=(tile, tile), compression="zlib",
                     photometric="minisblack", metadata=meta, **tiff_resolution(mpp))
    try:
        return atomic_write(dst, write)
    finally:
        reader.close()
