"""Small helpers shared by the Triton kernels (no kernels here).

Why a module of its own: the interpreter switch (``TRITON_INTERPRET=1``) changes which autotune
configs exist and which dot precision is used, and every kernel file must agree on it.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

#: dtypes the fused kernels accept for activations. float64 is a test-only path (interpreter and
#: gradient checks): it accumulates in float64 so comparisons against torch are exact.
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def is_interpreter() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def autotune_pinned() -> bool:
    """BIONET_FAST_AUTOTUNE=0: one config per GEMM kernel, no benchmarking at the first call (fast
    start-up, e.g. GPU test runs, or before a CUDA-graph capture)."""
    return os.environ.get("BIONET_FAST_AUTOTUNE", "1") == "0"


def dot_precision(dtype: torch.dtype) -> str:
    """``input_precision`` for ``tl.dot``.

    fp32 inputs on the GPU use TF32 (10-bit mantissa, like cuDNN's default for convolutions:
    the tensor cores run fp32 only that way); the interpreter and fp64 use exact "ieee" so tests
    compare bit-for-bit-ish against torch. bf16/fp16 ignore the setting (they are exact products).
    """
    if is_interpreter() or dtype == torch.float64:
        return "ieee"
    return "tf32"


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether tl.dot operands must be upcast to fp32 first: Triton 3.9's interpreter returns garbage
    for bf16 x bf16 -> fp32 dots. The upcast is exact (bf16 products are exact in fp32), so the
    interpreter still computes what the GPU's bf16 tensor-core dot computes."""
    return is_interpreter() and dtype == torch.bfloat16


@triton.jit
def round_to(v, dtype: tl.constexpr, EMULATE_RNE: tl.constexpr):
    """v (fp32) -> dtype, rounding to nearest even, for stores of activations and gradients.

    The GPU's fp32 -> bf16 conversion already rounds to nearest even. Triton 3.9's interpreter
    truncates instead, which biases every stored bf16 value towards zero by half an ulp on average;
    over a whole BiONet that bias compounds (relative error 5e-2 where the GPU gives 1e-2). With
    EMULATE_RNE (the interpreter's bf16 path: pass ``dot_upcast(dtype)``) the rounding is done on
    the bits, so the interpreter computes what the GPU computes. Inf/NaN are not special-cased.
    """
    if EMULATE_RNE:
        bits = v.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        bits = bits & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True).to(dtype)
    return v.to(dtype)


#: Shared memory one block may use (opt-in maximum) on an H100/H200; the fallback when the device
#: does not say (see shared_memory_limit).
HOPPER_SHARED_BYTES = 232448


def shared_memory_limit(t: torch.Tensor) -> int:
    """Bytes of shared memory a block may use on t's device: 227 KiB on an H100/H200, 163 KiB on
    an A100, 99 KiB on consumer Ampere/Ada. Autotune tables are pruned against it, because a config
    over the limit cannot launch (Triton raises OutOfResources)."""
    if t.device.type != "cuda":
        return HOPPER_SHARED_BYTES
    props = torch.cuda.get_device_properties(t.device)
    return int(getattr(props, "shared_memory_per_block_optin", HOPPER_SHARED_BYTES))


def prune_by_shared(configs: list, estimate, limit: int) -> list:
    """The configs whose estimated shared memory (``estimate(config)`` bytes) fits in ``limit``;
    if none does, the one that needs least (better a slow launch than none)."""
    fits = [c for c in configs if estimate(c) <= limit]
    return fits or [min(configs, key=estimate)]


def acc_dtype(dtype: torch.dtype):
    """Triton accumulator / statistics dtype: fp64 for fp64 inputs, else fp32."""
    return tl.float64 if dtype == torch.float64 else tl.float32


def stats_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch dtype of the per-channel statistics for activations of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_channel_vector(name: str, v, channels: int, device) -> None:
    """Raise a ValueError naming the problem if ``v`` is not a (channels,) tensor on ``device``."""
    if v is None:
        return
    if not isinstance(v, torch.Tensor) or v.dim() != 1 or v.numel() != channels:
        shape = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
        raise ValueError(f"{name} must be a 1-D tensor of {channels} per-channel values, got {shape}; "
                         f"pass one value per input channel (or None for the identity).")
    if v.device != torch.device(device):
        raise ValueError(f"{name} is on {v.device} but the activations are on {device}; move it with .to().")


def check_activation(name: str, x: torch.Tensor) -> None:
    """Raise a ValueError unless ``x`` is a 4-D (B, C, H, W) tensor of a supported dtype."""
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"{name} must be a 4-D (B, C, H, W) tensor, got "
                         f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}.")
    if x.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} has dtype {x.dtype}; the fused kernels take float32, bfloat16 or "
                         f"float16: cast it with .float() or .to(torch.bfloat16).")
    if x.numel() >= 2**31:
        raise ValueError(f"{name} has {x.numel()} elements; the kernels index with int32, so split the "
                         f"batch into chunks of fewer than 2**31 elements.")
