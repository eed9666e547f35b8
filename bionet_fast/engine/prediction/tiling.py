"""Sliding-window inference for images of any size (MONAI-style), with overlap and blending.

A leaf module: it imports nothing of bionet_fast (engine.engines only when `engine` asks for one).

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

__all__ = ["sliding_window_inference", "window_starts", "window_grid", "importance_map", "pad_to", "pad_to_multiple"]

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


def window_grid(h: int, w: int, roi_size: int | Sequence[int], size_multiple: int = 1) -> tuple[int, int, tuple[int, int]]:
    """The padded image size and the window of `sliding_window_inference` for an (h, w) image:
    (padded_h, padded_w, (roi_h, roi_w)). The window is rounded down to a multiple of
    `size_multiple`; a side shorter than it is padded up to a multiple of `size_multiple` and the
    window shrinks to it (longer sides need no padding: the windows are valid model inputs)."""
    roi = (roi_size, roi_size) if isinstance(roi_size, int) else tuple(roi_size)
    roi = tuple((r // size_multiple) * size_multiple for r in roi)
    if min(roi) < 1:
        raise ValueError(f"roi_size={roi_size} is smaller than size_multiple={size_multiple}; "
                         f"use a window of at least {size_multiple} pixels")
    up = lambda side, r: side if side >= r else math.ceil(side / size_multiple) * size_multiple  # noqa: E731
    ph, pw = up(h, roi[0]), up(w, roi[1])
    return ph, pw, (min(roi[0], ph), min(roi[1], pw))


def _check(inputs: torch.Tensor, overlap: float, sw_batch_size: int, predictor) -> None:
    if inputs.dim() != 4:
        raise ValueError(f"sliding_window_inference expects (B, C, H, W); got shape {tuple(inputs.shape)}")
    if not callable(predictor):
        raise ValueError(f"predictor={predictor!r} is not callable; MONAI's argument order is "
                         "(inputs, roi_size, sw_batch_size, predictor, overlap, mode, ...)")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap={overlap}; use a fraction in [0, 1), e.g. 0.25")
    if sw_batch_size < 1:
        raise ValueError(f"sw_batch_size={sw_batch_size}; use an integer >= 1")


@torch.no_grad()
def sliding_window_inference(inputs: torch.Tensor, roi_size: int | Sequence[int], sw_batch_size: int,
                             predictor: Predictor, overlap: float = 0.25, mode: str = "gaussian",
                             sigma_scale: float = 0.125, padding_mode: str = "reflect", cval: float = 0.0,
                             sw_device=None, device=None, size_multiple: int = 1, engine: str = "torch",
                             precision: str | None = None, threads: int | None = None) -> torch.Tensor:
    """Run `predictor` over overlapping windows of `inputs` and blend the results.

    MONAI's argument order and device split, so `monai.inferers.sliding_window_inference` users can
    swap it in. inputs: (B, C, H, W), any H and W. roi_size: window side(s); rounded down to a
    multiple of `size_multiple` (the model's 2**(depth+1)); a window larger than the (padded) image
    shrinks to it. sw_batch_size: windows per predictor call. predictor: (N, C, h, w) -> (N, K, h, w).
    overlap: fraction of a window shared with its neighbour, in [0, 1). mode: "gaussian" weighs
    window centres more than window borders (fewer seams); "constant" averages plainly.
    padding_mode: "reflect" (default) or "constant" (with `cval`) for sides shorter than the window.
    sw_device: where the windows run (default: inputs' device); device: where the blended output is
    accumulated (default: inputs' device), e.g. windows on the GPU and a large output on the host.
    engine: "torch" calls `predictor` as given; "auto" | "openvino" | "onnxruntime" need a
    bionet_fast model as the predictor and run it through that engine (engine.engines; "auto" =
    OpenVINO on a CPU where installed), at `precision` (None: bf16 where native, else fp32) with
    `threads` CPU threads; the model's size_multiple is then used.
    Returns (B, K, H, W) float32 on `device`.
    """
    _check(inputs, overlap, sw_batch_size, predictor)
    if engine != "torch":
        from .engines import engine_predictor

        size_multiple = max(size_multiple, getattr(predictor, "size_multiple", 1))
        predictor = engine_predictor(predictor, engine, precision, threads)
    if padding_mode not in ("reflect", "constant"):
        raise ValueError(f"padding_mode={padding_mode!r}; use 'reflect' or 'constant'")
    sw_device = torch.device(sw_device) if sw_device is not None else inputs.device
    device = torch.device(device) if device is not None else inputs.device
    h, w = inputs.shape[-2:]
    ph, pw, roi = window_grid(h, w, roi_size, size_multiple)
    padded = (pad_to(inputs, ph, pw) if padding_mode == "reflect"
              else F.pad(inputs, (0, pw - w, 0, ph - h), value=cval))
    weight = importance_map(roi, mode, sigma_scale, device=device)
    boxes = [(y, x) for y in window_starts(ph, roi[0], overlap) for x in window_starts(pw, roi[1], overlap)]
    out = norm = None
    for b in range(padded.shape[0]):
        for i in range(0, len(boxes), sw_batch_size):
            chunk = boxes[i:i + sw_batch_size]
            windows = torch.stack([padded[b, :, y:y + roi[0], x:x + roi[1]] for y, x in chunk])
            pred = predictor(windows.to(sw_device)).float().to(device)
            if out is None:
                out = torch.zeros(padded.shape[0], pred.shape[1], ph, pw, device=device)
                norm = torch.zeros(1, 1, ph, pw, device=device)
            for (y, x), p in zip(chunk, pred):
                out[b, :, y:y + roi[0], x:x + roi[1]] += p * weight
                if b == 0:
                    norm[0, 0, y:y + roi[0], x:x + roi[1]] += weight
    return (out / norm)[..., :h, :w]
