"""Padding modes of the fused 3x3 convs: zeros (the official network), reflect and replicate.

The kernels take the mode as a constexpr PAD (0 zeros, 1 reflect, 2 replicate), so the zero-padded
kernels compile to exactly what they were. A padded tap reads the input at a remapped index:
    reflect:   i < 0 -> -i,  i >= n -> 2n - 2 - i   (torch's "reflect": the edge is not repeated)
    replicate: i clamped to [0, n - 1]
Reflection needs every side >= 2 (torch refuses a pad >= the side; so does `check_pad`).

Forward and wgrad only change their load index (and every tap is "inside the image", so the folded
affine's tap bias covers all nine taps). dgrad is the adjoint: input pixel p gets the gradient of
every (output q, tap k) with pad(q + k - 1) == p. The zero-padded dgrad kernel computes the direct
terms (q + k - 1 == p); the others come from the padding ring: the gradient that the zero-padded
formula would give to the ring positions (row -1, row H, column -1, column W), folded back onto
the rows / columns they were read from. `dgrad_border_fixup` computes the ring (four 1-D
transposed convs of dz's border rows / columns) and adds it to dx, ds and db after the kernel,
so the split-K path is covered as well.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

#: mode name -> the kernels' PAD constexpr
PAD_CODES = {"zeros": 0, "reflect": 1, "replicate": 2}


def pad_code(mode: str) -> int:
    """The PAD constexpr of a padding mode ("zeros", "reflect", "replicate")."""
    if mode not in PAD_CODES:
        raise ValueError(f"padding mode {mode!r}; the fused convs pad with one of {', '.join(PAD_CODES)}")
    return PAD_CODES[mode]


def check_pad(mode: str, h: int, w: int) -> int:
    """PAD constexpr of `mode` for an (h, w) map; reflection of a side shorter than 2 is undefined
    (torch's reflect pad refuses it too), so that is a ValueError naming the fix."""
    code = pad_code(mode)
    if code == 1 and min(h, w) < 2:
        raise ValueError(f"reflect padding needs maps of at least 2x2 pixels, got {h}x{w}; torch's reflect "
                         "pad refuses it too. Use larger inputs (a BiO-Net's deepest map is the input side "
                         "/ 2**(depth+1)) or padding_mode='replicate' / 'zeros'")
    return code


@triton.jit
def pad_index(i, n, PAD: tl.constexpr):
    """Index of the input row/column a tap at i (possibly -1 or n) reads: itself for PAD 0 (the
    caller masks it), mirrored for reflect, clamped for replicate."""
    if PAD == 1:
        i = tl.where(i < 0, -i, i)
        i = tl.where(i >= n, 2 * n - 2 - i, i)
    elif PAD == 2:
        i = tl.minimum(tl.maximum(i, 0), n - 1)
    return i


def _target(mode: str, i: int, n: int) -> int:
    """Host version of pad_index for one index."""
    if mode == "reflect":
        return -i if i < 0 else (2 * n - 2 - i if i >= n else i)
    return min(max(i, 0), n - 1)


def _fold(ring: torch.Tensor, mode: str) -> torch.Tensor:
    """ring (..., n + 2), positions -1..n -> (..., n): the two outer entries added where they read."""
    n = ring.shape[-1] - 2
    out = ring[..., 1:n + 1].clone()
    out[..., _target(mode, -1, n)] += ring[..., 0]
    out[..., _target(mode, n, n)] += ring[..., n + 1]
    return out


def border_ring(dy: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, mode: str) -> list:
    """The gradient a zero-padded dgrad would give to the padding ring, folded onto the input rows /
    columns it was read from: [(dim, index, values (B, Cin, L))] for dim 2 (a row) / 3 (a column).

    Rows -1 and H take the corners (their columns -1 and W folded in); columns -1 and W the
    rest. dz = dy * (y > 0) is formed on the border rows / columns only. fp32 (fp64 for fp64)."""
    bsz, _, h, w = dy.shape
    wide = torch.float64 if dy.dtype == torch.float64 else torch.float32
    wt = weight.detach().to(wide)

    def dz(dim: int, i: int) -> torch.Tensor:
        return (dy.select(dim, i) * (y.select(dim, i) > 0)).to(wide)  # (B, Cout, L)

    # row -1 reads tap row 0 at output row 0; row H tap row 2 at output row H-1 (columns alike).
    # conv_transpose1d over the strip: position j - 1 gets sum over taps t of W[t]^T dz[j - t].
    top = F.conv_transpose1d(dz(2, 0), wt[:, :, 0, :])
    bottom = F.conv_transpose1d(dz(2, h - 1), wt[:, :, 2, :])
    left = F.conv_transpose1d(dz(3, 0), wt[:, :, :, 0])[..., 1:h + 1]
    right = F.conv_transpose1d(dz(3, w - 1), wt[:, :, :, 2])[..., 1:h + 1]
    return [(2, _target(mode, -1, h), _fold(top, mode)), (2, _target(mode, h, h), _fold(bottom, mode)),
            (3, _target(mode, -1, w), left), (3, _target(mode, w, w), right)]


def dgrad_border_fixup(dy: torch.Tensor, y: torch.Tensor, weight: torch.Tensor, mode: str,
                       halves: list, ds: torch.Tensor, db: torch.Tensor) -> None:
    """Add the folded padding ring to a zero-padded dgrad's results, in place.

    halves: [(x_k (B, C_k, H, W) raw input, s_k (C_k,) or None, dx_k like x_k)] in channel order;
    ds, db: (C1 + C2,) sums of dA * x and dA (fp32 / fp64), updated in place."""
    c0 = 0
    strips = border_ring(dy, y, weight, mode)
    for x, s, dx in halves:
        c = x.shape[1]
        for dim, i, v in strips:
            v = v[:, c0:c0 + c]
            dv = v if s is None else v * s.to(v.dtype)[None, :, None]
            row = dx.select(dim, i)
            row.copy_(row.to(dv.dtype) + dv)  # summed wide, rounded once to dx's dtype
            ds[c0:c0 + c] += (v * x.select(dim, i).to(v.dtype)).sum((0, 2)).to(ds.dtype)
            db[c0:c0 + c] += v.sum((0, 2)).to(db.dtype)
        c0 += c


def padded(a: torch.Tensor, mode: str) -> torch.Tensor:
    """a (B, C, H, W) padded by one pixel on every side with `mode` (torch semantics)."""
    return F.pad(a, (1, 1, 1, 1), mode="constant" if mode == "zeros" else mode)


def conv3x3_padded(a: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str):
    """torch's 3x3 conv of a (B, C, H, W) with one pixel of `mode` padding (references)."""
    return F.conv2d(padded(a, mode), weight, bias)
