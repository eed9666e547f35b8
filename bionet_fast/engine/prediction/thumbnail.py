"""--tissue-only's thumbnail with bounded memory on any TIFF (issue 24, item 6).

The thumbnail is read from the coarsest pyramid level that still has 256 pixels a side (or the
page itself), with a stride that brings its longer side to at most `max_side`: every `step`-th
pixel of every `step`-th row. Memory holds the thumbnail plus ONE decoded segment (tile or strip),
never the level: an uncompressed page is sliced through its memory map (the OS pages in what the
stride touches), a compressed one is decoded segment by segment, each subsampled on the global
grid and dropped. (A compressed page stored as one single strip still decodes that strip whole:
TIFF gives no way to decode part of a segment.)
"""
from __future__ import annotations

import numpy as np

MIN_SIDE = 256


def coarse_level(level_shapes: list[tuple[int, int]], ref_w: int) -> int:
    """The coarsest level (no finer than the reader's: width <= ref_w) with a side >= MIN_SIDE."""
    usable = [lv for lv, (h, w) in enumerate(level_shapes) if w <= ref_w]
    big = [lv for lv in usable if max(level_shapes[lv]) >= MIN_SIDE]
    return max(big) if big else min(usable)


def strided_read(reader, max_side: int) -> tuple[np.ndarray, int]:
    """(every step-th pixel of `reader`'s page as (h', w', C), step); reader: engine.slide.TiffReader."""
    h, w, c = reader.shape
    step = max(1, -(-max(h, w) // max_side))
    out = np.empty((-(-h // step), -(-w // step), c), reader.dtype)
    if reader._memmap is not None:  # a view: numpy copies the strided pixels straight into `out`
        out[:] = reader._memmap[::step, ::step].reshape(out.shape)
        return out, step
    for ty in range(reader._ny):
        for tx in range(reader._nx):
            seg = reader._segment(ty, tx)
            reader._cache.clear()  # one decoded segment at a time, not a row of them
            sy, sx = ty * reader._seg_h, tx * reader._seg_w
            seg = seg[:max(0, min(reader._seg_h, h - sy)), :max(0, min(reader._seg_w, w - sx))]
            y0, x0 = -(-sy // step) * step, -(-sx // step) * step  # first rows/cols on the global grid
            part = seg[y0 - sy::step, x0 - sx::step]
            out[y0 // step:y0 // step + part.shape[0], x0 // step:x0 // step + part.shape[1]] = part
    return out, step
