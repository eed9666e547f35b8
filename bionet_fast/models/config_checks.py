"""Bounds every model config is checked against before any tensor is allocated (issue 24).

A config.json is input like any other: `iterations: 1000000000`, `in_channels: 1000000000` or
`depth: 50` must end in a message naming the field, not in a 144 GB allocation or an overflow.
The limits are derived from what a real machine holds:

- memory: the weights (fp32) plus the activations of ONE smallest window (side 2**(depth+1),
  batch 1, fp32: the input, the output and about eight feature maps of the first level) must fit
  in the largest memory one accelerator has today, DEVICE_BYTES (192 GB, NVIDIA B200). This bounds
  in_channels, classes, multiplier and depth together;
- iterations: at most MAX_ITERATIONS (1024, the largest t `python -m bionet_fast.plan --table`
  tries; each iteration is a whole encoder-decoder pass, t = 1024 is 200x the paper's t = 5);
- inference tile_size: at most MAX_TILE (16384: one fp32 feature map of the first level of a
  x1.0 BiO-Net at that side is 34 GB).

A leaf module: it imports nothing of bionet_fast.
"""
from __future__ import annotations

import math
from typing import Any, Optional

DEVICE_BYTES = 192 * 10**9
DEVICE_NAME = "192 GB, the largest single accelerator (NVIDIA B200)"
MAX_ITERATIONS = 1024
MAX_TILE = 16384
FP32 = 4


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def count_error(name: str, value: Any, limit: Optional[int] = None, why: str = "") -> Optional[str]:
    """The message for a bad integer field (None when it is fine)."""
    if not is_int(value) or value < 1:
        return f"{name}={value!r}; it must be an integer >= 1"
    if limit is not None and value > limit:
        return f"{name}={value}; at most {limit} ({why})"
    return None


def window_bytes(in_channels: int, classes: int, channels: list[int], side: int) -> int:
    """fp32 bytes of the weights (3x3 convs, about six per level between its own and its
    neighbours' channels) plus one side x side window's input, output and eight first-level maps."""
    weights = 9 * in_channels * channels[0] + channels[0] * classes
    for i, c in enumerate(channels):
        below = channels[i - 1] if i else c
        weights += 9 * c * (6 * c + 2 * below)
    activations = side * side * (in_channels + classes + 8 * channels[0])
    return FP32 * (weights + activations)


def bionet_resources_error(in_channels: int, classes: int, multiplier: float, depth: int,
                           iterations: int) -> Optional[str]:
    """The message when a BiO-Net of these fields cannot be held or run (None when it can); the
    fields' types are already checked (integers >= 1, finite multiplier > 0)."""
    msg = count_error("iterations", iterations, MAX_ITERATIONS,
                      "each iteration is a whole encoder-decoder pass; t=1024 is 200x the paper's t=5")
    if msg:
        return msg
    if depth > 60:  # 2**(depth+1) px windows: beyond any image, checked before the sums below
        return f"depth={depth}; the smallest input would be 2**{depth + 1} pixels a side; use depth 1..8"
    channels = [int(32 * 2**i * multiplier) for i in range(depth + 1)]
    need = window_bytes(in_channels, classes, channels, 2 ** (depth + 1))
    if need > DEVICE_BYTES:
        return (f"in_channels={in_channels}, classes={classes}, multiplier={multiplier}, depth={depth} need "
                f"{_gb(need)} for the weights and one smallest ({2 ** (depth + 1)} px) window, more than "
                f"{DEVICE_NAME} holds; a damaged config.json? (typical: in_channels 1-4, classes 1-10, "
                "multiplier 0.25-2, depth 3-5)")
    return None


def tile_error(tile_size: Any) -> Optional[str]:
    if tile_size is None:
        return None
    return count_error("tile_size", tile_size, MAX_TILE,
                       "one fp32 first-level feature map of a x1.0 BiO-Net at 16384 px a side is 34 GB")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3g} GB" if n < 10**15 else f"about 10**{len(str(n)) - 9} GB"


def linknet_resources_error(in_channels: int, classes: int, iterations: int) -> Optional[str]:
    """As bionet_resources_error for BiO-LinkNet (ResNet-18 widths 64..512, inputs of 32 px and up)."""
    msg = count_error("iterations", iterations, MAX_ITERATIONS,
                      "each iteration is a whole encoder-decoder pass; t=1024 is 200x the paper's t=5")
    if msg:
        return msg
    need = window_bytes(in_channels, classes, [64, 64, 128, 256, 512], 32)
    if need > DEVICE_BYTES:
        return (f"in_channels={in_channels}, classes={classes} need {_gb(need)} for the weights and one "
                f"smallest window, more than {DEVICE_NAME} holds; a damaged config.json?")
    return None
