"""Fused 3x3 convolution forward (Triton): the core of every BiO-Net block.

    y = relu(conv3x3(cat([pad0(x1*s1 + b1), pad0(x2*s2 + b2)], dim=1), weight) + bias)

as one implicit GEMM: M = B*H*W output pixels, N = Cout, K = 9*(C1+C2) looped as (tap, channel
block), first over x1's channels then over x2's. The concatenation is never materialised.

The per-channel affines (the producers' pending BatchNorms) are FOLDED, not applied to every loaded
element (which forced the input tile through registers and cost 2x on an H200):
    conv(pad0(s*x + b)) = conv_{W*s}(pad0(x)) + sum over the in-image taps of Bt[tap],
    Bt[tap, n] = sum_c W[n, c, tap] * b[c].
A small kernel (`_fold_kernel`) scales the packed weight by s and computes Bt; the main loop is then
a plain GEMM on raw x, and Bt enters as one extra K block whose A operand is the 0/1 "tap is inside
the image" mask (Bt split into hi + lo parts in the dot dtype, so it is not rounded to bf16). This is
exactly zero padding AFTER the affine: out-of-image taps contribute 0.

The epilogue adds the bias, applies ReLU, stores y (channels_last, dtype of x1) and writes per-tile
BatchNorm partial statistics (count, mean, M2) of the fp32 accumulator, i.e. BEFORE y is rounded to
bf16/fp16. The partials are merged deterministically (fixed order, Chan's formula, no atomics) by
`bn_stats.merge_partials`.

Precision: the dot runs in the input dtype (bf16/fp16 products are exact) with an fp32 accumulator;
fp32 inputs use TF32 on the GPU (as cuDNN does by default) and exact IEEE in the interpreter; fp64
(test-only) accumulates in fp64. Rounding differs from "round(x*s+b) then conv" in where it happens
(W*s is rounded instead of x*s+b), not in size.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import (acc_dtype, autotune_pinned, check_activation, check_channel_vector,
                     dot_precision, dot_upcast, is_interpreter, prune_by_shared, round_to,
                     shared_memory_limit, stats_dtype)
from .bn_stats import merge_partials

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). `_prune` clamps BLOCK_N / BLOCK_K to the
# channel counts (c0 = 32 levels, the 3-channel input), so these also cover the narrow layers;
# BLOCK_M = 64 keeps enough programs alive at the 32x32 levels (M = 2*32*32).
_GPU_CONFIGS = [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3),
    (128, 128, 32, 4, 4), (256, 64, 64, 8, 3), (128, 256, 64, 8, 3),
]
# The interpreter is slow and autotuning there pointless: one small config that still exercises
# multi-tile statistics, masked K/N edges and several channel blocks per tap.
_INTERP_CONFIG = (32, 16, 16, 4, 1)
MIN_BLOCK_M = _INTERP_CONFIG[0] if is_interpreter() else min(c[0] for c in _GPU_CONFIGS)


def _configs() -> list:
    """Autotune candidates. BIONET_FAST_AUTOTUNE=0 pins one config (fast start-up, no benchmarking
    at first call, e.g. before CUDA-graph capture or in short test runs)."""
    if is_interpreter():
        table = [_INTERP_CONFIG]
    elif autotune_pinned():
        table = [_GPU_CONFIGS[1]]
    else:
        table = _GPU_CONFIGS
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in table]


def shared_bytes(config, elem: int) -> int:
    """Shared memory of the main kernel: num_stages buffers of the A (BLOCK_M x BLOCK_K) and
    B (BLOCK_K x BLOCK_N) tiles of ``elem``-byte operands. Equals what ptxas reports for sm_90
    (bench/compile_report.py; checked in tests/test_compile_sm90.py)."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem


