"""pytest-benchmark suite: inference forward and full train step (forward, backward, Adam step) per
backend, t, batch and precision. Every timed call synchronises the device. Peak memory (CUDA:
max_memory_allocated; CPU: the peak_step_memory count) and NVML's device-used memory go into each
benchmark's extra_info. Grid and sizes: bench/conftest.py."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from bench.harness import Case, Runner, cpu_peak_mib, nvml_used_mib, peak_mib, reset_peak, sync

WARMUP, ROUNDS = (3, 10) if torch.cuda.is_available() else (1, 2)


def _run(benchmark, case: Case, device: torch.device) -> None:
    reset_peak(device)
    runner = Runner(case, device)
    try:
        runner.step()  # the first call imports the backend's blocks (and compiles its kernels)
        sync(device)
    except ImportError as exc:
        if case.backend != "triton":
            raise
        pytest.skip(f"triton backend does not import: {exc}")

    def timed() -> None:
        runner.step()
        sync(device)

    benchmark.group = f"{case.mode} {case.dtype} b{case.batch}"
    benchmark.extra_info.update(case.to_dict())
    benchmark.pedantic(timed, warmup_rounds=WARMUP, rounds=ROUNDS, iterations=1)
    peak = peak_mib(device) if device.type == "cuda" else cpu_peak_mib(runner)
    benchmark.extra_info.update(peak_mib=peak, nvml_used_mib=nvml_used_mib())
    runner.close()


def test_train_step(benchmark, case: Case, device):
    _run(benchmark, replace(case, mode="train"), device)


def test_inference(benchmark, case: Case, device):
    _run(benchmark, replace(case, mode="infer"), device)
