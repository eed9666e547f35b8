"""Ahead-of-time compilation of the package's Triton kernels for an H100/H200 (sm_90), no GPU needed.

    python -m bench.aot JOBS.json OUT.jsonl     (a worker; tests and bench.compile_report start it)

`compile_sm90` builds a kernel's signature from its own parameters (pointers `*<dtype>` from a
per-kernel dtype map, integer scalars specialised the way a launch specialises them, float scalars
fp32), compiles it with `triton.compile` for GPUTarget("cuda", 90, 32) and reads back what decides
whether it can run: dynamic shared memory (H100/H200 allow at most SHARED_LIMIT bytes per block),
registers and spills (from ptxas' own -v log) and whether the PTX uses tensor cores.

Why worker processes: under TRITON_INTERPRET=1 (the CPU test suite) triton replaces every
@triton.jit function at import, triton.language's own (tl.cdiv, tl.sum, ...) included, by an
InterpretedFunction the compiler cannot lower. So jobs run in `python -m bench.aot` processes
started without TRITON_INTERPRET; each imports a private copy of kernels/ in GPU mode, so every
module-level switch (autotune tables, interpreter-only constexprs like UPCAST) takes its GPU value.

KERNELS (bench/aot_kernels.py) describes how the package launches each @triton.jit kernel (which pointers carry the compute
dtype, the constexprs the host wrapper passes on the GPU, representative shapes); read the host
wrappers in kernels/ when a kernel changes. Constexprs come from the GPU-mode modules' own helpers
(dot_precision, dot_meta, ...) wherever the wrapper uses one.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

try:  # the kernel table (a sibling module: importable as bench.aot_kernels or, in a worker, directly)
    from .aot_kernels import GEMMS, KERNELS, TEST_CHANNELS  # noqa: F401
except ImportError:
    from aot_kernels import GEMMS, KERNELS, TEST_CHANNELS  # noqa: F401

REPO = Path(__file__).resolve().parents[1]
KERNELS_DIR = REPO / "kernels"
#: Max dynamic shared memory per block on sm_90 (H100 and H200, opt-in): 227 KiB.
SHARED_LIMIT = 232448
ARCH, WARP = 90, 32
DTYPES = ("bf16", "fp16", "fp32")


# --- signature and compilation (run only where triton was imported without the interpreter) ------
def build_signature(fn, constexprs: dict, ptr_dtypes: dict, scalars: Optional[dict] = None,
                    default_ptr: str = "fp32"):
    """-> (signature, constexprs, attrs) for triton.compiler.ASTSource, from fn's parameters.

    fn: a JITFunction. constexprs: value of every tl.constexpr parameter (those with a default may
    be left out). ptr_dtypes: {pointer parameter: triton dtype name ("bf16", "i64", ...)}; other
    pointers (names ending in _ptr) get `default_ptr`. scalars: representative values of the other
    parameters; each is specialised exactly as a launch would (an int equal to 1 becomes the
    constexpr 1, a multiple of 16 gets tt.divisibility=16, a float is fp32); a scalar without a
    value is an i32. Pointers are 16-byte aligned (every torch allocation is).
    Raises ValueError naming the kernel and the parameters when constexprs do not match.
    """
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import native_specialize_impl

    params = fn.params
    names = [p.name for p in params]
    missing = [p.name for p in params if p.is_constexpr and p.name not in constexprs and not p.has_default]
    unknown = [k for k in constexprs if k not in names or not params[names.index(k)].is_constexpr]
    if missing or unknown:
        raise ValueError(f"{fn.__name__}: constexprs do not match its signature (missing {missing}, "
                         f"not constexpr parameters {unknown}); update its entry in bench/aot.py KERNELS")
    scalars = scalars or {}
    signature, consts, attrs = {}, {}, {}
    for i, p in enumerate(params):
        if p.is_constexpr:
            signature[p.name] = "constexpr"
            consts[p.name] = constexprs[p.name] if p.name in constexprs else p.default
        elif p.name.endswith("_ptr"):
            signature[p.name] = "*" + ptr_dtypes.get(p.name, default_ptr)
            attrs[(i,)] = BaseBackend.parse_attr("D")
        elif p.name in scalars:
            kind, spec = native_specialize_impl(BaseBackend, scalars[p.name], False, True, True)
            signature[p.name] = kind
            if kind == "constexpr":
                consts[p.name] = spec
            elif isinstance(spec, str) and spec:
                attrs[(i,)] = BaseBackend.parse_attr(spec)
        else:
            signature[p.name] = "i32"
    return signature, consts, attrs


_PTXAS_REGS = re.compile(r"Used (\d+) registers")
_PTXAS_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_sm90(fn, constexprs: dict, ptr_dtypes: dict, scalars: Optional[dict] = None,
                 num_warps: Optional[int] = None, num_stages: Optional[int] = None) -> dict:
    """Compile JITFunction `fn` for sm_90 (see build_signature) -> measurements:
    shared (dynamic shared memory, bytes), registers, spill_stores / spill_loads / stack (bytes,
    from ptxas -v), wgmma / mma_sync (tensor-core instructions in the PTX), seconds.
    num_warps / num_stages None: triton's defaults, as a launch without them gets.
    Raises whatever triton.compile raises (CompilationError, PTXASError)."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    if knobs.runtime.interpret:
        raise RuntimeError("triton runs in its interpreter here (TRITON_INTERPRET=1): compile in a "
                           "worker process, bench.aot.run_jobs")
    signature, consts, attrs = build_signature(fn, constexprs, ptr_dtypes, scalars)
    options = {k: v for k, v in (("num_warps", num_warps), ("num_stages", num_stages)) if v is not None}
    log = io.StringIO()
    t0 = time.perf_counter()
    with knobs.nvidia.scope(), knobs.compilation.scope(), contextlib.redirect_stdout(log):
        knobs.nvidia.dump_ptxas_log = True  # ptxas -v output, printed by the compiler: captured
        knobs.compilation.always_compile = True  # a cache hit would print no log
        kernel = triton.compile(ASTSource(fn, signature, consts, attrs), target=GPUTarget("cuda", ARCH, WARP),
                                options=options)
    seconds = time.perf_counter() - t0
    text = log.getvalue()
    regs, spill = _PTXAS_REGS.search(text), _PTXAS_SPILL.search(text)
    ptx = kernel.asm["ptx"]
    return dict(shared=kernel.metadata.shared, registers=int(regs.group(1)) if regs else None,
                stack=int(spill.group(1)) if spill else None,
                spill_stores=int(spill.group(2)) if spill else None,
                spill_loads=int(spill.group(3)) if spill else None,
                wgmma="wgmma.mma_async" in ptx, mma_sync="mma.sync" in ptx,
                num_warps=kernel.metadata.num_warps, num_stages=kernel.metadata.num_stages,
                seconds=round(seconds, 2))


