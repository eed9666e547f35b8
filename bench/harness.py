"""What every benchmark shares: building a model and batch for one configuration, the train step
(forward, backward, Adam step) and the inference forward, CUDA-graph capture of a whole train step,
synchronised timing, peak memory (CUDA allocator, NVML, or the CPU count) and OOM handling.

A configuration is a `Case`. Precision "bf16" means torch.autocast(bfloat16) with the model and input
in channels_last; "fp32" is plain float32 NCHW (TF32 convolutions as PyTorch defaults them).
"""
from __future__ import annotations

import contextlib
import datetime
import gc
import importlib.util
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
MIB = 2**20


def ensure_importable() -> None:
    """Make `bionet_fast` and `bionet_fast.kernels` importable from a checkout, installed or not.

    setup.py maps the top-level kernels/ folder to bionet_fast.kernels; without an install we load
    that folder under the same name so the fused blocks import exactly as they would installed."""
    try:
        import bionet_fast  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(REPO))
        import bionet_fast  # noqa: F401
    if importlib.util.find_spec("bionet_fast.kernels") is None and (REPO / "kernels").is_dir():
        spec = importlib.util.spec_from_file_location(
            "bionet_fast.kernels", REPO / "kernels" / "__init__.py",
            submodule_search_locations=[str(REPO / "kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["bionet_fast.kernels"] = module
        spec.loader.exec_module(module)
        bionet_fast.kernels = module


@dataclass(frozen=True)
class Case:
    """One benchmark configuration (input 3 x size x size, binary targets)."""

    backend: str = "reference"
    t: int = 3
    batch: int = 2
    dtype: str = "fp32"  # "fp32" or "bf16" (autocast + channels_last)
    mode: str = "train"  # "train" (fwd + bwd + Adam step) or "infer" (eval forward, no grad)
    size: int = 512
    multiplier: float = 1.0
    depth: int = 4
    ckpt: bool = False  # BiONet(checkpoint_iters=True)

    def label(self) -> str:
        ck = "+ckpt" if self.ckpt else ""
        return f"{self.backend} {self.mode} {self.dtype}{ck} b{self.batch} t{self.t}"

    def to_dict(self) -> dict:
        return asdict(self)


def default_device() -> torch.device:
    """The current CUDA device with its index (some torch.cuda calls reject a bare "cuda"), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), target)


class Runner:
    """Model, static batch and optimizer of one Case; `step()` runs one train step or one inference
    forward without synchronising (callers time it with `time_calls`)."""

    def __init__(self, case: Case, device: torch.device, capturable: bool = False):
        from bionet_fast import BiONet

        self.case, self.device = case, device
        torch.manual_seed(0)
        model = BiONet(iterations=case.t, multiplier=case.multiplier, depth=case.depth,
                       checkpoint_iters=case.ckpt, backend=case.backend).to(device)
        x = torch.randn(case.batch, 3, case.size, case.size, device=device)
        self.y = (torch.rand(case.batch, 1, case.size, case.size, device=device) > 0.5).float()
        if case.dtype == "bf16":
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        elif case.dtype != "fp32":
            raise ValueError(f"dtype {case.dtype!r}; use 'fp32' or 'bf16'")
        self.model, self.x = model, x
        self.opt, self.graph = None, None
        if case.mode == "train":
            model.train()
            kw = {"capturable": True} if capturable else {}
            self.opt = torch.optim.Adam(model.parameters(), lr=1e-3, **kw)
        else:
            model.eval()

    def autocast(self, cache_enabled: bool = True):
        if self.case.dtype != "bf16":
            return contextlib.nullcontext()
        # The autocast weight cache must be off while a CUDA graph is captured (PyTorch docs).
        return torch.autocast(self.device.type, dtype=torch.bfloat16, cache_enabled=cache_enabled)

    def forward_backward(self, cache_enabled: bool = True) -> torch.Tensor:
        with self.autocast(cache_enabled):
            loss = bce(self.model(self.x), self.y)
        loss.backward()
        return loss

    def step(self, cache_enabled: bool = True) -> None:
        if self.case.mode == "infer":
            with torch.inference_mode(), self.autocast(cache_enabled):
                self.model(self.x)
            return
        self.opt.zero_grad(set_to_none=True)
        self.forward_backward(cache_enabled)
        self.opt.step()

    def close(self) -> None:
        self.model = self.x = self.y = self.opt = self.graph = None


def capture_train_graph(runner: Runner, warmup: int = 3) -> Callable[[], None]:
    """Capture forward + backward + Adam step (capturable) in one CUDA graph; returns its replay.

    As the PyTorch CUDA-graph docs prescribe: warm up on a side stream, grads set to None before
    capture so that backward allocates them from the graph's pool, autocast cache disabled. The
    capture runs on the warm-up stream, so per-stream library handles already exist."""
    if runner.case.mode != "train" or runner.device.type != "cuda":
        raise ValueError("CUDA graphs are captured for CUDA train steps only")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            runner.step(cache_enabled=False)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    runner.opt.zero_grad(set_to_none=True)
    with torch.cuda.graph(graph, stream=side):
        runner.forward_backward(cache_enabled=False)
        runner.opt.step()
    runner.graph = graph  # keep it alive with the runner
    return graph.replay


def time_calls(fn: Callable[[], None], device: torch.device, warmup: int, reps: int,
               max_seconds: float = float("inf"), min_reps: int = 3) -> list[float]:
    """Milliseconds of each timed call; every call is followed by a device synchronise. Stops after
    `reps` calls, or earlier once `max_seconds` of timed calls have passed (at least `min_reps`)."""
    for _ in range(warmup):
        fn()
        sync(device)
    times: list[float] = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
        if time.perf_counter() - start > max_seconds and len(times) >= min_reps:
            break
    return times


def median(values: list[float]) -> Optional[float]:
    if not values:
        return None
    s = sorted(values)
    n = len(s)
    return s[n // 2] if n % 2 else 0.5 * (s[n // 2 - 1] + s[n // 2])


# --- memory ------------------------------------------------------------------------------------
def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        sync(device)
        torch.cuda.reset_peak_memory_stats(device)


def peak_mib(device: torch.device) -> Optional[float]:
    """torch.cuda.max_memory_allocated since the last reset (absolute: params, Adam state included)."""
    if device.type != "cuda":
        return None
    sync(device)
    return torch.cuda.max_memory_allocated(device) / MIB


def cpu_peak_mib(runner: Runner) -> float:
    """The CPU's deterministic count of one step's peak (bionet_fast.peak_step_memory for train;
    the same live-bytes count for an inference forward). Excludes params, buffers and inputs."""
    from bionet_fast import peak_step_memory
    from bionet_fast.engine.planning.memory import LiveBytesMode

    if runner.case.mode == "train":
        with runner.autocast():
            return peak_step_memory(runner.model, runner.x, runner.y, bce) / MIB
    held = list(runner.model.parameters()) + list(runner.model.buffers()) + [runner.x]
    mode = LiveBytesMode({t.untyped_storage().data_ptr() for t in held})
    with mode, torch.inference_mode(), runner.autocast():
        runner.model(runner.x)
    return mode.peak / MIB


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


class SimulatedOOM(RuntimeError):
    """Raised by the CPU stand-in of a memory cap (so the search logic runs without a GPU)."""


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, SimulatedOOM)):
        return True
    text = str(exc)
    return any(s in text for s in ("out of memory", "ALLOC_FAILED", "OutOfMemory", "OUT_OF_MEMORY"))


# --- NVML and environment ----------------------------------------------------------------------
_NVML: dict = {}


def _nvml_handle():
    """pynvml handle of the current CUDA device (matched by UUID, else index), or None."""
    if "handle" in _NVML:
        return _NVML["handle"]
    handle = None
    try:
        import pynvml  # nvidia-ml-py; optional

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        if torch.cuda.is_available():
            uuid = str(getattr(torch.cuda.get_device_properties(0), "uuid", ""))
            if uuid:
                try:
                    uuid = uuid if uuid.startswith("GPU-") else f"GPU-{uuid}"
                    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
                except Exception:  # noqa: BLE001 - fall back to index 0
                    pass
    except Exception:  # noqa: BLE001 - pynvml absent or no driver
        handle = None
    _NVML["handle"] = handle
    return handle


def nvml_used_mib() -> Optional[float]:
    """Memory used on the whole device according to NVML (all processes, CUDA context included)."""
    handle = _nvml_handle()
    if handle is None:
        return None
    try:
        import pynvml

        return pynvml.nvmlDeviceGetMemoryInfo(handle).used / MIB
    except Exception:  # noqa: BLE001
        return None


def _nvidia_smi(query: str) -> Optional[str]:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else None
    except Exception:  # noqa: BLE001
        return None


def environment() -> dict:
    """Card, driver (pynvml, else nvidia-smi), versions, date: recorded with every result file."""
    info = {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "python": platform.python_version(), "torch": torch.__version__,
            "host_cpus": os.cpu_count(), "cuda_available": torch.cuda.is_available()}
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"unavailable ({type(exc).__name__})"
    try:
        if torch.cuda.is_available():
            props = torch.cuda.get_device_properties(0)
            info.update(card=props.name, card_mib=round(props.total_memory / MIB), cuda=torch.version.cuda,
                        cudnn=torch.backends.cudnn.version(),
                        tf32_cudnn=torch.backends.cudnn.allow_tf32,
                        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
                        cudnn_benchmark=torch.backends.cudnn.benchmark)
        else:
            info.update(card=f"CPU ({platform.processor() or platform.machine()})", card_mib=None)
    except Exception as exc:  # noqa: BLE001 - the environment line must never stop a run
        info["card"] = f"unknown ({type(exc).__name__}: {exc})"
    info["driver"] = _driver_version()
    return info


def _driver_version() -> Optional[str]:
    try:
        import pynvml

        pynvml.nvmlInit()
        version = pynvml.nvmlSystemGetDriverVersion()
        return (version.decode() if isinstance(version, bytes) else str(version)) + " (pynvml)"
    except Exception:  # noqa: BLE001
        smi = _nvidia_smi("driver_version")
        return f"{smi} (nvidia-smi)" if smi else None
