"""Every Triton kernel the package launches compiles for an H100/H200 (sm_90), without a GPU.

The CPU suite runs the kernels in Triton's interpreter, which never lowers them; this file compiles
them ahead of time (bench/aot.py: worker processes without TRITON_INTERPRET) in the GPU
configuration of a real launch: GPU constexprs (TF32 dots for fp32, no interpreter upcast), the
autotune config that BIONET_FAST_AUTOTUNE=0 pins, BiO-Net x1.0 decoder channels (64 + 64 -> 64), channels_last strides.
`python -m bench.compile_report` compiles every autotune config at every layer of the model; the
split-K configs (kernels/splitk.py) are checked here in bf16 at the layers where the prune keeps them.
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is a folder of the checkout, not of the installed package

from bench.aot import GEMMS, KERNELS, SHARED_LIMIT, Job, launched_kernels, run_jobs  # noqa: E402

CASES = [(k, d) for k, spec in KERNELS.items() for d in spec.dtypes]
GEMM_CASES = [c for c in CASES if c[0] in GEMMS]
# Pinned configs (BIONET_FAST_AUTOTUNE=0) that the ptxas bundled with Triton 3.9 (CUDA 12.9)
# compiles with spills: reported as warnings, not asserted. wgrad (128, 64, 64) w8 s3 with two
# fp32 inputs spills 28 B. Every other GEMM case must stay spill-free.
KNOWN_SPILLS = {("wgrad", "fp32"), ("wgrad_reflect", "fp32")}
# The padded (reflect) variants of conv_fwd / wgrad (kernels/padding.py) load the same tiles as the
# zero-padded kernels (same shared memory): the pinned-config tests and bench/compile_report compile
# them; the every-config sweep below keeps to the zero-padded kernels (CI time).
SWEEP = tuple(k for k in GEMMS if not k.endswith("_reflect"))


def _ids(cases):
    return [f"{k}-{d}" for k, d in cases]


@pytest.fixture(scope="module")
def compiled() -> dict:
    """(kernel, dtype) -> bench.aot result, all compiled once by two worker processes."""
    results = run_jobs([Job(k, d) for k, d in CASES], workers=2, timeout=300)
    return {(r["kernel"], r["dtype"]): r for r in results}


def _ok(compiled, kernel, dtype) -> dict:
    r = compiled[(kernel, dtype)]
    if r["error"]:
        pytest.fail(f"{kernel} ({dtype}) did not compile for sm_90: {r['error']}\n{r.get('traceback', '')}")
    return r


def test_every_launched_kernel_is_covered():
    """A new @triton.jit kernel in kernels/ needs an entry in bench/aot.py KERNELS."""
    covered = {spec.jit_name for spec in KERNELS.values()}
    assert launched_kernels() <= covered, f"not compiled here: {sorted(launched_kernels() - covered)}"


@pytest.mark.parametrize("kernel,dtype", CASES, ids=_ids(CASES))
def test_compiles_within_shared_memory(compiled, kernel, dtype):
    r = _ok(compiled, kernel, dtype)
    assert 0 <= r["shared"] <= SHARED_LIMIT, (
        f"{kernel} ({dtype}, config {r['config']}) needs {r['shared']} B of shared memory; "
        f"H100/H200 allow {SHARED_LIMIT} B per block, so the launch would fail")


@pytest.mark.parametrize("kernel,dtype", GEMM_CASES, ids=_ids(GEMM_CASES))
def test_gemm_uses_tensor_cores(compiled, kernel, dtype):
    """bf16/fp16 dots and fp32's TF32 dots lower to Hopper's wgmma (or at least mma.sync)."""
    r = _ok(compiled, kernel, dtype)
    assert r["wgmma"] or r["mma_sync"], f"{kernel} ({dtype}): no tensor-core instruction in the PTX"


SPILL_FREE = [c for c in GEMM_CASES if c not in KNOWN_SPILLS]


@pytest.mark.parametrize("kernel,dtype", SPILL_FREE, ids=_ids(SPILL_FREE))
def test_gemm_does_not_spill(compiled, kernel, dtype):
    r = _ok(compiled, kernel, dtype)
    assert r["spill_stores"] is not None, "ptxas -v log not found: cannot tell spills"
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, (
        f"{kernel} ({dtype}, config {r['config']}): {r['registers']} registers, {r['spill_stores']} B "
        f"spill stores, {r['spill_loads']} B spill loads")


def test_known_spills_are_reported(compiled):
    """The KNOWN_SPILLS cases compile; their spills (if any are left) show as warnings."""
    for kernel, dtype in sorted(KNOWN_SPILLS):
        r = _ok(compiled, kernel, dtype)
        if r["spill_stores"] or r["spill_loads"]:
            warnings.warn(f"{kernel} ({dtype}, config {r['config']}) spills on sm_90: {r['registers']} "
                          f"registers, {r['spill_stores']} B stores, {r['spill_loads']} B loads")


def _estimate(r: dict) -> int:
    """The prune functions' shared-memory estimate for a compiled result."""
    import triton

    from bionet_fast.kernels._bwd_utils import dgrad_shared_bytes, wgrad_shared_bytes
    from bionet_fast.kernels.conv_fwd import shared_bytes

    m, n, k, w, s = r["config"][:5]  # (..., SPLIT_K): split-K leaves the main loop's buffers alone
    cfg = triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k}, num_warps=w, num_stages=s)
    elem = {"bf16": 2, "fp16": 2, "fp32": 4}[r["dtype"]]
    inputs = 2 if r["channels"][1] else 1
    return {"conv_fwd": lambda: shared_bytes(cfg, elem), "dgrad": lambda: dgrad_shared_bytes(cfg, elem),
            "wgrad": lambda: wgrad_shared_bytes(cfg, elem, inputs)}[r["kernel"].removesuffix("_reflect")]()


