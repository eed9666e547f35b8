"""Bounded-memory tiled prediction: the same windows, gaussian blending and result as
`sliding_window_inference` on the whole image, computed one row of windows at a time and, within
a row, one batch of windows at a time, left to right.

Windows start at the same offsets (`window_starts`) and every pixel sums the same contributions in
the same order, so the output equals the in-memory prediction (up to the batching of windows,
~1e-6 in fp32). After a batch, the columns left of the next window and the rows above the next row
of windows receive no further contribution: that block is divided by the summed weights
(recomputed from the window grid, not stored) and handed on (`predict_blocks` yields it).
Host memory: windows are read one at a time (engine.slide decodes only the tiles they touch); the
accumulator spans one window height and the columns of one batch of windows plus one window; the
only buffer across the width is the carry, the rows of the next row of windows that this row's
windows already reached: 4 bytes x classes x carried rows per column (carried rows = window
height - stride, 64 at 512-pixel windows and overlap 0.125; more before the last row of windows,
which is flush with the bottom edge: at most window height - 1).
"""
from __future__ import annotations

import bisect

from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import torch

from ...data.readers import match_channels, to_float
from .tiling import importance_map, pad_to, window_grid, window_starts

__all__ = ["StreamOptions", "predict_blocks", "predict_rows", "tissue_mask", "count_windows"]


@dataclass
class StreamOptions:
    """How to window an image: window side, overlap, windows per batch, blending."""

    tile_size: int = 512
    overlap: float = 0.25
    sw_batch_size: int = 4
    mode: str = "gaussian"
    sigma_scale: float = 0.125
    tissue_only: bool = False
    progress: bool = True  # a tqdm bar on stderr: windows done, windows/s, ETA
    label: str = ""  # the bar's title (the image name)


def _float_scale(reader) -> Optional[float]:
    """None for uint8/uint16/bool (fixed scale in `data.readers.to_float`), else the image maximum
    (one streaming pass), so a band is scaled exactly as the whole image would be."""
    if reader.dtype in (np.uint8, np.uint16) or reader.dtype == np.bool_:
        return None
    h, w = reader.shape[:2]
    step = 1024  # blocks, not whole rows: memory does not grow with the width
    return max(float(np.nan_to_num(reader.read(y, x, min(step, h - y), min(step, w - x)).astype(np.float32))
                     .max(initial=0)) for y in range(0, h, step) for x in range(0, w, step))


def tissue_mask(thumb: np.ndarray) -> np.ndarray:
    """(h, w, C) thumbnail -> bool (h, w): tissue where the pixel is not near-white background
    (grey < 0.85 of the maximum) or is coloured (saturation > 0.1), as whole-slide tools do."""
    t = thumb.astype(np.float32)
    t /= float(np.iinfo(thumb.dtype).max) if np.issubdtype(thumb.dtype, np.integer) else max(float(t.max()), 1e-12)
    rgb = t[..., :3] if t.shape[-1] >= 3 else np.repeat(t[..., :1], 3, axis=-1)
    sat = (rgb.max(-1) - rgb.min(-1)) / np.maximum(rgb.max(-1), 1e-6)
    return (rgb.mean(-1) < 0.85) | (sat > 0.1)


def count_windows(h: int, w: int, tile_size: int, overlap: float, size_multiple: int) -> int:
    ph, pw, roi = window_grid(h, w, tile_size, size_multiple)
    return len(window_starts(ph, roi[0], overlap)) * len(window_starts(pw, roi[1], overlap))


