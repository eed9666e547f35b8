"""The weight side of the fused forward conv: packing, and folding the input affines into it.

    conv(pad0(s*x + b)) = conv_{W*s}(pad0(x)) + sum over the in-image taps of Bt[tap],
    Bt[tap, n] = sum_c W[n, c, tap] * b[c]
(see kernels/conv_fwd.py). `fold_affine` computes W*s and Bt in one launch of `_fold_kernel`.
Kept apart from conv_fwd.py, which re-exports pack_weight and fold_affine.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, dot_upcast, round_to


def pack_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(Cout, Cin, 3, 3) conv weight -> (9, Cin, Cout) contiguous in ``dtype``.

    The layout the kernel wants: for one tap a (BLOCK_K, BLOCK_N) tile is contiguous along Cout.
    Cheap (one copy of a small tensor); callers that run the same conv several times per forward
    (BiO-Net's iterations share weights) may pack once and pass ``packed_weight``.
    """
    if weight.dim() != 4 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight must be (Cout, Cin, 3, 3), got {tuple(weight.shape)}; "
                         f"only 3x3 convolutions are fused.")
    cout, cin = weight.shape[:2]
    return weight.detach().permute(2, 3, 1, 0).reshape(9, cin, cout).to(dtype).contiguous()


@triton.jit
def _fold_kernel(w_ptr, s1_ptr, b1_ptr, s2_ptr, b2_ptr, wp_ptr, bt_ptr, C1, CIN, COUT,
                 AFF1: tl.constexpr, AFF2: tl.constexpr, ACC: tl.constexpr, HI: tl.constexpr,
                 EMULATE_RNE: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr):
    """One (tap, Cout block): wp[tap, c, n] = w[tap, c, n] * s[c] and Bt[tap, n] = sum_c w*b,
    stored as hi (row tap) + lo (row 9 + tap) in wp's dtype. w is the packed (9, CIN, COUT)
    weight (any float dtype), so every load is coalesced along COUT."""
    tap = tl.program_id(0)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < COUT
    bt = tl.zeros((BLOCK_N,), dtype=ACC)
    for c0 in range(0, CIN, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_mask = offs_c < CIN
        first = offs_c < C1
        mask = c_mask[:, None] & n_mask[None, :]
        w = tl.load(w_ptr + (tap * CIN + offs_c)[:, None] * COUT + offs_n[None, :], mask=mask,
                    other=0.0).to(bt.dtype)
        sc = tl.zeros((BLOCK_C,), dtype=bt.dtype) + 1.0
        sh = tl.zeros((BLOCK_C,), dtype=bt.dtype)
        if AFF1:
            sc = tl.where(first, tl.load(s1_ptr + offs_c, mask=first & c_mask, other=1.0), sc)
            sh = tl.where(first, tl.load(b1_ptr + offs_c, mask=first & c_mask, other=0.0), sh)
        if AFF2:
            sc = tl.where(first, sc, tl.load(s2_ptr + offs_c - C1, mask=(~first) & c_mask, other=1.0))
            sh = tl.where(first, sh, tl.load(b2_ptr + offs_c - C1, mask=(~first) & c_mask, other=0.0))
        tl.store(wp_ptr + (tap * CIN + offs_c)[:, None] * COUT + offs_n[None, :],
                 round_to(w * sc[:, None], wp_ptr.dtype.element_ty, EMULATE_RNE), mask=mask)
        bt += tl.sum(w * sh[:, None], axis=0)
    hi = bt.to(HI).to(wp_ptr.dtype.element_ty)
    lo = (bt - hi.to(bt.dtype)).to(wp_ptr.dtype.element_ty)
    tl.store(bt_ptr + tap * COUT + offs_n, hi, mask=n_mask)
    tl.store(bt_ptr + (9 + tap) * COUT + offs_n, lo, mask=n_mask)


def fold_affine(packed: torch.Tensor, dtype: torch.dtype, c1: int, s1=None, b1=None, s2=None,
                b2=None):
    """Fold the input affines into the weight (one launch).

    Args: packed = pack_weight(weight, any float dtype) (9, Cin, Cout); pack it in the weight's own
        dtype (fp32) so that W*s is rounded only once; c1 = channels of the first half.
    Returns wp (9, Cin, Cout) in ``dtype`` = packed * s[c], and bt (18, Cout) in ``dtype``:
    rows 0-8 the hi part, rows 9-17 the lo part of Bt[tap, n] = sum_c packed[tap, c, n] * b[c].
    """
    _, cin, cout = packed.shape
    wp = torch.empty((9, cin, cout), device=packed.device, dtype=dtype)
    bt = torch.empty((18, cout), device=packed.device, dtype=dtype)
    hi = {torch.float64: tl.float64, torch.float16: tl.float16}.get(dtype, tl.bfloat16)
    block_n = min(64, max(16, triton.next_power_of_2(cout)))
    dummy = packed
    _fold_kernel[(9, triton.cdiv(cout, block_n))](
        packed, s1 if s1 is not None else dummy, b1 if b1 is not None else dummy,
        s2 if s2 is not None else dummy, b2 if b2 is not None else dummy, wp, bt, c1, cin, cout,
        AFF1=s1 is not None, AFF2=s2 is not None, ACC=acc_dtype(dtype), HI=hi,
        EMULATE_RNE=dot_upcast(dtype), BLOCK_C=32,
        BLOCK_N=block_n)
    return wp, bt


def _check_folded(folded, has_affine: bool, dtype: torch.dtype, cin: int, cout: int):
    """Validate a precomputed fold_affine result: (wp (9, cin, cout), bt (18, cout)) in ``dtype``."""
    if not has_affine:
        raise ValueError("folded= was given without an input affine; pass packed_weight instead.")
    wp, bt = folded
    if (tuple(wp.shape) != (9, cin, cout) or tuple(bt.shape) != (18, cout) or wp.dtype != dtype
            or bt.dtype != dtype or not (wp.is_contiguous() and bt.is_contiguous())):
        raise ValueError(f"folded must be fold_affine(...) for (9, {cin}, {cout}) in {dtype}; got "
                         f"{tuple(wp.shape)} {wp.dtype} and {tuple(bt.shape)} {bt.dtype}.")
    return wp, bt
