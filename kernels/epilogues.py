"""Epilogues of the fused conv GEMMs, shared by the unsplit kernels and the split-K reductions.

One @triton.jit function per GEMM, called with the fp32 (fp64 for fp64 inputs) accumulator of one
(BLOCK_M pixels) x (BLOCK_N channels) output tile: by the GEMM kernel itself when SPLIT_K == 1, and
by the split-K reduction (kernels/splitk.py) on the fixed-order sum of the K-slice partials. Keeping
one copy means the split path applies exactly the same bias / ReLU / statistics / routing.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ._utils import round_to


@triton.jit
def fwd_epilogue(acc, pid_m, offs_n, m_mask, n_mask, b, oh, ow, bias_ptr, y_ptr, pmean_ptr, pm2_ptr,
                 M, COUT, sy_b, sy_c, sy_h, sy_w, HAS_BIAS: tl.constexpr, WANT_STATS: tl.constexpr,
                 ACC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr):
    """y = relu(acc + bias) stored at (b, :, oh, ow) in y's dtype; with WANT_STATS the tile's
    per-channel (mean, M2) of the fp32 result (before rounding) at row pid_m of pmean / pm2 (T, COUT).
    acc: (BLOCK_M, BLOCK_N); b, oh, ow, m_mask: (BLOCK_M,); offs_n, n_mask: (BLOCK_N,)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
    acc = tl.maximum(acc, 0.0)
    y_ptrs = y_ptr + (b * sy_b + oh * sy_h + ow * sy_w)[:, None] + (offs_n * sy_c)[None, :]
    tl.store(y_ptrs, round_to(acc, y_ptr.dtype.element_ty, UPCAST),
             mask=m_mask[:, None] & n_mask[None, :])

    if WANT_STATS:
        # Two-pass within the tile (mean, then squared deviations): no raw sum of squares.
        cnt = tl.minimum(M - pid_m * BLOCK_M, BLOCK_M).to(ACC)
        tmean = tl.sum(tl.where(m_mask[:, None], acc, 0.0), axis=0) / cnt
        d = tl.where(m_mask[:, None], acc - tmean[None, :], 0.0)
        tm2 = tl.sum(d * d, axis=0)
        tl.store(pmean_ptr + pid_m * COUT + offs_n, tmean, mask=n_mask)
        tl.store(pm2_ptr + pid_m * COUT + offs_n, tm2, mask=n_mask)


@triton.jit
def dgrad_epilogue(acc, pid_m, m_ok, b, h, w, n, n_ok, x1_ptr, x2_ptr, s1_ptr, s2_ptr,
                   dx1_ptr, dx2_ptr, ds_part_ptr, db_part_ptr, C1, C_IN,
                   sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w,
                   sd1_b, sd1_c, sd1_h, sd1_w, sd2_b, sd2_c, sd2_h, sd2_w,
                   HAS_X2: tl.constexpr, HAS_S1: tl.constexpr, HAS_S2: tl.constexpr,
                   UPCAST: tl.constexpr, ACC: tl.constexpr):
    """acc = dA tile (BLOCK_M pixels, BLOCK_N concatenated input channels): route columns n < C1 to
    x1's gradient, the rest to x2's (no concatenation), dx = dA * s; row pid_m of ds_part / db_part
    (T, C_IN) gets the tile's sums of dA * x and dA. acc rows past M must be zero."""
    in1 = n < C1
    in2 = n_ok & (n >= C1)
    n2 = tl.where(in2, n - C1, 0)
    m1 = m_ok[:, None] & in1[None, :]
    p1 = b[:, None] * sx1_b + n[None, :] * sx1_c + (h * sx1_h + w * sx1_w)[:, None]
    x = tl.load(x1_ptr + p1, mask=m1, other=0.0).to(ACC)
    if HAS_S1:
        s = tl.load(s1_ptr + n, mask=in1, other=0.0)
    else:
        s = tl.where(in1, 1.0, 0.0)
    if HAS_X2:
        m2 = m_ok[:, None] & in2[None, :]
        p2 = b[:, None] * sx2_b + n2[None, :] * sx2_c + (h * sx2_h + w * sx2_w)[:, None]
        x += tl.load(x2_ptr + p2, mask=m2, other=0.0).to(ACC)
        if HAS_S2:
            s += tl.load(s2_ptr + n2, mask=in2, other=0.0)
        else:
            s += tl.where(in2, 1.0, 0.0)
    dx = acc * s[None, :]
    q1 = b[:, None] * sd1_b + n[None, :] * sd1_c + (h * sd1_h + w * sd1_w)[:, None]
    tl.store(dx1_ptr + q1, round_to(dx, dx1_ptr.dtype.element_ty, UPCAST), mask=m1)
    if HAS_X2:
        q2 = b[:, None] * sd2_b + n2[None, :] * sd2_c + (h * sd2_h + w * sd2_w)[:, None]
        tl.store(dx2_ptr + q2, round_to(dx, dx2_ptr.dtype.element_ty, UPCAST), mask=m2)
    # Rows past M hold zeros (dz and x were masked), so whole-tile sums are exact partials.
    tl.store(ds_part_ptr + pid_m * C_IN + n, tl.sum(acc * x, axis=0), mask=n_ok)
    tl.store(db_part_ptr + pid_m * C_IN + n, tl.sum(acc, axis=0), mask=n_ok)