def test_every_config_the_autotuner_may_pick_fits_in_shared_memory():
    """fp32 (the widest tiles), every GPU autotune config that survives the prune at every conv
    layer of BiO-Net x1.0: it compiles, fits in an H100/H200's shared memory, and the prune's
    estimate is not below what ptxas allocates (the prune drops configs by that estimate)."""
    from bench.aot import plan
    from bench.compile_report import bionet_layers

    results = run_jobs(plan(SWEEP, "fp32", bionet_layers(), all_configs=True), workers=2, timeout=600)
    assert results
    for r in results:
        where = f"{r['kernel']} fp32 config {r['config']} at {r['channels']}"
        assert not r["error"], f"{where}: {r['error']}"
        assert r["shared"] <= SHARED_LIMIT, f"{where} needs {r['shared']} B of shared memory"
        assert _estimate(r) >= r["shared"], f"{where}: estimate {_estimate(r)} B < ptxas' {r['shared']} B"


def test_split_k_configs_compile_without_spills_bf16():
    """Every split-K config (SPLIT_K > 1) the bf16 autotuner may try at a layer of BiO-Net x1.0 (at
    the layer's smallest level, bench/aot_kernels.split_pixels): compiles for sm_90, fits in shared
    memory as the prune estimates, and does not spill."""
    from bench.aot import plan
    from bench.compile_report import bionet_layers

    jobs = [j for j in plan(SWEEP, "bf16", bionet_layers(), all_configs=True) if j.config[5] > 1]
    assert {j.kernel for j in jobs} == {"conv_fwd", "dgrad"}, "no split-K config left after the prune"
    for r in run_jobs(jobs, workers=2, timeout=600):
        where = f"{r['kernel']} bf16 config {r['config']} at {r['channels']}"
        assert not r["error"], f"{where}: {r['error']}"
        assert _estimate(r) >= r["shared"] and r["shared"] <= SHARED_LIMIT, f"{where}: {r['shared']} B"
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, f"{where}: {r['registers']} registers spill"