@torch.no_grad()
def predict_blocks(reader, predictor: Callable[[torch.Tensor], torch.Tensor], in_channels: int,
                   size_multiple: int, opts: StreamOptions, sw_device: torch.device,
                   device: torch.device = torch.device("cpu"), tissue: Optional[tuple[np.ndarray, float]] = None,
                   classes: int = 1) -> Iterator[tuple[int, int, np.ndarray]]:
    """Yield the blended output of `reader`'s image as finished blocks (y, x, (K, n, m) float32):
    row of windows by row of windows, each row in column blocks left to right. The blocks tile the
    image exactly once; a block is final (no later window touches it) when it is yielded.

    reader: `.shape` (H, W, C), `.dtype`, `.read(y, x, h, w)` -> (h, w, C) (see engine.slide).
    predictor: (N, in_channels, h, w) on `sw_device` -> (N, K, h, w). tissue: (thumbnail mask,
    downsample factor); windows without tissue are not run and count as background (p = 0; several
    classes: class 0). classes: K, the output channels (needed when the first windows hold no tissue)."""
    from ...utils.progress import tqdm

    h, w = reader.shape[:2]
    ph, pw, roi = window_grid(h, w, opts.tile_size, size_multiple)
    ys, xs = window_starts(ph, roi[0], opts.overlap), window_starts(pw, roi[1], opts.overlap)
    if hasattr(reader, "plan_windows"):  # a decoded-segment cache sized by the window, not the width
        reader.plan_windows(*roi)
    band = _Band(ys, xs, roi, importance_map(roi, opts.mode, opts.sigma_scale, device=device), pw, device)
    gmax = _float_scale(reader)
    bar = tqdm(total=len(ys) * len(xs), unit="win", desc=opts.label or None, disable=not opts.progress,
               leave=False, dynamic_ncols=True, mininterval=1.0)
    read = lambda yx: _read_window(reader, yx[0], yx[1], roi, in_channels, gmax)  # noqa: E731
    try:
        for g in range(len(band.groups)):
            y = band.start(g)
            for j in range(0, len(xs), opts.sw_batch_size):
                chunk = xs[j:j + opts.sw_batch_size]
                boxes = [(yy, x) for yy in band.rows for x in chunk]
                keep = [yx for yx in boxes if tissue is None or _has_tissue(tissue, *yx, roi)]
                preds = {}
                for k in range(0, len(keep), opts.sw_batch_size):
                    preds.update(_run_windows(read, keep[k:k + opts.sw_batch_size], predictor, sw_device, device))
                last = j + opts.sw_batch_size >= len(xs)
                x0, out = band.add(boxes, preds, classes, pw if last else xs[j + opts.sw_batch_size])
                bar.update(len(boxes))
                if x0 < w and y < h:
                    yield y, x0, out[:, :h - y, :w - x0].cpu().numpy()
    finally:
        bar.close()


class _Band:
    """The blend accumulator of one row of windows (or two: the last row, flush with the bottom
    edge, is merged with the one before when it overlaps it by more than the regular overlap), kept
    only over its open columns (the columns of one batch of windows plus one window), and the
    carry: the rows of the next row of windows that this row's windows already reached,
    (K, rows, padded W) float32, the only buffer that grows with the width. The summed weights are
    recomputed, not stored: for a finished block they are added up in the same window order as
    `sliding_window_inference`."""

    def __init__(self, ys: list[int], xs: list[int], roi: tuple[int, int], weight: torch.Tensor, pw: int,
                 device: torch.device):
        self.ys, self.xs, self.roi, self.weight, self.pw, self.device = ys, xs, roi, weight, pw, device
        self.ph = ys[-1] + roi[0]
        self.groups = [[i] for i in range(len(ys))]
        if len(ys) > 2 and ys[-1] - ys[-2] < ys[-2] - ys[-3] or len(ys) == 2 and ys[1] < roi[0]:
            self.groups[-2:] = [[len(ys) - 2, len(ys) - 1]]  # a short last step: no large carry
        nxt = [ys[grp[-1] + 1] if grp[-1] + 1 < len(ys) else self.ph for grp in self.groups]
        self.overlaps = [max(ys[grp[-1]] + roi[0] - n, 0) for grp, n in zip(self.groups, nxt)]
        self.carry = None

    def start(self, g: int) -> int:
        """Begin group g; returns its first row."""
        grp = self.groups[g]
        self.g, self.rows, self.last = g, [self.ys[i] for i in grp], grp[-1]
        self.y = self.rows[0]
        self.y_next = self.ys[grp[-1] + 1] if grp[-1] + 1 < len(self.ys) else self.ph
        self.height = self.rows[-1] + self.roi[0] - self.y
        self.c0 = self.c1 = 0  # columns [c0, c1) are open in `acc`
        self.acc = None
        return self.y

    def add(self, boxes: list[tuple[int, int]], preds: dict[tuple[int, int], torch.Tensor], classes: int,
            final_to: int) -> tuple[int, torch.Tensor]:
        """Accumulate the windows at (y, x) in `boxes`; return the finished block (x0, (K, n, m)):
        the rows no later row of windows reaches, columns [c0, final_to)."""
        rh, rw = self.roi
        if self.acc is None:
            k = next(iter(preds.values())).shape[0] if preds else classes
            self.acc = torch.zeros(k, self.height, 0, device=self.device)
            if self.carry is None:
                shape = (k, max(self.overlaps), self.pw)
                # on the host through numpy, so tracemalloc sees the one buffer that grows with the width
                self.carry = (torch.from_numpy(np.zeros(shape, np.float32)) if self.device.type == "cpu"
                              else torch.zeros(shape, device=self.device))
        self._extend(max(x for _, x in boxes) + rw)
        for y, x in boxes:
            rs, cs = slice(y - self.y, y - self.y + rh), slice(x - self.c0, x - self.c0 + rw)
            if (y, x) in preds:
                self.acc[:, rs, cs] += preds[(y, x)] * self.weight
            elif self.acc.shape[0] > 1:  # a skipped window is background: class 0 for several classes
                self.acc[0, rs, cs] += self.weight
        f, n, ov = final_to - self.c0, self.y_next - self.y, self.overlaps[self.g]
        block = self.acc[:, :n, :f] / self._norm(self.c0, final_to)
        self.carry[:, :ov, self.c0:final_to] = self.acc[:, n:n + ov, :f]
        out = (self.c0, block)
        self.acc = self.acc[:, :, f:]
        self.c0 = final_to
        return out

    def _extend(self, right: int) -> None:
        """Open columns [c1, right): what earlier rows of windows carried there, zeros below."""
        if right <= self.c1:
            return
        ext = torch.zeros(self.acc.shape[0], self.height, right - self.c1, device=self.device)
        if self.g > 0:
            ov = self.overlaps[self.g - 1]
            ext[:, :ov] = self.carry[:, :ov, self.c1:right]
        self.acc = torch.cat([self.acc, ext], dim=2)
        self.c1 = right

    def _norm(self, a: int, b: int) -> torch.Tensor:
        """Summed weights (n, b - a) of the group's final rows, in `sliding_window_inference`'s order
        (rows of windows top to bottom, windows left to right)."""
        rh, rw = self.roi
        norm = torch.zeros(self.y_next - self.y, b - a, device=self.device)
        lo = max(bisect.bisect_right(self.xs, a - rw) - 1, 0)  # the first window that may reach column a
        for yk in self.ys[:self.last + 1]:
            r0, r1 = max(yk, self.y), min(yk + rh, self.y_next)
            if r1 <= r0:
                continue
            for x in self.xs[lo:bisect.bisect_left(self.xs, b)]:
                c0, c1 = max(x, a), min(x + rw, b)
                if c1 > c0:
                    norm[r0 - self.y:r1 - self.y, c0 - a:c1 - a] += self.weight[r0 - yk:r1 - yk, c0 - x:c1 - x]
        return norm


