"""Deterministic split-K for the fused conv GEMMs (conv_fwd, dgrad): the plan and the reductions.

Why: at BiO-Net's deep levels (batch 2, 32x32 or 16x16 pixels, 256-768 input channels) the output
has M = 512-2048 pixels, 8-64 tiles for an H200's 132 SMs, each looping over K = 9*Cin (up to 6912).
With SPLIT_K = S each output tile gets S programs (grid axis 1), program s running one contiguous
slice of the flat K loop (taps x channel blocks, x1's then x2's) and storing its fp32 partial tile
in a workspace (S, M, N). A second kernel sums the slices in a FIXED order (s = 0, 1, ..., S-1; no
atomics, so every run gives the same bits) and only then applies the epilogue of kernels/epilogues.py:
the same bias / ReLU / BatchNorm statistics of the fp32 sum (before rounding to bf16), or the
dgrad routing and ds/db partials, as the unsplit kernel.

SPLIT_K is an autotune meta-parameter (1 = the unsplit kernel). Split configs survive the prune only
where the output tiles are fewer than the SMs and every slice keeps >= MIN_SLICE_ITERS iterations of
the K loop; the autotuner's timing of a split config includes its reduction (the post_hook runs
inside the timed call). BIONET_FAST_AUTOTUNE=0 and the interpreter keep SPLIT_K=1 unless forced:
conv3x3_fwd(..., split_k=S) / conv3x3_dgrad(..., split_k=S), or BIONET_FAST_SPLIT_K=S for every call
(tests, benchmarks), launch the pinned (or interpreter) tile with SPLIT_K=S.
The weight gradient is split along its own K (pixels) already: see _bwd_utils.wgrad_split.
"""
from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from ._utils import is_interpreter
from .epilogues import dgrad_epilogue, fwd_epilogue

#: Split counts the GPU autotune tables add to some of their tiles.
SPLITS = (2, 4)
#: Fewest K-loop iterations a slice may keep: shorter slices cannot fill the software pipeline.
MIN_SLICE_ITERS = 8
#: Largest workspace (bytes) the automatic plan allocates: S * M * N fp32 partials.
WORKSPACE_CAP = 32 << 20
#: SMs of an H100 SXM / H200: the prune's assumption when the tensors are not on a GPU (bench/aot).
DEFAULT_SMS = 132
#: Rows per program of the reductions = rows per statistics / ds-db partial tile. Never below the
#: smallest BLOCK_M of the GEMM tables, so the callers' partial buffers have rows enough.
REDUCE_BLOCK_M = 32 if is_interpreter() else 64


def sm_count(t: torch.Tensor) -> int:
    """Streaming multiprocessors of t's device (DEFAULT_SMS off the GPU)."""
    if t.device.type != "cuda":
        return DEFAULT_SMS
    return torch.cuda.get_device_properties(t.device).multi_processor_count


def forced(split_k: Optional[int]) -> Optional[int]:
    """The split a caller forces: split_k, else BIONET_FAST_SPLIT_K, else None (autotuner's choice)."""
    if split_k is None:
        env = os.environ.get("BIONET_FAST_SPLIT_K", "")
        split_k = int(env) if env.strip() else None
    if split_k is not None and split_k < 1:
        raise ValueError(f"split_k must be >= 1 (1 = no split), got {split_k}; pass None to let the "
                         f"autotuner choose")
    return split_k


def configs(table, split_tiles=(), splits=SPLITS) -> list:
    """triton.Configs of (BLOCK_M, BLOCK_N, BLOCK_K, warps, stages) tuples with SPLIT_K=1, then the
    tiles of ``split_tiles`` once per split in ``splits``."""
    rows = [(c, 1) for c in table] + [(c, s) for s in splits for c in split_tiles]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "SPLIT_K": s},
                          num_warps=w, num_stages=st) for (m, n, k, w, st), s in rows]


def with_split(config: triton.Config, split: int) -> triton.Config:
    return triton.Config(dict(config.kwargs, SPLIT_K=split), num_warps=config.num_warps,
                         num_stages=config.num_stages)