def launched_kernels(kernels_dir: Path = KERNELS_DIR) -> set:
    """Names of the @triton.jit functions of kernels/*.py that no other jit function calls (the
    kernels that get launched; the rest are device helpers), found by reading the source."""
    def is_jit(d):  # @triton.jit, @jit, @triton.jit(...)
        d = d.func if isinstance(d, ast.Call) else d
        return getattr(d, "attr", getattr(d, "id", None)) == "jit"

    jits, called = {}, set()
    for path in sorted(kernels_dir.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and any(is_jit(d) for d in node.decorator_list):
                jits[node.name] = node
    for node in jits.values():
        called |= {c.func.id for c in ast.walk(node) if isinstance(c, ast.Call) and isinstance(c.func, ast.Name)}
    return set(jits) - called


# --- the worker side: GPU-mode modules, configs, jobs -------------------------------------------------
_GPU_MODULES: dict = {}


def gpu_modules(pinned: bool):
    """A private copy of kernels/ imported in GPU mode (cached): `.conv_fwd`, `.conv_bwd`,
    `.bn_stats`, `._utils`, `._bwd_utils`. pinned: imported with BIONET_FAST_AUTOTUNE=0."""
    import importlib
    import importlib.util
    from types import SimpleNamespace

    if pinned in _GPU_MODULES:
        return _GPU_MODULES[pinned]
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise RuntimeError("gpu_modules needs a process without TRITON_INTERPRET=1; use run_jobs")
    name = "_bionet_aot_kernels_" + ("pinned" if pinned else "tuned")
    before = os.environ.get("BIONET_FAST_AUTOTUNE")
    os.environ["BIONET_FAST_AUTOTUNE"] = "0" if pinned else "1"
    try:
        spec = importlib.util.spec_from_file_location(name, KERNELS_DIR / "__init__.py",
                                                      submodule_search_locations=[str(KERNELS_DIR)])
        pkg = importlib.util.module_from_spec(spec)
        sys.modules[name] = pkg
        spec.loader.exec_module(pkg)
        mods = SimpleNamespace(**{m: importlib.import_module(f"{name}.{m}") for m in
                                  ("_utils", "_bwd_utils", "conv_fwd", "conv_bwd", "bn_stats", "splitk")})
    finally:
        if before is None:
            os.environ.pop("BIONET_FAST_AUTOTUNE", None)
        else:
            os.environ["BIONET_FAST_AUTOTUNE"] = before
    _GPU_MODULES[pinned] = mods
    return mods


def _torch_dtype(name: str):
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def _tl_name(dt) -> str:
    import torch

    return {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}[dt]


def configs(kernel: str, dtype: str, channels: tuple, all_configs: bool) -> list:
    """GPU configs [(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages, SPLIT_K)] the autotuner of a
    GEMM kernel would try at these channels, after its early_config_prune (split-K configs: where
    the layer's smallest level has fewer tiles than an H200 has SMs, aot_kernels.split_pixels).
    all_configs False: the table of a run with BIONET_FAST_AUTOTUNE=0 (one pinned config per kernel)."""
    import torch

    dt = _torch_dtype(dtype)
    launch = KERNELS[kernel].launch(gpu_modules(not all_configs), dt, tuple(channels))
    tuner = launch.kernel
    cfgs = tuner.configs
    if tuner.early_config_prune is not None:
        # what a launch hands the prune: named args (CPU stand-ins for the pointers: their dtype
        # sets the shared-memory estimate, the limit falls back to the H100/H200's) and constexprs
        ptrs = {p: torch.empty(0, dtype=dt) for p in launch.act}
        non_constexpr = {**launch.scalars, **ptrs, **launch.prune_args}
        cfgs = tuner.early_config_prune(cfgs, non_constexpr, **launch.constexprs)
    return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_warps, c.num_stages,
             c.kwargs.get("SPLIT_K", 1)) for c in cfgs]


