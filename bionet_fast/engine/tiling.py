"""Sliding-window inference for images of any size (MONAI-style), with overlap and blending.

A leaf module: it imports nothing of bionet_fast.

A BiO-Net takes only sides divisible by 2**(depth+1), and a whole 1000x1000 slide tile (or larger)
may not fit in memory at once. `sliding_window_inference` cuts the image into overlapping windows
of `roi_size`, runs the predictor on batches of windows, and blends the overlapping outputs with
a Gaussian (or constant) weight. Sides smaller than the window, or not divisible by
`size_multiple`, are reflect-padded and the result is cropped back to the input size.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["sliding_window_inference", "window_starts", "importance_map", "pad_to", "pad_to_multiple"]

Predictor = Callable[[torch.Tensor], torch.Tensor]


def window_starts(size: int, roi: int, overlap: float) -> list[int]:
    """Start offsets of the windows along one side: stride roi * (1 - overlap), rounded down (at
    least 1), and the last window flush with the end, so every pixel is covered. size >= roi."""
    if roi > size:
        raise ValueError(f"window {roi} is larger than the side {size}; pad the image first")
    if size == roi:
        return [0]
    stride = max(1, int(roi * (1 - overlap)))
    starts = list(range(0, size - roi, stride))
    return starts + [size - roi]


def importance_map(roi: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125,
                   device=None) -> torch.Tensor:
    """Blending weights (h, w): ones for "constant"; for "gaussian" a Gaussian centred on the window
    with sigma = sigma_scale * side (MONAI's default), clamped away from 0 so border pixels of the
    image (covered by one window only) still get a weight."""
    h, w = roi
    if mode == "constant":
        return torch.ones(h, w, device=device)
    if mode != "gaussian":
        raise ValueError(f"mode={mode!r}; use 'gaussian' or 'constant'")

    def bump(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2
        return torch.exp(-0.5 * (x / max(sigma_scale * n, 1e-6)) ** 2)

    g = bump(h)[:, None] * bump(w)[None, :]
    g = g / g.max()
    return g.clamp_min(1e-3).float()


def pad_to(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Reflect-pad the bottom and right of x (B, C, H, W) to (height, width) >= (H, W). Reflection
    needs the pad to be smaller than the side: longer pads repeat the reflection; a side of one
    pixel is repeated."""
    while x.shape[-2] < height or x.shape[-1] < width:
        ph = min(height - x.shape[-2], x.shape[-2] - 1)
        pw = min(width - x.shape[-1], x.shape[-1] - 1)
        if ph <= 0 and pw <= 0 and (x.shape[-2] < height or x.shape[-1] < width):
            return F.pad(x, (0, width - x.shape[-1], 0, height - x.shape[-2]), mode="replicate")
        x = F.pad(x, (0, max(pw, 0), 0, max(ph, 0)), mode="reflect")
    return x


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Reflect-pad x (B, C, H, W) up to multiples of `multiple`; returns (padded, (H, W)) so that
    `padded[..., :H, :W]` crops back."""
    h, w = x.shape[-2:]
    return pad_to(x, math.ceil(h / multiple) * multiple, math.ceil(w / multiple) * multiple), (h, w)


@torch.no_grad()
def sliding_window_inference(image: torch.Tensor, roi_size: int | Sequence[int], predictor: Predictor,
                             overlap: float = 0.25, mode: str = "gaussian", sw_batch_size: int = 4,
                             size_multiple: int = 1, sigma_scale: float = 0.125) -> torch.Tensor:
    """Run `predictor` over overlapping windows of `image` and blend the results.

    image: (B, C, H, W), any H and W. roi_size: window side(s); rounded down to a multiple of
    `size_multiple` (the model's 2**(depth+1)); a window larger than the (padded) image shrinks to
    it. predictor: (N, C, h, w) -> (N, K, h, w), called with up to `sw_batch_size` windows at once.
    overlap: fraction of a window shared with its neighbour, in [0, 1). mode: "gaussian" weighs
    window centres more than window borders (fewer seams); "constant" averages plainly.
    Returns (B, K, H, W) in float32 on image's device.
    """
    if image.dim() != 4:
        raise ValueError(f"sliding_window_inference expects (B, C, H, W); got shape {tuple(image.shape)}")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap}; use a fraction in [0, 1), e.g. 0.25")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size={sw_batch_size}; use an integer >= 1")
    roi = (roi_size, roi_size) if isinstance(roi_size, int) else tuple(roi_size)
    roi = tuple((r // size_multiple) * size_multiple for r in roi)
    if min(roi) < 1:
        raise ValueError(f"roi_size={roi_size} is smaller than size_multiple={size_multiple}; "
                         f"use a window of at least {size_multiple} pixels")
    # A side shorter than the window is padded to a multiple of size_multiple and the window
    # shrinks to it; longer sides need no padding (the windows themselves are valid sizes).
    h, w = image.shape[-2:]
    up = lambda side, r: side if side >= r else math.ceil(side / size_multiple) * size_multiple  # noqa: E731
    padded = pad_to(image, up(h, roi[0]), up(w, roi[1]))
    roi = (min(roi[0], padded.shape[-2]), min(roi[1], padded.shape[-1]))
    weight = importance_map(roi, mode, sigma_scale, device=image.device)
    boxes = [(y, x) for y in window_starts(padded.shape[-2], roi[0], overlap)
             for x in window_starts(padded.shape[-1], roi[1], overlap)]
    out = norm = None
    for b in range(padded.shape[0]):
        for i in range(0, len(boxes), sw_batch_size):
            chunk = boxes[i:i + sw_batch_size]
            windows = torch.stack([padded[b, :, y:y + roi[0], x:x + roi[1]] for y, x in chunk])
            pred = predictor(windows).float().to(image.device)
            if out is None:
                out = torch.zeros(padded.shape[0], pred.shape[1], *padded.shape[-2:], device=image.device)
                norm = torch.zeros(1, 1, *padded.shape[-2:], device=image.device)
            for (y, x), p in zip(chunk, pred):
                out[b, :, y:y + roi[0], x:x + roi[1]] += p * weight
                if b == 0:
                    norm[0, 0, y:y + roi[0], x:x + roi[1]] += weight
    return (out / norm)[..., :h, :w]
