"""Host-side helpers for the fused 3x3-conv backward kernels (kernels/conv_bwd.py).

Kept apart from the kernels so conv_bwd.py stays readable: autotune configurations, the
deterministic split-K plan of the weight gradient, and argument validation with errors that
name the problem and the fix.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import splitk
from ._utils import (autotune_pinned, dot_precision, dot_upcast, is_interpreter, prune_by_shared,
                     shared_memory_limit)

# The interpreter runs every program in numpy: one small config keeps the CPU tests fast.
INTERPRET = is_interpreter()
# The weight-gradient pixel chunks are multiples of this, so every BLOCK_K divides them.
CHUNK_ALIGN = 32 if INTERPRET else 128
DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulator / gradient-statistics dtype: fp64 for fp64 inputs (gradcheck), else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def dot_meta(dtype: torch.dtype) -> dict:
    """Constexprs of the GEMM for operands of `dtype`: precision (TF32 for fp32 on the GPU, like
    cuDNN's default; IEEE in the interpreter and for fp64), interpreter upcast, accumulator."""
    return dict(DOT_PREC=dot_precision(dtype), UPCAST=dot_upcast(dtype),
                ACC=tl.float64 if dtype == torch.float64 else tl.float32)


def _cfg(bm: int, bn: int, bk: int, warps: int, stages: int) -> triton.Config:
    return triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk},
                         num_warps=warps, num_stages=stages)


_DGRAD_INTERP = (32, 16, 16, 4, 1)
_DGRAD_PINNED = (64, 64, 64, 4, 4)  # no spills on sm_90 in bf16/fp16/fp32 (bench/compile_report.py)
# Tiles the tuned table also tries with SPLIT_K in splitk.SPLITS (where output tiles < SMs).
_DGRAD_SPLIT_TILES = [(64, 64, 64, 4, 4), (128, 64, 64, 4, 3), (128, 128, 64, 8, 3)]


def dgrad_configs() -> list:
    """Tiles of the input-gradient GEMM: M = pixels, N = Cin, K = Cout (per tap); SPLIT_K = 1
    except the split-K variants of the tuned table (kernels/splitk.py)."""
    if INTERPRET:
        return splitk.configs([_DGRAD_INTERP])
    if autotune_pinned():
        return splitk.configs([_DGRAD_PINNED])
    return splitk.configs([
        (128, 64, 32, 4, 4), (128, 64, 64, 4, 3), (128, 128, 32, 8, 3), (128, 128, 64, 8, 3),
        (64, 64, 64, 4, 4), (128, 32, 32, 4, 4), (64, 128, 32, 4, 4)], _DGRAD_SPLIT_TILES)


def dgrad_base_config(c_out: int, c_in: int) -> triton.Config:
    """The tile a forced split runs on: the pinned (interpreter: the only) config, its blocks
    clamped to the channels as the prune would."""
    m, n, k, w, s = _DGRAD_INTERP if INTERPRET else _DGRAD_PINNED
    cap = lambda b, dim: min(b, max(16, triton.next_power_of_2(dim)))  # noqa: E731
    return splitk.configs([(m, cap(n, c_in), cap(k, c_out), w, s)])[0]


def wgrad_configs() -> list:
    """Tiles of the weight-gradient GEMM: M = Cout, N = Cin (per tap), K = pixels."""
    if INTERPRET:
        return [_cfg(16, 16, 32, 4, 1)]
    if autotune_pinned():  # wgmma, no spills in bf16/fp16 on sm_90 (fp32 with two inputs: 28 B)
        return [_cfg(128, 64, 64, 8, 3)]
    return [_cfg(*c) for c in [
        (64, 64, 64, 4, 3), (64, 64, 128, 4, 3), (128, 64, 64, 8, 3), (128, 128, 64, 8, 3),
        (32, 64, 128, 4, 4), (32, 32, 128, 4, 4), (64, 128, 64, 4, 3)]]


def _fits(block: int, dim: int) -> bool:
    """A block wider than the next power of two of its dimension only multiplies masked zeros."""
    return block <= max(16, triton.next_power_of_2(dim))