def _prune(configs, named_args, **kwargs):
    """Clamp BLOCK_N / BLOCK_K to the channel counts (wider blocks would be pure masked waste;
    tl.dot needs >= 16), drop the duplicates this makes, and the configs whose tiles do not fit in
    the device's shared memory (fp32 tiles are twice bf16's)."""
    n_cap = max(16, triton.next_power_of_2(named_args["COUT"]))
    k_cap = max(16, triton.next_power_of_2(max(named_args["C1"], named_args["C2"])))
    out, seen = [], set()
    for c in configs:
        kw = dict(c.kwargs, BLOCK_N=min(c.kwargs["BLOCK_N"], n_cap), BLOCK_K=min(c.kwargs["BLOCK_K"], k_cap))
        sig = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], c.num_warps, c.num_stages)
        if sig not in seen:
            seen.add(sig)
            out.append(triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages))
    x1 = named_args["x1_ptr"]
    return prune_by_shared(out, lambda c: shared_bytes(c, x1.element_size()), shared_memory_limit(x1))


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION,
                      out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _accumulate(acc, x_ptr, w_ptr, c_off, C, CIN, COUT, b, oh, ow, m_mask, offs_n, n_mask,
                H, W, sb, sc, sh, sw, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_K: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += sum over the 9 taps and C channels of one input half.

    One flat loop over (tap, channel block) so the software pipeline spans all 9 taps even when
    C fits in a single block. w_ptr is the packed weight (9, CIN, COUT); this half's channels start
    at c_off in it. Out-of-image taps load 0 (zero padding).
    """
    nk = tl.cdiv(C, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for it in range(0, 9 * nk):
        tap = it // nk
        ck = (it - tap * nk) * BLOCK_K + offs_k
        k_mask = ck < C
        ih = oh + (tap // 3 - 1)
        iw = ow + (tap % 3 - 1)
        valid = m_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a_ptrs = x_ptr + (b * sb + ih * sh + iw * sw)[:, None] + (ck * sc)[None, :]
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_ptrs = w_ptr + ((tap * CIN + c_off + ck) * COUT)[:, None] + offs_n[None, :]
        wv = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(a, wv, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _add_tap_bias(acc, bt_ptr, oh, ow, m_mask, offs_n, n_mask, H, W, COUT,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """acc += sum over in-image taps of Bt[tap] as one K=32 dot: A[m, j] = tap j%9 of pixel m is
    inside the image (j < 18: rows 0-8 hold Bt's hi part, 9-17 its lo part), B = bt (18, COUT)."""
    j = tl.arange(0, 32)
    tap = j % 9
    ih = oh[:, None] + (tap // 3 - 1)[None, :]
    iw = ow[:, None] + (tap % 3 - 1)[None, :]
    inside = (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W) & (j < 18)[None, :] & m_mask[:, None]
    bt = tl.load(bt_ptr + j[:, None] * COUT + offs_n[None, :],
                 mask=(j < 18)[:, None] & n_mask[None, :], other=0.0)
    # via fp32: Triton 3.9's interpreter mis-converts bool -> bf16
    return _dot(inside.to(tl.float32).to(bt_ptr.dtype.element_ty), bt, acc, PRECISION, UPCAST)


@triton.jit
def _conv3x3_fwd_jit(
        x1_ptr, x2_ptr, w_ptr, bt_ptr, bias_ptr, y_ptr, pmean_ptr, pm2_ptr,
        M, H, W, C1, C2, COUT, M_BUCKET,
        sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w, sy_b, sy_c, sy_h, sy_w,
        HAS_X2: tl.constexpr, TAP_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr,
        WANT_STATS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    # N-tiles of the same M-tile are adjacent program ids: they read the same input rows, which
    # then come from L2 (the whole packed weight is small enough to stay there too).
    pid = tl.program_id(0)
    num_n = tl.cdiv(COUT, BLOCK_N)
    pid_m = pid // num_n
    pid_n = pid - pid_m * num_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < COUT
    hw = H * W
    b = offs_m // hw
    r = offs_m - b * hw
    oh = r // W
    ow = r - oh * W
    cin = C1 + C2

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc = _accumulate(acc, x1_ptr, w_ptr, 0, C1, cin, COUT, b, oh, ow, m_mask, offs_n, n_mask,
                      H, W, sx1_b, sx1_c, sx1_h, sx1_w, PRECISION, UPCAST, BLOCK_K)
    if HAS_X2:
        acc = _accumulate(acc, x2_ptr, w_ptr, C1, C2, cin, COUT, b, oh, ow, m_mask, offs_n, n_mask,
                          H, W, sx2_b, sx2_c, sx2_h, sx2_w, PRECISION, UPCAST, BLOCK_K)
    if TAP_BIAS:
        acc = _add_tap_bias(acc, bt_ptr, oh, ow, m_mask, offs_n, n_mask, H, W, COUT, PRECISION, UPCAST)

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


_KEY = ["C1", "C2", "COUT", "M_BUCKET"]
_conv3x3_fwd_kernel = triton.autotune(configs=_configs(), key=_KEY,
                                      prune_configs_by={"early_config_prune": _prune})(_conv3x3_fwd_jit)
# fp64 (tests only): its tiles are twice as large, so the GPU configs can exceed shared memory.
_conv3x3_fwd_kernel_f64 = triton.autotune(
    configs=[triton.Config({"BLOCK_M": MIN_BLOCK_M if is_interpreter() else 64, "BLOCK_N": 32,
                            "BLOCK_K": 16}, num_warps=4, num_stages=1)], key=_KEY)(_conv3x3_fwd_jit)


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


def _kernel_for(dtype: torch.dtype):
    return _conv3x3_fwd_kernel_f64 if dtype == torch.float64 else _conv3x3_fwd_kernel


def conv3x3_fwd(x1: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                x2: Optional[torch.Tensor] = None, s1: Optional[torch.Tensor] = None,
                b1: Optional[torch.Tensor] = None, s2: Optional[torch.Tensor] = None,
                b2: Optional[torch.Tensor] = None, *, want_stats: bool = True,
                packed_weight: Optional[torch.Tensor] = None, folded: Optional[tuple] = None):
    """Fused conv3x3(pad 1) + bias + ReLU with BatchNorm statistics of the result.

    Args:
        x1: (B, C1, H, W), any strides (channels_last is the fast layout); fp32, bf16, fp16 (fp64 test-only).
        weight: (Cout, C1+C2, 3, 3), any dtype (cast to x1's dtype for the dot).
        bias: (Cout,) or None.
        x2: optional second half of the concatenated input, (B, C2, H, W), same dtype as x1.
        s1, b1 / s2, b2: optional (C1,) / (C2,) per-channel affine applied to x1 / x2 as loaded
            (None = identity; give both or neither).
        want_stats: compute the per-channel statistics of y.
        packed_weight: optional ``pack_weight(weight, dtype)`` to skip the repack (callers running
            one conv several times per forward pack once). Best in the weight's own dtype: with an
            affine it is folded from (fp32 keeps W*s to one rounding), without one cast to x1's dtype.
        folded: optional ``fold_affine(packed, x1.dtype, C1, s1, b1, s2, b2)`` computed earlier for
            these very affines (inference reuses it across calls); s1..b2 are then only checked.
    Returns:
        y (B, Cout, H, W) in x1's dtype, channels_last; mean (Cout,) and m2 (Cout,) (sum of squared
        deviations from the mean over B*H*W) in fp32 (fp64 for fp64 input), or None, None.
    """
    check_activation("x1", x1)
    bsz, c1, h, w = x1.shape
    c2 = 0
    if x2 is not None:
        check_activation("x2", x2)
        if x2.shape[0] != bsz or x2.shape[2:] != x1.shape[2:]:
            raise ValueError(f"x2 {tuple(x2.shape)} must match x1 {tuple(x1.shape)} in batch and "
                             f"spatial size to be concatenated along channels.")
        if x2.dtype != x1.dtype:
            raise ValueError(f"x1 is {x1.dtype} but x2 is {x2.dtype}; cast both to one dtype.")
        c2 = x2.shape[1]
    for name, s, t, c in (("s1/b1", s1, b1, c1), ("s2/b2", s2, b2, c2)):
        if (s is None) != (t is None):
            raise ValueError(f"{name}: give both the scale and the shift, or neither.")
        check_channel_vector(name, s, c, x1.device)
        check_channel_vector(name, t, c, x1.device)
    if weight.dim() != 4 or weight.shape[1] != c1 + c2 or tuple(weight.shape[2:]) != (3, 3):
        raise ValueError(f"weight {tuple(weight.shape)} must be (Cout, {c1 + c2}, 3, 3) for inputs "
                         f"with {c1} + {c2} channels.")
    cout = weight.shape[0]
    check_channel_vector("bias", bias, cout, x1.device)
    if packed_weight is not None and (tuple(packed_weight.shape) != (9, c1 + c2, cout)
                                      or not packed_weight.is_contiguous()):
        raise ValueError(f"packed_weight must be pack_weight(weight, dtype) of shape "
                         f"(9, {c1 + c2}, {cout}); got {tuple(packed_weight.shape)}.")
    has_affine = s1 is not None or (s2 is not None and x2 is not None)
    if folded is not None:
        wp, bt = _check_folded(folded, has_affine, x1.dtype, c1 + c2, cout)
    elif has_affine:  # the affine changes the weights: a fresh folded copy (one small launch)
        packed = pack_weight(weight, weight.dtype) if packed_weight is None else packed_weight
        wp, bt = fold_affine(packed, x1.dtype, c1, s1, b1, s2 if x2 is not None else None,
                             b2 if x2 is not None else None)
    else:
        wp, bt = (pack_weight(weight, x1.dtype) if packed_weight is None
                  else packed_weight.to(x1.dtype)), None

    y = torch.empty((bsz, cout, h, w), device=x1.device, dtype=x1.dtype,
                    memory_format=torch.channels_last)
    m = bsz * h * w
    sdt = stats_dtype(x1.dtype)
    t_max = triton.cdiv(m, MIN_BLOCK_M) if want_stats else 1
    pmean = torch.empty((t_max, cout), device=x1.device, dtype=sdt)
    pm2 = torch.empty_like(pmean)
    x2_ = x1 if x2 is None else x2  # dummy pointer when absent (never read: HAS_X2=False)
    dummy = pmean  # likewise for an absent bias
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]),)  # noqa: E731
    kernel = _kernel_for(x1.dtype)
    kernel[grid](
        x1, x2_, wp, wp if bt is None else bt, dummy if bias is None else bias, y, pmean, pm2,
        m, h, w, c1, c2, cout, triton.next_power_of_2(m),
        *x1.stride(), *x2_.stride(), *y.stride(),
        HAS_X2=x2 is not None, TAP_BIAS=has_affine,
        HAS_BIAS=bias is not None, WANT_STATS=want_stats, ACC=acc_dtype(x1.dtype),
        PRECISION=dot_precision(x1.dtype), UPCAST=dot_upcast(x1.dtype))
    if not want_stats:
        return y, None, None
    block_m = kernel.best_config.kwargs["BLOCK_M"]  # the config just launched
    mean, m2 = merge_partials(pmean, pm2, triton.cdiv(m, block_m), m, block_m)
    return y, mean, m2


def conv3x3_fwd_reference(x1, weight, bias, x2=None, s1=None, b1=None, s2=None, b2=None,
                          dtype: torch.dtype = torch.float64):
    """The same computation in torch, in ``dtype`` (float64 by default) for tests.

    Emulates the kernel's operand rounding: the affine is computed in fp32 (or fp64) and rounded to
    x1's dtype, the weight is rounded to x1's dtype; everything after that is exact in ``dtype``.
    Returns y (B, Cout, H, W), mean (Cout,), m2 (Cout,) of y (biased: m2 / (B*H*W) is the variance).
    """
    op = x1.dtype
    wide = torch.float64 if op == torch.float64 else torch.float32

    def affine(x, s, t):
        if s is not None:
            x = x.to(wide) * s.to(wide)[None, :, None, None] + t.to(wide)[None, :, None, None]
        return x.to(op).to(dtype)

    a = affine(x1, s1, b1)
    if x2 is not None:
        a = torch.cat([a, affine(x2, s2, b2)], dim=1)
    z = torch.nn.functional.conv2d(a, weight.to(op).to(dtype),
                                   None if bias is None else bias.to(dtype), padding=1)
    y = torch.relu(z)
    mean = y.mean(dim=(0, 2, 3))
    m2 = ((y - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
    return y, mean, m2
