"""Fixtures of the pytest-benchmark suite (`pytest bench/ --benchmark-only`).

On a CUDA machine: 3x512x512, BiO-Net x1.0 depth 4, t in {1, 2, 3, 5, 8}, batch 2 and 8, fp32 and
bf16 (autocast + channels_last), backends reference and triton. Without CUDA a tiny smoke grid
(64x64, x0.25, depth 3, t in {1, 2}, batch 2, reference only; BIONET_BENCH_CPU_TRITON=1 adds the
triton backend in the interpreter, slowly) proves that the harness works.

Narrow the grid with comma-separated env vars BIONET_BENCH_T, BIONET_BENCH_BATCH,
BIONET_BENCH_DTYPE, BIONET_BENCH_BACKENDS; BIONET_BENCH_DEADLINE (time.time() seconds) skips the
benchmarks that would start after it.
"""
from __future__ import annotations

import os
import time

import pytest
import torch

from bench.harness import Case, default_device, ensure_importable, free_memory
from bench.profiles import pick

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
ensure_importable()

PROFILE = pick(CUDA, quick=False)


def _env_list(name: str, default: tuple, cast=str) -> tuple:
    raw = os.environ.get(name, "").strip()
    return tuple(cast(v) for v in raw.split(",") if v.strip()) if raw else default


def grid() -> list[Case]:
    cpu_triton = os.environ.get("BIONET_BENCH_CPU_TRITON") == "1"
    cpu_backends = ("reference", "triton") if cpu_triton else ("reference",)
    backends = _env_list("BIONET_BENCH_BACKENDS", ("reference", "triton") if CUDA else cpu_backends)
    ts = _env_list("BIONET_BENCH_T", PROFILE.ts, int)
    batches = _env_list("BIONET_BENCH_BATCH", PROFILE.batches, int)
    dtypes = _env_list("BIONET_BENCH_DTYPE", PROFILE.dtypes)
    return [Case(b, t, n, d, "train", **PROFILE.model_kwargs())
            for b in backends for n in batches for d in dtypes for t in ts]


def pytest_generate_tests(metafunc):
    if "case" in metafunc.fixturenames:
        cases = grid()
        metafunc.parametrize("case", cases, ids=[f"{c.backend}-{c.dtype}-b{c.batch}-t{c.t}" for c in cases])


@pytest.fixture(scope="session")
def device() -> torch.device:
    return default_device()


@pytest.fixture(autouse=True)
def _budget_and_cleanup(device):
    deadline = float(os.environ.get("BIONET_BENCH_DEADLINE", "inf"))
    if time.time() > deadline:
        pytest.skip("skipped (budget): BIONET_BENCH_DEADLINE passed")
    torch.manual_seed(0)
    yield
    free_memory(device)


@pytest.fixture(scope="session", autouse=True)
def _threads():
    # Tiny CPU shapes: one thread avoids OpenMP contention on a busy host (restored afterwards).
    before = torch.get_num_threads()
    if not CUDA:
        torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