@torch.no_grad()
def predict_rows(reader, predictor: Callable[[torch.Tensor], torch.Tensor], in_channels: int,
                 size_multiple: int, opts: StreamOptions, sw_device: torch.device,
                 device: torch.device = torch.device("cpu"),
                 tissue: Optional[tuple[np.ndarray, float]] = None, classes: int = 1) -> Iterator[np.ndarray]:
    """`predict_blocks` assembled into full-width row bands (K, n, W), top to bottom (holds one
    band of the output: for consumers that need whole rows, e.g. instances)."""
    rows, top = None, 0
    for y, x, block in predict_blocks(reader, predictor, in_channels, size_multiple, opts, sw_device, device,
                                      tissue, classes):
        if y != top and rows is not None:
            yield rows
            rows = None
        if rows is None:
            rows, top = np.empty((block.shape[0], block.shape[1], reader.shape[1]), np.float32), y
        rows[:, :, x:x + block.shape[2]] = block
    if rows is not None:
        yield rows


def _read_window(reader, y: int, x: int, roi: tuple[int, int], in_channels: int,
                 gmax: Optional[float]) -> torch.Tensor:
    """The window at (y, x) as float (C, roi_h, roi_w). Only where the whole image is shorter or
    narrower than the window (then this window is the whole image along that side) is it
    reflect-padded at the bottom / right, exactly as `sliding_window_inference` pads the image."""
    h, w = reader.shape[:2]
    raw = reader.read(y, x, min(roi[0], h - y), min(roi[1], w - x))
    win = match_channels(to_float(raw, gmax), in_channels, getattr(reader, "path", "image"))
    t = torch.from_numpy(np.ascontiguousarray(win.transpose(2, 0, 1)))[None]
    if t.shape[-2] < roi[0] or t.shape[-1] < roi[1]:
        t = pad_to(t, *roi)
    return t[0]


def _run_windows(read: Callable[[tuple[int, int]], torch.Tensor], boxes: list[tuple[int, int]], predictor,
                 sw_device: torch.device, device: torch.device) -> dict[tuple[int, int], torch.Tensor]:
    """{(y, x): (K, roi_h, roi_w) output} of the windows at `boxes`, in one predictor call."""
    if not boxes:
        return {}
    windows = torch.stack([read(yx) for yx in boxes]).to(sw_device)
    return dict(zip(boxes, predictor(windows).float().to(device)))


def _has_tissue(tissue: tuple[np.ndarray, float], y: int, x: int, roi: tuple[int, int]) -> bool:
    mask, f = tissue
    y0, x0 = int(y / f), int(x / f)
    y1, x1 = max(int(np.ceil((y + roi[0]) / f)), y0 + 1), max(int(np.ceil((x + roi[1]) / f)), x0 + 1)
    return bool(mask[y0:y1, x0:x1].any())