@dataclass
class Job:
    """One compile. config None: the pinned config (first after the prune) of a GEMM kernel, or the
    launch's own meta-parameters otherwise."""
    kernel: str
    dtype: str
    channels: tuple = TEST_CHANNELS
    config: Optional[tuple] = None
    tag: str = ""  # free text carried to the result (the report lists layers there)


def resolve(job: Job):
    """-> (JITFunction, constexprs, pointer dtypes, scalars, num_warps, num_stages, config) of a job."""
    dt = _torch_dtype(job.dtype)
    launch = KERNELS[job.kernel].launch(gpu_modules(True), dt, tuple(job.channels))
    fn, constexprs, warps, stages, cfg = launch.kernel, dict(launch.constexprs), None, None, None
    if hasattr(fn, "configs"):  # an Autotuner: its JITFunction and one of its configs
        cfg = tuple(job.config) if job.config else configs(job.kernel, job.dtype, job.channels, False)[0]
        constexprs.update(BLOCK_M=cfg[0], BLOCK_N=cfg[1], BLOCK_K=cfg[2])
        warps, stages, fn = cfg[3], cfg[4], fn.fn
        if "SPLIT_K" in fn.arg_names:  # (BM, BN, BK, warps, stages, SPLIT_K); 5-tuples: unsplit
            constexprs["SPLIT_K"] = cfg[5] if len(cfg) > 5 else 1
    ptrs = {p: _tl_name(dt) for p in launch.act} | launch.ptr_types
    return fn, constexprs, ptrs, launch.scalars, warps, stages, cfg


def compile_job(job: Job) -> dict:
    """Compile one job in this (clean) process -> the job's fields plus compile_sm90's, or `error`."""
    out = asdict(job)
    try:
        fn, constexprs, ptrs, scalars, warps, stages, out["config"] = resolve(job)
        out.update(compile_sm90(fn, constexprs, ptrs, scalars, warps, stages))
        out["error"] = None
    except Exception as e:  # noqa: BLE001 - reported per job; the other jobs go on
        out["error"] = f"{type(e).__name__}: {e}"[-4000:]
        out["traceback"] = traceback.format_exc()[-4000:]
    return out


def plan_jobs(kernels, dtype: str, layers: dict, all_configs: bool) -> list:
    """Jobs compiling each kernel's configs at each layer's (C1, C2, COUT), one job per distinct
    compile (same config, same signature and specialisation), its tag naming the layers sharing it."""
    jobs = {}
    for kernel in kernels:
        for channels, name in layers.items():
            for cfg in configs(kernel, dtype, channels, all_configs):
                job = Job(kernel, dtype, tuple(channels), cfg, name)
                fn, constexprs, ptrs, scalars, warps, stages, _ = resolve(job)
                key = (kernel, warps, stages, repr(build_signature(fn, constexprs, ptrs, scalars)))
                if key in jobs:
                    jobs[key].tag += ", " + name
                else:
                    jobs[key] = job
    return list(jobs.values())


