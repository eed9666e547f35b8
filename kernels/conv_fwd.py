"""Fused 3x3 convolution forward (Triton): the core of every BiO-Net block.

    y = relu(conv3x3(cat([pad0(x1*s1 + b1), pad0(x2*s2 + b2)], dim=1), weight) + bias)

as one implicit GEMM: M = B*H*W output pixels, N = Cout, K = 9*(C1+C2) looped as (tap, channel
block), first over x1's channels then over x2's. The concatenation is never materialised.

The per-channel affines (the producers' pending BatchNorms) are FOLDED, not applied to every loaded
element (which forced the input tile through registers and cost 2x on an H200):
    conv(pad0(s*x + b)) = conv_{W*s}(pad0(x)) + sum over the in-image taps of Bt[tap],
    Bt[tap, n] = sum_c W[n, c, tap] * b[c].
A small kernel (`_fold_kernel`, kernels/fold.py) scales the packed weight by s and computes Bt; the
main loop is then a plain GEMM on raw x, and Bt enters as one extra K block whose A operand is the 0/1 "tap is inside
the image" mask (Bt split into hi + lo parts in the dot dtype, so it is not rounded to bf16). This is
exactly zero padding AFTER the affine: out-of-image taps contribute 0.

The epilogue adds the bias, applies ReLU, stores y (channels_last, dtype of x1) and writes per-tile
BatchNorm partial statistics (count, mean, M2) of the fp32 accumulator, i.e. BEFORE y is rounded to
bf16/fp16. The partials are merged deterministically (fixed order, Chan's formula, no atomics) by
`bn_stats.merge_partials`.

Split-K (kernels/splitk.py): where output tiles are fewer than SMs (the deep levels), the autotuner
may pick SPLIT_K > 1: each program then runs one slice of the K loop and stores an fp32 partial;
`splitk.reduce_fwd` sums them in a fixed order and applies the same epilogue (kernels/epilogues.py).

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

from . import splitk
from ._utils import (acc_dtype, autotune_pinned, check_activation, check_channel_vector,
                     dot_precision, dot_upcast, is_interpreter, prune_by_shared,
                     shared_memory_limit, stats_dtype)
from .bn_stats import merge_partials
from .epilogues import fwd_epilogue
from .fold import _check_folded, _fold_kernel, fold_affine, pack_weight  # noqa: F401 (re-exported)
from .padding import check_pad, conv3x3_padded, pad_index

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). `_prune` clamps BLOCK_N / BLOCK_K to the
# channel counts (c0 = 32 levels, the 3-channel input), so these also cover the narrow layers;
# BLOCK_M = 64 keeps enough programs alive at the 32x32 levels (M = 2*32*32).
_GPU_CONFIGS = [
    (128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 128, 64, 4, 3), (64, 64, 64, 4, 3),
    (128, 128, 32, 4, 4), (256, 64, 64, 8, 3), (128, 256, 64, 8, 3),
]
# Tiles also tried with SPLIT_K in splitk.SPLITS (deterministic split-K, kernels/splitk.py), where
# output tiles are fewer than SMs: the deep levels (512+256 -> 256 at 32x32: 16-64 tiles).
_SPLIT_TILES = [(128, 128, 64, 8, 3), (128, 64, 64, 4, 3), (64, 64, 64, 4, 3)]
# The interpreter is slow and autotuning there pointless: one small config that still exercises
# multi-tile statistics, masked K/N edges and several channel blocks per tap.
_INTERP_CONFIG = (32, 16, 16, 4, 1)
MIN_BLOCK_M = _INTERP_CONFIG[0] if is_interpreter() else min(c[0] for c in _GPU_CONFIGS)


def _configs() -> list:
    """Autotune candidates (SPLIT_K=1 unless listed in _SPLIT_TILES). BIONET_FAST_AUTOTUNE=0 pins
    one unsplit config (fast start-up, no benchmarking at first call, e.g. before CUDA-graph
    capture or in short test runs)."""
    if is_interpreter():
        return splitk.configs([_INTERP_CONFIG])
    if autotune_pinned():
        return splitk.configs([_GPU_CONFIGS[1]])
    return splitk.configs(_GPU_CONFIGS, _SPLIT_TILES)


def shared_bytes(config, elem: int) -> int:
    """Shared memory of the main kernel: num_stages buffers of the A (BLOCK_M x BLOCK_K) and
    B (BLOCK_K x BLOCK_N) tiles of ``elem``-byte operands. Equals what ptxas reports for sm_90
    (bench/compile_report.py; checked in tests/test_compile_sm90.py)."""
    kw = config.kwargs
    return config.num_stages * (kw["BLOCK_M"] * kw["BLOCK_K"] + kw["BLOCK_K"] * kw["BLOCK_N"]) * elem


def _clamp(c, cout: int, c1: int, c2: int):
    """c with BLOCK_N / BLOCK_K clamped to the channel counts (wider blocks would be pure masked
    waste; tl.dot needs >= 16)."""
    n_cap = max(16, triton.next_power_of_2(cout))
    k_cap = max(16, triton.next_power_of_2(max(c1, c2)))
    kw = dict(c.kwargs, BLOCK_N=min(c.kwargs["BLOCK_N"], n_cap), BLOCK_K=min(c.kwargs["BLOCK_K"], k_cap))
    return triton.Config(kw, num_warps=c.num_warps, num_stages=c.num_stages)


def _prune(configs, named_args, **kwargs):
    """Clamp BLOCK_N / BLOCK_K to the channel counts, drop the duplicates this makes, the split-K
    configs where they do not pay (splitk.keep: tiles already >= SMs, short K loop, no workspace),
    and the configs whose tiles do not fit in the device's shared memory (fp32 tiles are twice
    bf16's)."""
    a = named_args
    x1, m, cout = a["x1_ptr"], a["M"], a["COUT"]
    out, seen = [], set()
    for c in configs:
        c = _clamp(c, cout, a["C1"], a["C2"])
        kw = c.kwargs
        sig = (kw["BLOCK_M"], kw["BLOCK_N"], kw["BLOCK_K"], kw["SPLIT_K"], c.num_warps, c.num_stages)
        tiles = triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(cout, kw["BLOCK_N"])
        k_iters = 9 * (triton.cdiv(a["C1"], kw["BLOCK_K"]) + triton.cdiv(a["C2"], kw["BLOCK_K"]))
        if sig not in seen and splitk.keep(c, tiles, k_iters, a["part_ptr"], m * cout, splitk.sm_count(x1)):
            seen.add(sig)
            out.append(c)
    return prune_by_shared(out, lambda c: shared_bytes(c, x1.element_size()), shared_memory_limit(x1))


