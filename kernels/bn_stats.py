"""BatchNorm statistics in Triton: per-channel reduction, deterministic merge, finalize, eval affine.

Statistics travel as (mean, m2, count) with m2 = sum of squared deviations from the mean, never as a
raw sum of squares: over hundreds of thousands of ReLU outputs E[y^2] - E[y]^2 cancels badly in fp32.
Per-tile (count, mean, M2) partials are merged in a FIXED order (blocks of tiles combined with the
parallel-variance formula, blocks chained with Chan's update), so results are bitwise reproducible
run to run: no float atomics anywhere.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import acc_dtype, check_activation, is_interpreter, stats_dtype

# Tiles combined per step of the sequential chain, channels per merge program, and elements per
# bn_stats tile. Small under the interpreter so that tiny test tensors still span several tiles
# and several chain steps.
_MERGE_BLOCK_T = 4 if is_interpreter() else 128
_MERGE_BLOCK_C = 32
_PARTIAL_ELEMS = 1024 if is_interpreter() else 8192


@triton.jit
def _merge_kernel(pmean_ptr, pm2_ptr, mean_ptr, m2_ptr, T, C, TOTAL, ROWS,
                  BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Merge T per-tile partials (T, C) into (C,). Tile i holds min(ROWS, TOTAL - i*ROWS) rows."""
    offs_c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < C
    dt = pmean_ptr.dtype.element_ty
    run_n = tl.zeros((BLOCK_C,), dtype=dt)
    run_mean = tl.zeros((BLOCK_C,), dtype=dt)
    run_m2 = tl.zeros((BLOCK_C,), dtype=dt)
    for t0 in range(0, T, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        t_mask = offs_t < T
        cnt = tl.where(t_mask, tl.minimum(TOTAL - offs_t * ROWS, ROWS), 0).to(dt)
        mask = t_mask[:, None] & c_mask[None, :]
        idx = offs_t[:, None] * C + offs_c[None, :]
        pm = tl.load(pmean_ptr + idx, mask=mask, other=0.0)
        pm2 = tl.load(pm2_ptr + idx, mask=mask, other=0.0)
        # combine this block of tiles: exact parallel formula around the block mean
        n_b = tl.sum(cnt, axis=0)
        mean_b = tl.sum(cnt[:, None] * pm, axis=0) / n_b
        dev = tl.where(mask, pm - mean_b[None, :], 0.0)
        m2_b = tl.sum(pm2, axis=0) + tl.sum(cnt[:, None] * dev * dev, axis=0)
        # Chan's update of the running (n, mean, M2) with the block
        n_new = run_n + n_b
        delta = mean_b - run_mean
        run_mean = run_mean + delta * (n_b / n_new)
        run_m2 = run_m2 + m2_b + delta * delta * (run_n * n_b / n_new)
        run_n = n_new
    tl.store(mean_ptr + offs_c, run_mean, mask=c_mask)
    tl.store(m2_ptr + offs_c, run_m2, mask=c_mask)


def merge_partials(pmean: torch.Tensor, pm2: torch.Tensor, tiles: int, total: int, rows: int):
    """Merge per-tile statistics deterministically.

    Args:
        pmean, pm2: (>= tiles, C) contiguous per-tile means and M2s (only the first ``tiles`` rows read).
        tiles: number of tiles; total: number of rows (pixels) over all tiles; rows: rows per
            full tile (the last tile holds the remainder).
    Returns: mean (C,), m2 (C,) in pmean's dtype.
    """
    c = pmean.shape[1]
    mean = torch.empty(c, device=pmean.device, dtype=pmean.dtype)
    m2 = torch.empty_like(mean)
    _merge_kernel[(triton.cdiv(c, _MERGE_BLOCK_C),)](
        pmean, pm2, mean, m2, tiles, c, total, rows, BLOCK_T=_MERGE_BLOCK_T, BLOCK_C=_MERGE_BLOCK_C)
    return mean, m2


@triton.jit
def _partial_kernel(y_ptr, pmean_ptr, pm2_ptr, M, C, HW, W, sb, sc, sh, sw,
                    ACC: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per-tile (BLOCK_R pixels x BLOCK_C channels) mean and M2 of a strided (B, C, H, W) tensor."""
    pid_r = tl.program_id(0)
    offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    r_mask = offs_r < M
    c_mask = offs_c < C
    b = offs_r // HW
    p = offs_r - b * HW
    hh = p // W
    ww = p - hh * W
    mask = r_mask[:, None] & c_mask[None, :]
    v = tl.load(y_ptr + (b * sb + hh * sh + ww * sw)[:, None] + (offs_c * sc)[None, :],
                mask=mask, other=0.0).to(ACC)
    cnt = tl.minimum(M - pid_r * BLOCK_R, BLOCK_R).to(ACC)
    mean = tl.sum(v, axis=0) / cnt
    d = tl.where(mask, v - mean[None, :], 0.0)
    tl.store(pmean_ptr + pid_r * C + offs_c, mean, mask=c_mask)
    tl.store(pm2_ptr + pid_r * C + offs_c, tl.sum(d * d, axis=0), mask=c_mask)


def bn_stats(y: torch.Tensor):
    """Per-channel statistics of y (B, C, H, W), any strides, deterministic.

    Returns: mean (C,), m2 (C,) (sum of squared deviations; var_biased = m2 / count) in fp32
    (fp64 for fp64 y), and count = B*H*W (int).
    """
    check_activation("y", y)
    bsz, c, h, w = y.shape
    m = bsz * h * w
    # Channels-contiguous tensors read best with wide channel blocks, NCHW with wide pixel blocks.
    block_c = min(64, max(16, triton.next_power_of_2(c))) if y.stride(1) == 1 else 16
    block_r = _PARTIAL_ELEMS // block_c
    tiles = triton.cdiv(m, block_r)
    pmean = torch.empty((tiles, c), device=y.device, dtype=stats_dtype(y.dtype))
    pm2 = torch.empty_like(pmean)
    _partial_kernel[(tiles, triton.cdiv(c, block_c))](
        y, pmean, pm2, m, c, h * w, w, *y.stride(), ACC=acc_dtype(y.dtype),
        BLOCK_R=block_r, BLOCK_C=block_c)
    mean, m2 = merge_partials(pmean, pm2, tiles, m, block_r)
    return mean, m2, m


@triton.jit
def _finalize_kernel(mean_ptr, m2_ptr, gamma_ptr, beta_ptr, rm_ptr, rv_ptr, nbt_ptr,
                     scale_ptr, shift_ptr, invstd_ptr, C, count, momentum, eps,
                     HAS_AFFINE: tl.constexpr, UPDATE: tl.constexpr, CUMULATIVE: tl.constexpr,
                     BLOCK_C: tl.constexpr):
    """One program for all channels: it also owns num_batches_tracked (no cross-program race)."""
    if UPDATE:
        nbt = tl.load(nbt_ptr)
        if CUMULATIVE:  # momentum=None: cumulative moving average, factor 1/num_batches_tracked
            momentum = 1.0 / (nbt + 1).to(mean_ptr.dtype.element_ty)
    for c0 in range(0, C, BLOCK_C):
        offs = c0 + tl.arange(0, BLOCK_C)
        mask = offs < C
        mean = tl.load(mean_ptr + offs, mask=mask, other=0.0)
        m2 = tl.load(m2_ptr + offs, mask=mask, other=0.0)
        invstd = 1.0 / tl.sqrt(m2 / count + eps)
        if HAS_AFFINE:
            scale = tl.load(gamma_ptr + offs, mask=mask, other=0.0) * invstd
            shift = tl.load(beta_ptr + offs, mask=mask, other=0.0) - mean * scale
        else:
            scale = invstd
            shift = -mean * invstd
        tl.store(scale_ptr + offs, scale, mask=mask)
        tl.store(shift_ptr + offs, shift, mask=mask)
        tl.store(invstd_ptr + offs, invstd, mask=mask)
        if UPDATE:
            rm = tl.load(rm_ptr + offs, mask=mask, other=0.0)
            rv = tl.load(rv_ptr + offs, mask=mask, other=0.0)
            var_unbiased = m2 / (count - 1.0)
            tl.store(rm_ptr + offs, (rm + momentum * (mean - rm)).to(rm_ptr.dtype.element_ty), mask=mask)
            tl.store(rv_ptr + offs, (rv + momentum * (var_unbiased - rv)).to(rv_ptr.dtype.element_ty),
                     mask=mask)
    if UPDATE:
        tl.store(nbt_ptr, nbt + 1)


def bn_finalize(mean: torch.Tensor, m2: torch.Tensor, count: int, gamma: Optional[torch.Tensor],
                beta: Optional[torch.Tensor], running_mean: Optional[torch.Tensor],
                running_var: Optional[torch.Tensor], num_batches_tracked: Optional[torch.Tensor],
                momentum: Optional[float], eps: float, update_running: bool):
    """Batch statistics -> BatchNorm affine, and (optionally) the running-statistics update in place.

    Args: mean, m2 (C,) from conv3x3_fwd / bn_stats; count = B*H*W; gamma, beta (C,) or None
        (affine=False); running_mean, running_var (C,) and num_batches_tracked (int64 scalar)
        updated in place when update_running (running = (1-m)*running + m*batch with the UNBIASED
        batch variance m2/(count-1); momentum None = cumulative average, as nn.BatchNorm2d).
    Returns: scale, shift, batch_mean, invstd, each (C,) in mean's dtype;
        invstd = 1/sqrt(m2/count + eps) (biased variance, as BatchNorm normalises).
    """
    c = mean.numel()
    if count < 2 and update_running:
        raise ValueError(f"BatchNorm in training mode needs more than 1 value per channel, got "
                         f"count={count} (B*H*W); use a larger batch or image, or eval mode.")
    scale = torch.empty_like(mean)
    shift = torch.empty_like(mean)
    invstd = torch.empty_like(mean)
    has_affine = gamma is not None
    update = bool(update_running) and running_mean is not None
    _finalize_kernel[(1,)](
        mean, m2, gamma if has_affine else mean, beta if has_affine else mean,
        running_mean if update else mean, running_var if update else mean,
        num_batches_tracked if update else mean, scale, shift, invstd, c, float(count),
        0.0 if momentum is None else float(momentum), float(eps),
        HAS_AFFINE=has_affine, UPDATE=update, CUMULATIVE=update and momentum is None,
        BLOCK_C=128)
    return scale, shift, mean, invstd


@triton.jit
def _eval_affine_kernel(gamma_ptr, beta_ptr, rm_ptr, rv_ptr, scale_ptr, shift_ptr, C, eps,
                        HAS_AFFINE: tl.constexpr, BLOCK_C: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < C
    rm = tl.load(rm_ptr + offs, mask=mask, other=0.0)
    invstd = 1.0 / tl.sqrt(tl.load(rv_ptr + offs, mask=mask, other=1.0) + eps)
    if HAS_AFFINE:
        scale = tl.load(gamma_ptr + offs, mask=mask, other=0.0) * invstd
        shift = tl.load(beta_ptr + offs, mask=mask, other=0.0) - rm * scale
    else:
        scale = invstd
        shift = -rm * invstd
    tl.store(scale_ptr + offs, scale, mask=mask)
    tl.store(shift_ptr + offs, shift, mask=mask)


def bn_eval_affine(gamma: Optional[torch.Tensor], beta: Optional[torch.Tensor],
                   running_mean: torch.Tensor, running_var: torch.Tensor, eps: float):
    """Eval-mode BatchNorm as an affine: scale = gamma/sqrt(running_var+eps),
    shift = beta - running_mean*scale; (C,) each, in running_mean's dtype (one launch)."""
    c = running_mean.numel()
    scale = torch.empty_like(running_mean)
    shift = torch.empty_like(running_mean)
    has_affine = gamma is not None
    _eval_affine_kernel[(triton.cdiv(c, 256),)](
        gamma if has_affine else running_mean, beta if has_affine else running_mean,
        running_mean, running_var, scale, shift, c, float(eps), HAS_AFFINE=has_affine, BLOCK_C=256)
    return scale, shift


@triton.jit
def _affine_grad_kernel(gs_ptr, gb_ptr, mean_ptr, invstd_ptr, gamma_ptr,
                        alpha_ptr, beta_ptr, ggamma_ptr, gbeta_ptr, C, count,
                        HAS_GS: tl.constexpr, HAS_GB: tl.constexpr, HAS_GAMMA: tl.constexpr,
                        BLOCK_C: tl.constexpr):
    offs = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    mask = offs < C
    mean = tl.load(mean_ptr + offs, mask=mask, other=0.0)
    invstd = tl.load(invstd_ptr + offs, mask=mask, other=0.0)
    gs = tl.zeros_like(mean)
    gb = tl.zeros_like(mean)
    g = tl.zeros_like(mean) + 1.0
    if HAS_GS:
        gs = tl.load(gs_ptr + offs, mask=mask, other=0.0)
    if HAS_GB:
        gb = tl.load(gb_ptr + offs, mask=mask, other=0.0)
    if HAS_GAMMA:
        g = tl.load(gamma_ptr + offs, mask=mask, other=0.0)
    t = gs - gb * mean
    g_mean = -gb * g * invstd
    g_invstd = g * t
    alpha = -g_invstd * invstd * invstd * invstd / count
    tl.store(alpha_ptr + offs, alpha, mask=mask)
    tl.store(beta_ptr + offs, g_mean / count - alpha * mean, mask=mask)
    tl.store(ggamma_ptr + offs, invstd * t, mask=mask)
    tl.store(gbeta_ptr + offs, gb, mask=mask)


def bn_affine_backward(g_scale: Optional[torch.Tensor], g_shift: Optional[torch.Tensor],
                       mean: torch.Tensor, invstd: torch.Tensor, gamma: Optional[torch.Tensor],
                       count: int):
    """Backward of the batch affine scale = gamma*invstd, shift = beta - mean*scale, with mean and
    invstd = 1/sqrt(var + eps) the batch statistics of y over count = B*H*W values per channel.

    Args: g_scale, g_shift (C,) or None (zero); mean, invstd (C,) from bn_finalize; gamma (C,) or
        None (affine=False: gamma = 1).
    Returns (C,) each, in mean's dtype (one launch): alpha, beta_c such that
        dL/dy = alpha[c] * y + beta_c[c]   (the whole gradient through the statistics),
    and dL/dgamma, dL/dbeta.
    """
    c = mean.numel()
    alpha, beta_c, g_gamma, g_beta = (torch.empty_like(mean) for _ in range(4))
    _affine_grad_kernel[(triton.cdiv(c, 256),)](
        g_scale if g_scale is not None else mean, g_shift if g_shift is not None else mean, mean, invstd,
        gamma if gamma is not None else mean, alpha, beta_c, g_gamma, g_beta, c, float(count),
        HAS_GS=g_scale is not None, HAS_GB=g_shift is not None, HAS_GAMMA=gamma is not None, BLOCK_C=256)
    return alpha, beta_c, g_gamma, g_beta
