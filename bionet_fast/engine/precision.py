"""Inference precision: fp32, bf16 or fp16 autocast with channels_last, and the default choice.

bf16 is the default where the hardware computes it natively: CUDA, and CPUs with AVX512-BF16 or
AMX (there oneDNN runs bf16 convolutions at about twice the fp32 speed). Elsewhere bf16 would be
emulated (slower than fp32), so fp32 is the default.
"""
from __future__ import annotations

import contextlib
from functools import lru_cache
from pathlib import Path

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bf16 natively (AVX512-BF16 or AMX-BF16 in /proc/cpuinfo's flags,
    or torch reporting an AMX capability)."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        flags = ""
    if "avx512_bf16" in flags or "amx_bf16" in flags:
        return True
    return "AMX" in str(torch.backends.cpu.get_cpu_capability()).upper()


def default_precision(device: torch.device) -> str:
    """"bf16" on CUDA and on CPUs with native bf16, "fp32" elsewhere."""
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return "bf16"
    return "fp32"


def resolve_precision(precision: str | None, device: torch.device) -> str:
    """`precision` checked (None = the device's default); fp16 on a CPU is refused by name."""
    precision = precision or default_precision(device)
    if precision not in PRECISIONS:
        raise ValueError(f"--precision {precision}: use one of {', '.join(PRECISIONS)}")
    if precision == "fp16" and device.type == "cpu":
        raise ValueError("--precision fp16 is not fast on a CPU (no fp16 convolutions); "
                         "use --precision bf16 or fp32")
    return precision


def autocast_context(precision: str, device: torch.device):
    """A context manager running the model at `precision` (a no-op context for fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=_DTYPES[precision])


def prepare_model(model: torch.nn.Module, channels_last: bool) -> torch.nn.Module:
    """channels_last weights for the reduced-precision path (oneDNN / cuDNN's fast layout)."""
    return model.to(memory_format=torch.channels_last) if channels_last else model