@triton.jit
def _dot(a, b, acc, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision=PRECISION,
                      out_dtype=acc.dtype)
    return tl.dot(a, b, acc, input_precision=PRECISION, out_dtype=acc.dtype)


@triton.jit
def _accumulate(acc, x_ptr, w_ptr, c_off, C, CIN, COUT, b, oh, ow, m_mask, offs_n, n_mask,
                H, W, sb, sc, sh, sw, it_lo, it_hi, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_K: tl.constexpr, PAD: tl.constexpr):
    """acc (BLOCK_M, BLOCK_N) += sum over iterations [it_lo, it_hi) of the 9 taps x C channels of
    one input half (all of them: 0, 9 * cdiv(C, BLOCK_K); a split-K slice: part of them).

    One flat loop over (tap, channel block) so the software pipeline spans all 9 taps even when
    C fits in a single block. w_ptr is the packed weight (9, CIN, COUT); this half's channels start
    at c_off in it. Out-of-image taps load 0 (PAD 0, zero padding) or the pixel they mirror /
    clamp to (PAD 1 reflect / 2 replicate, kernels/padding.py).
    """
    nk = tl.cdiv(C, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for it in range(it_lo, it_hi):
        tap = it // nk
        ck = (it - tap * nk) * BLOCK_K + offs_k
        k_mask = ck < C
        ih = oh + (tap // 3 - 1)
        iw = ow + (tap % 3 - 1)
        valid = m_mask
        if PAD == 0:
            valid = valid & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        ih = pad_index(ih, H, PAD)
        iw = pad_index(iw, W, PAD)
        a_ptrs = x_ptr + (b * sb + ih * sh + iw * sw)[:, None] + (ck * sc)[None, :]
        a = tl.load(a_ptrs, mask=valid[:, None] & k_mask[None, :], other=0.0)
        w_ptrs = w_ptr + ((tap * CIN + c_off + ck) * COUT)[:, None] + offs_n[None, :]
        wv = tl.load(w_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        acc = _dot(a, wv, acc, PRECISION, UPCAST)
    return acc


@triton.jit
def _add_tap_bias(acc, bt_ptr, oh, ow, m_mask, offs_n, n_mask, H, W, COUT,
                  PRECISION: tl.constexpr, UPCAST: tl.constexpr, PAD: tl.constexpr):
    """acc += sum over in-image taps of Bt[tap] as one K=32 dot: A[m, j] = tap j%9 of pixel m is
    inside the image (j < 18: rows 0-8 hold Bt's hi part, 9-17 its lo part), B = bt (18, COUT).
    Reflect / replicate padding pads AFTER the affine too, but every tap then reads an affine
    pixel: all nine taps count."""
    j = tl.arange(0, 32)
    inside = (j < 18)[None, :] & m_mask[:, None]
    if PAD == 0:
        tap = j % 9
        ih = oh[:, None] + (tap // 3 - 1)[None, :]
        iw = ow[:, None] + (tap % 3 - 1)[None, :]
        inside = inside & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
    bt = tl.load(bt_ptr + j[:, None] * COUT + offs_n[None, :],
                 mask=(j < 18)[:, None] & n_mask[None, :], other=0.0)
    # via fp32: Triton 3.9's interpreter mis-converts bool -> bf16
    return _dot(inside.to(tl.float32).to(bt_ptr.dtype.element_ty), bt, acc, PRECISION, UPCAST)


@triton.jit
def _conv3x3_fwd_jit(
        x1_ptr, x2_ptr, w_ptr, bt_ptr, bias_ptr, y_ptr, pmean_ptr, pm2_ptr, part_ptr,
        M, H, W, C1, C2, COUT, M_BUCKET,
        sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w, sy_b, sy_c, sy_h, sy_w,
        HAS_X2: tl.constexpr, TAP_BIAS: tl.constexpr, HAS_BIAS: tl.constexpr, PAD: tl.constexpr,
        WANT_STATS: tl.constexpr, ACC: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
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

    # K loop bounds per half: all of it, or (SPLIT_K > 1) this program's slice of the flat loop
    # over x1's then x2's (tap, channel block) iterations. x2's bounds are computed after x1's loop
    # (fewer live registers in it).
    t1 = 9 * tl.cdiv(C1, BLOCK_K)
    lo1, hi1 = 0, t1
    if SPLIT_K > 1:
        per = tl.cdiv(t1 + (9 * tl.cdiv(C2, BLOCK_K) if HAS_X2 else 0), SPLIT_K)
        lo = tl.program_id(1) * per
        lo1, hi1 = tl.minimum(lo, t1), tl.minimum(lo + per, t1)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    acc = _accumulate(acc, x1_ptr, w_ptr, 0, C1, cin, COUT, b, oh, ow, m_mask, offs_n, n_mask,
                      H, W, sx1_b, sx1_c, sx1_h, sx1_w, lo1, hi1, PRECISION, UPCAST, BLOCK_K, PAD)
    if HAS_X2:
        lo2, hi2 = 0, 9 * tl.cdiv(C2, BLOCK_K)
        if SPLIT_K > 1:
            lo2, hi2 = tl.maximum(lo - t1, 0), tl.minimum(tl.maximum(lo + per - t1, 0), hi2)
        acc = _accumulate(acc, x2_ptr, w_ptr, C1, C2, cin, COUT, b, oh, ow, m_mask, offs_n, n_mask,
                          H, W, sx2_b, sx2_c, sx2_h, sx2_w, lo2, hi2, PRECISION, UPCAST, BLOCK_K, PAD)
    if TAP_BIAS:
        if SPLIT_K == 1:
            acc = _add_tap_bias(acc, bt_ptr, oh, ow, m_mask, offs_n, n_mask, H, W, COUT, PRECISION, UPCAST, PAD)
        elif tl.program_id(1) == SPLIT_K - 1:  # one slice adds the folded shift (the last: shortest)
            acc = _add_tap_bias(acc, bt_ptr, oh, ow, m_mask, offs_n, n_mask, H, W, COUT, PRECISION, UPCAST, PAD)

    if SPLIT_K == 1:
        fwd_epilogue(acc, pid_m, offs_n, m_mask, n_mask, b, oh, ow, bias_ptr, y_ptr, pmean_ptr, pm2_ptr,
                     M, COUT, sy_b, sy_c, sy_h, sy_w, HAS_BIAS, WANT_STATS, ACC, UPCAST, BLOCK_M)
    else:  # fp32 partial of this slice; splitk.reduce_fwd sums the slices, then the epilogue
        part = part_ptr + tl.program_id(1) * M * COUT
        tl.store(part + offs_m[:, None] * COUT + offs_n[None, :], acc,
                 mask=m_mask[:, None] & n_mask[None, :])


_KEY = ["C1", "C2", "COUT", "M_BUCKET"]
_conv3x3_fwd_kernel = triton.autotune(configs=_configs(), key=_KEY,
                                      prune_configs_by={"early_config_prune": _prune},
                                      post_hook=splitk.post_hook(splitk.reduce_fwd))(_conv3x3_fwd_jit)
# fp64 (tests only): its tiles are twice as large, so the GPU configs can exceed shared memory.
_conv3x3_fwd_kernel_f64 = triton.autotune(
    configs=splitk.configs([(MIN_BLOCK_M if is_interpreter() else 64, 32, 16, 4, 1)]),
    key=_KEY)(_conv3x3_fwd_jit)


def _kernel_for(dtype: torch.dtype):
    return _conv3x3_fwd_kernel_f64 if dtype == torch.float64 else _conv3x3_fwd_kernel


def _base_config(kernel) -> triton.Config:
    """The tile a forced split runs on: the pinned GPU config, or the kernel's only one
    (interpreter, fp64)."""
    if len(kernel.configs) == 1:
        return kernel.configs[0]
    return splitk.configs([_GPU_CONFIGS[1]])[0]


def conv3x3_fwd(x1: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                x2: Optional[torch.Tensor] = None, s1: Optional[torch.Tensor] = None,
                b1: Optional[torch.Tensor] = None, s2: Optional[torch.Tensor] = None,
                b2: Optional[torch.Tensor] = None, *, want_stats: bool = True,
                packed_weight: Optional[torch.Tensor] = None, folded: Optional[tuple] = None,
                split_k: Optional[int] = None, pad: str = "zeros"):
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
        split_k: force a deterministic split-K into this many K slices (kernels/splitk.py) on the
            pinned tile (tests, benchmarks); None = BIONET_FAST_SPLIT_K if set, else the autotuner's
            choice (split configs only where output tiles are fewer than SMs; never when pinned).
        pad: how the one-pixel border is filled, after the affine: "zeros", "reflect" (sides >= 2)
            or "replicate" (kernels/padding.py).
    Returns:
        y (B, Cout, H, W) in x1's dtype, channels_last; mean (Cout,) and m2 (Cout,) (sum of squared
        deviations from the mean over B*H*W) in fp32 (fp64 for fp64 input), or None, None.
    """
    check_activation("x1", x1)
    bsz, c1, h, w = x1.shape
    pad_c = check_pad(pad, h, w)
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
    kernel, split = _kernel_for(x1.dtype), splitk.forced(split_k)
    m_bucket = triton.next_power_of_2(m)
    part = splitk.workspace(m, m_bucket, cout, x1, sdt, kernel.configs, split)
    args = (x1, x2_, wp, wp if bt is None else bt, dummy if bias is None else bias, y, pmean, pm2,
            part, m, h, w, c1, c2, cout, m_bucket, *x1.stride(), *x2_.stride(), *y.stride())
    consts = dict(HAS_X2=x2 is not None, TAP_BIAS=has_affine, HAS_BIAS=bias is not None, PAD=pad_c,
                  WANT_STATS=want_stats, ACC=acc_dtype(x1.dtype), PRECISION=dot_precision(x1.dtype),
                  UPCAST=dot_upcast(x1.dtype))
    grid = lambda meta: (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]),  # noqa: E731
                         meta["SPLIT_K"])
    forced = None if split is None else splitk.with_split(_clamp(_base_config(kernel), cout, c1, c2), split)
    config = splitk.launch(kernel, grid, args, consts, forced)
    rows = config.kwargs["BLOCK_M"]  # rows per statistics tile of the config just launched
    if config.kwargs["SPLIT_K"] > 1:  # sum the slices in fixed order, then bias, ReLU, statistics
        splitk.reduce_fwd(splitk.named(kernel, args, consts, config))
        rows = splitk.REDUCE_BLOCK_M
    if not want_stats:
        return y, None, None
    mean, m2 = merge_partials(pmean, pm2, triton.cdiv(m, rows), m, rows)
    return y, mean, m2


def conv3x3_fwd_reference(x1, weight, bias, x2=None, s1=None, b1=None, s2=None, b2=None,
                          dtype: torch.dtype = torch.float64, pad: str = "zeros"):
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
    z = conv3x3_padded(a, weight.to(op).to(dtype), None if bias is None else bias.to(dtype), pad)
    y = torch.relu(z)
    mean = y.mean(dim=(0, 2, 3))
    m2 = ((y - mean[None, :, None, None]) ** 2).sum(dim=(0, 2, 3))
    return y, mean, m2