def _worker(argv=None) -> int:
    p = argparse.ArgumentParser(description="compile jobs for sm_90 (a bench.aot worker)")
    p.add_argument("jobs", help="JSON: {'compile': [job, ...]} or {'plan': {...}}")
    p.add_argument("out", help="JSON lines, one per job (plan: one line, the jobs)")
    args = p.parse_args(argv)
    request = json.loads(Path(args.jobs).read_text())
    with open(args.out, "w") as f:
        if "plan" in request:
            q = request["plan"]
            layers = {tuple(k): v for k, v in q["layers"]}
            jobs = plan_jobs(q["kernels"], q["dtype"], layers, q["all_configs"])
            f.write(json.dumps([asdict(j) for j in jobs]) + "\n")
        for job in request.get("compile", []):
            f.write(json.dumps(compile_job(Job(**job))) + "\n")
            f.flush()
    return 0


# --- the caller side: clean worker processes ---------------------------------------------------------
def _env(cache_dir: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BIONET_FAST_AUTOTUNE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env["TRITON_CACHE_DIR"] = cache_dir  # fresh: nothing stale, nothing left in ~/.triton
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
    env.setdefault("CUDA_VISIBLE_DEVICES", "")  # compiling never needs a device
    return env


def _spawn(requests: list, timeout: float) -> list:
    """Run one worker per request in parallel -> per request, its output lines (a lost worker's
    jobs are missing from them)."""
    from .device_bench import _kill, _read

    with tempfile.TemporaryDirectory(prefix="bionet_aot_") as tmp:
        procs = []
        for i, request in enumerate(requests):
            src, out, err = (Path(tmp, f"{stem}{i}{ext}") for stem, ext in
                             (("jobs", ".json"), ("out", ".jsonl"), ("err", ".txt")))
            src.write_text(json.dumps(request))
            with open(err, "w") as f:  # a file, not a pipe: a chatty worker never blocks
                procs.append((subprocess.Popen([sys.executable, "-m", "bench.aot", str(src), str(out)], cwd=REPO,
                                               env=_env(str(Path(tmp, "cache"))), start_new_session=True,
                                               stdout=subprocess.DEVNULL, stderr=f), out, err))
        deadline, results = time.time() + timeout, []
        for proc, out, err in procs:
            try:
                if proc.wait(timeout=max(1.0, deadline - time.time())):
                    print(f"bench.aot worker exited with {proc.returncode}:\n{err.read_text()[-3000:]}",
                          file=sys.stderr)
            except subprocess.TimeoutExpired:
                _kill(proc)
                print(f"bench.aot worker killed after {timeout:.0f} s", file=sys.stderr)
            results.append(_read(out))
    return results


def run_jobs(jobs: list, workers: int = 2, timeout: float = 600.0) -> list:
    """Compile `jobs` in `workers` clean processes -> one result dict per job, in job order (a job
    whose worker died or timed out comes back with `error` set)."""
    jobs = [asdict(j) if isinstance(j, Job) else dict(j) for j in jobs]
    # Longest first, dealt round-robin: GEMM compiles take seconds, the others a fraction.
    order = sorted(range(len(jobs)), key=lambda i: KERNELS[jobs[i]["kernel"]].gemm, reverse=True)
    shares = [order[w::workers] for w in range(max(1, min(workers, len(jobs))))]
    outs = _spawn([{"compile": [jobs[i] for i in share]} for share in shares], timeout)
    results = [None] * len(jobs)
    for share, out in zip(shares, outs):
        for i, r in zip(share, out):
            results[i] = r
    lost = {"error": "worker died or timed out before this job (see stderr)"}
    return [r if r is not None else {**jobs[i], **lost} for i, r in enumerate(results)]


def plan(kernels, dtype: str, layers: dict, all_configs: bool, timeout: float = 300.0) -> list:
    """plan_jobs in a clean process (it needs the GPU-mode autotune tables) -> [Job]."""
    request = {"plan": {"kernels": list(kernels), "dtype": dtype, "all_configs": all_configs,
                        "layers": [[list(k), v] for k, v in layers.items()]}}
    out = _spawn([request], timeout)[0]
    if not out:
        raise RuntimeError("bench.aot plan worker failed (see stderr)")
    return [Job(**{**j, "channels": tuple(j["channels"]), "config": tuple(j["config"])}) for j in out[0]]


if __name__ == "__main__":
    sys.exit(_worker())