def dgrad_shared_bytes(config, elem: int) -> int:
    """Shared memory of _dgrad_kernel: (stages - 1) buffers of the dy and y tiles (BLOCK_M x
    BLOCK_K each) and the weight tile (BLOCK_K x BLOCK_N), plus one weight tile for the dot.
    Fitted to ptxas' sm_90 numbers (bench/compile_report.py), exact for every table config."""
    m, n, k = (config.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return ((config.num_stages - 1) * (2 * m * k + k * n) + k * n) * elem


def wgrad_shared_bytes(config, elem: int, inputs: int = 2) -> int:
    """Shared memory of _wgrad_kernel: (stages - 1) buffers of the dy and y tiles (BLOCK_K x
    BLOCK_M each) and of one BLOCK_K x BLOCK_N tile per input half, plus the affine-applied
    operand of the dot. Fitted to ptxas' sm_90 numbers, exact for every table config."""
    m, n, k = (config.kwargs[b] for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    return ((config.num_stages - 1) * (2 * k * m + inputs * k * n) + k * n) * elem


def prune_dgrad(configs, named_args, **kwargs):
    """Drop blocks wider than the channels, split-K configs where they do not pay (splitk.keep:
    tiles already >= SMs, short K loop, no workspace), and what does not fit in shared memory."""
    a = named_args
    dy, m, c_in = a["dy_ptr"], a["M"], a["C_IN"]

    def split_ok(c):
        kw = c.kwargs
        tiles = triton.cdiv(m, kw["BLOCK_M"]) * triton.cdiv(c_in, kw["BLOCK_N"])
        k_iters = 9 * triton.cdiv(a["C_OUT"], kw["BLOCK_K"])
        return splitk.keep(c, tiles, k_iters, a["part_ptr"], m * c_in, splitk.sm_count(dy))

    keep = [c for c in configs if _fits(c.kwargs["BLOCK_N"], c_in)
            and _fits(c.kwargs["BLOCK_K"], a["C_OUT"]) and split_ok(c)] or configs[:1]
    return prune_by_shared(keep, lambda c: dgrad_shared_bytes(c, dy.element_size()), shared_memory_limit(dy))


def prune_wgrad(configs, named_args, **kwargs):
    keep = [c for c in configs if _fits(c.kwargs["BLOCK_M"], named_args["C_OUT"])
            and _fits(c.kwargs["BLOCK_N"], named_args["C_IN"])] or configs[:1]
    dy = named_args["dy_ptr"]
    inputs = 2 if kwargs.get("HAS_X2", named_args.get("HAS_X2", True)) else 1
    return prune_by_shared(keep, lambda c: wgrad_shared_bytes(c, dy.element_size(), inputs),
                           shared_memory_limit(dy))


def size_bucket(n: int) -> int:
    """Autotune key for a pixel count: its power-of-two family (256x256 and 250x250 tune alike)."""
    return max(1, int(n)).bit_length()


def wgrad_split(pixels: int, c_out: int, c_in: int, device: torch.device,
                split_k: Optional[int] = None) -> tuple[int, int]:
    """Deterministic split-K plan for the weight gradient -> (splits, chunk).

    Each of `splits` programs along the split axis reduces `chunk` consecutive pixels (a
    multiple of CHUNK_ALIGN, the last one shorter). The plan depends only on the shape and the
    device, never on the autotuned tile, so the partial buffer can be allocated before launch and
    the fixed-order sum over it gives the same bits on every call.
    """
    if split_k is None:
        tiles = triton.cdiv(c_out, 64) * 9 * triton.cdiv(c_in, 64)
        sms = (torch.cuda.get_device_properties(device).multi_processor_count
               if device.type == "cuda" else 4)
        split_k = triton.cdiv(4 * sms, tiles)  # about 4 waves of programs
        # Keep the fp32 partials under ~64 MiB and every chunk at least 4 aligned blocks long.
        split_k = min(split_k, max(1, (16 << 20) // (c_out * 9 * c_in)))
        split_k = min(split_k, max(1, pixels // (4 * CHUNK_ALIGN)))
    if split_k < 1:
        raise ValueError(f"split_k must be >= 1, got {split_k}; pass None for the automatic plan")
    chunk = triton.cdiv(triton.cdiv(pixels, split_k), CHUNK_ALIGN) * CHUNK_ALIGN
    return triton.cdiv(pixels, chunk), chunk


def check_device(*tensors: Optional[torch.Tensor]) -> None:
    ts = [t for t in tensors if t is not None]
    devs = {t.device for t in ts}
    if len(devs) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devs))}; "
                         "move them with .to(device)")
    dev = devs.pop()
    if dev.type != "cuda" and not INTERPRET:
        raise ValueError(f"Triton conv backward needs CUDA tensors, got {dev}; use the reference "
                         "backend on CPU or set TRITON_INTERPRET=1 before importing triton")
    for t in ts:
        if t.dtype not in DTYPES:
            raise ValueError(f"expected float32/bfloat16/float16 (or float64) tensors, got "
                             f"{t.dtype}; cast with .float()")


def check_pair(dy: torch.Tensor, y: torch.Tensor) -> tuple[int, int, int, int]:
    """dy and y: (B, Cout, H, W) -> (B, Cout, H, W)."""
    if dy.dim() != 4 or dy.shape != y.shape:
        raise ValueError(f"dy and y must both be (B, Cout, H, W), got {tuple(dy.shape)} and "
                         f"{tuple(y.shape)}; pass the block's ReLU output y and its gradient dy")
    return tuple(dy.shape)


def check_input(name: str, x: torch.Tensor, b: int, h: int, w: int,
                channels: Optional[int] = None) -> int:
    """x: (B, C, H, W) matching the output's batch and size -> C."""
    if x.dim() != 4 or x.shape[0] != b or x.shape[2:] != (h, w):
        raise ValueError(f"{name} must be (B={b}, C, H={h}, W={w}) like dy, got {tuple(x.shape)}; "
                         "pass the block input the forward used (3x3 conv, padding 1, stride 1)")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} must have {channels} channels (weight in-channels minus c1), "
                         f"got {x.shape[1]}; check c1 and the concatenation order")
    return x.shape[1]


def check_affine(name: str, v: Optional[torch.Tensor], channels: int) -> None:
    if v is not None and (v.dim() != 1 or v.numel() != channels):
        raise ValueError(f"{name} must be a 1-D tensor of {channels} per-channel values, got "
                         f"shape {tuple(v.shape)}; pass the Pending activation's scale/shift")


def check_weight(weight: torch.Tensor, c_out: int) -> int:
    """weight: (Cout, Cin, 3, 3) -> Cin."""
    if weight.dim() != 4 or weight.shape[0] != c_out or weight.shape[2:] != (3, 3):
        raise ValueError(f"weight must be (Cout={c_out}, Cin, 3, 3), got {tuple(weight.shape)}; "
                         "only 3x3 convolutions with padding 1 are fused")
    return weight.shape[1]


def affine_or_dummy(v: Optional[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
    """Contiguous per-channel vector in the accumulator dtype of `like`, or a 1-element
    placeholder the kernel never reads."""
    dtype = acc_dtype(like.dtype)
    if v is None:
        return torch.empty(1, device=like.device, dtype=dtype)
    return v.detach().to(dtype).contiguous()