def keep(config, tiles: int, k_iters: int, workspace: torch.Tensor, mn: int, sms: int) -> bool:
    """Whether the prune keeps ``config``: always when SPLIT_K == 1; a split one only when the
    workspace holds SPLIT_K * mn partials, the tiles (without split) are fewer than the SMs and
    each slice keeps MIN_SLICE_ITERS of the k_iters iterations."""
    s = config.kwargs.get("SPLIT_K", 1)
    return s == 1 or (workspace.numel() >= s * mn and tiles < sms and k_iters >= s * MIN_SLICE_ITERS)


def workspace(m: int, m_max: int, n: int, like: torch.Tensor, dtype: torch.dtype, table: list,
              split: Optional[int]) -> torch.Tensor:
    """The partial buffer (S, m, n) of a launch: for a forced split S = split; otherwise the table's
    largest split when the table has split configs, some tile count at m_max could be below the SMs
    and the buffer stays under WORKSPACE_CAP, else a 1-element dummy (the prune then drops every
    split config). m_max: largest pixel count of the autotune key's bucket, so that the decision,
    like the autotuner's cache, is the same for every m of the bucket (a cached split config
    always finds its buffer)."""
    if split is None:
        split = max(c.kwargs.get("SPLIT_K", 1) for c in table)
        elem = torch.tensor([], dtype=dtype).element_size()
        few_tiles = triton.cdiv(m_max, 128) * triton.cdiv(n, 128) < sm_count(like)
        if split == 1 or not few_tiles or split * m_max * n * elem > WORKSPACE_CAP:
            return torch.empty(1, device=like.device, dtype=dtype)
    if split * m * n >= 2**31:
        raise ValueError(f"split_k={split} needs {split * m * n} partials (int32 indexing); use a "
                         f"smaller split or batch")
    return torch.empty((split, m, n), device=like.device, dtype=dtype)


def launch(kernel, grid, args: tuple, consts: dict, forced_config: Optional[triton.Config]):
    """Launch an autotuned GEMM -> the config it ran. forced_config None: the autotuner's pick;
    else that config on the kernel's JITFunction (no tuning)."""
    if forced_config is None:
        kernel[grid](*args, **consts)
        return kernel.best_config
    kernel.fn[grid](*args, **consts, **forced_config.all_kwargs())
    return forced_config


def named(kernel, args: tuple, consts: dict, config) -> dict:
    """The argument dict an autotuner hook receives: parameters by name, constexprs, the config."""
    return {**dict(zip(kernel.arg_names, args)), **consts, **config.all_kwargs()}


def post_hook(reduce):
    """Autotuner post_hook: runs ``reduce(nargs)`` after a split config's launch while the
    autotuner benchmarks, so a split config is timed with its reduction."""
    def hook(nargs, exception=None):
        if exception is None and nargs.get("SPLIT_K", 1) > 1:
            reduce(nargs)
    return hook


def _block_n(n: int) -> int:
    return min(64, max(16, triton.next_power_of_2(n)))


@triton.jit
def _sum_splits(part_ptr, pid_m, M, N, SPLIT, ACC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The (BLOCK_M, BLOCK_N) tile (pid_m, program_id(1)) of the (SPLIT, M, N) partials summed in
    the fixed order s = 0..SPLIT-1 (bitwise repeatable); with its row and column offsets and masks."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    mask = m_mask[:, None] & n_mask[None, :]
    ptrs = part_ptr + offs_m[:, None] * N + offs_n[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC)
    for s in range(0, SPLIT):
        acc += tl.load(ptrs + s * M * N, mask=mask, other=0.0)
    return acc, offs_m, offs_n, m_mask, n_mask


@triton.jit
def _fwd_reduce_kernel(part_ptr, bias_ptr, y_ptr, pmean_ptr, pm2_ptr, M, H, W, COUT, SPLIT,
                       sy_b, sy_c, sy_h, sy_w, HAS_BIAS: tl.constexpr, WANT_STATS: tl.constexpr,
                       ACC: tl.constexpr, UPCAST: tl.constexpr, BLOCK_M: tl.constexpr,
                       BLOCK_N: tl.constexpr):
    """Sum the (SPLIT, M, COUT) partials of one tile in order s = 0..SPLIT-1, then fwd_epilogue."""
    pid_m = tl.program_id(0)
    acc, offs_m, offs_n, m_mask, n_mask = _sum_splits(part_ptr, pid_m, M, COUT, SPLIT, ACC, BLOCK_M, BLOCK_N)
    hw = H * W
    b = offs_m // hw
    r = offs_m - b * hw
    oh = r // W
    fwd_epilogue(acc, pid_m, offs_n, m_mask, n_mask, b, oh, r - oh * W, bias_ptr, y_ptr, pmean_ptr,
                 pm2_ptr, M, COUT, sy_b, sy_c, sy_h, sy_w, HAS_BIAS, WANT_STATS, ACC, UPCAST, BLOCK_M)


def reduce_fwd(a: dict) -> None:
    """Reduce conv3x3_fwd's split-K partials; ``a``: the GEMM's arguments by name (see named)."""
    m, cout = a["M"], a["COUT"]
    bn = _block_n(cout)
    _fwd_reduce_kernel[(triton.cdiv(m, REDUCE_BLOCK_M), triton.cdiv(cout, bn))](
        a["part_ptr"], a["bias_ptr"], a["y_ptr"], a["pmean_ptr"], a["pm2_ptr"], m, a["H"], a["W"],
        cout, a["SPLIT_K"], a["sy_b"], a["sy_c"], a["sy_h"], a["sy_w"], HAS_BIAS=a["HAS_BIAS"],
        WANT_STATS=a["WANT_STATS"], ACC=a["ACC"], UPCAST=a["UPCAST"], BLOCK_M=REDUCE_BLOCK_M,
        BLOCK_N=bn, num_warps=4)


@triton.jit
def _dgrad_reduce_kernel(part_ptr, x1_ptr, x2_ptr, s1_ptr, s2_ptr, dx1_ptr, dx2_ptr, ds_part_ptr,
                         db_part_ptr, H, W, M, C1, C_IN, SPLIT,
                         sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w,
                         sd1_b, sd1_c, sd1_h, sd1_w, sd2_b, sd2_c, sd2_h, sd2_w,
                         HAS_X2: tl.constexpr, HAS_S1: tl.constexpr, HAS_S2: tl.constexpr,
                         UPCAST: tl.constexpr, ACC: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr):
    """Sum the (SPLIT, M, C_IN) dA partials of one tile in order s = 0..SPLIT-1, then dgrad_epilogue."""
    pid_m = tl.program_id(0)
    acc, m, n, m_ok, n_ok = _sum_splits(part_ptr, pid_m, M, C_IN, SPLIT, ACC, BLOCK_M, BLOCK_N)
    hw = H * W
    b = (m // hw).to(tl.int64)  # int64: batch offsets of big activations pass 2**31
    r = m % hw
    dgrad_epilogue(acc, pid_m, m_ok, b, r // W, r % W, n, n_ok, x1_ptr, x2_ptr, s1_ptr, s2_ptr,
                   dx1_ptr, dx2_ptr, ds_part_ptr, db_part_ptr, C1, C_IN,
                   sx1_b, sx1_c, sx1_h, sx1_w, sx2_b, sx2_c, sx2_h, sx2_w,
                   sd1_b, sd1_c, sd1_h, sd1_w, sd2_b, sd2_c, sd2_h, sd2_w,
                   HAS_X2, HAS_S1, HAS_S2, UPCAST, ACC)


def reduce_dgrad(a: dict) -> None:
    """Reduce conv3x3_dgrad's split-K partials; ``a``: the GEMM's arguments by name (see named)."""
    m, c_in = a["M"], a["C_IN"]
    bn = _block_n(c_in)
    strides = [a[f"s{t}_{d}"] for t in ("x1", "x2", "d1", "d2") for d in "bchw"]
    _dgrad_reduce_kernel[(triton.cdiv(m, REDUCE_BLOCK_M), triton.cdiv(c_in, bn))](
        a["part_ptr"], a["x1_ptr"], a["x2_ptr"], a["s1_ptr"], a["s2_ptr"], a["dx1_ptr"], a["dx2_ptr"],
        a["ds_part_ptr"], a["db_part_ptr"], a["H"], a["W"], m, a["C1"], c_in, a["SPLIT_K"], *strides,
        HAS_X2=a["HAS_X2"], HAS_S1=a["HAS_S1"], HAS_S2=a["HAS_S2"], UPCAST=a["UPCAST"], ACC=a["ACC"],
        BLOCK_M=REDUCE_BLOCK_M, BLOCK_N=bn, num_warps=4)
