"""backend="auto" by measurement: time both backends once per setting, keep the faster, cache it.

The first time a (device, model config, batch, image size, precision, train or eval) is seen on CUDA,
`choose_backend` times a few forward (+ backward when training) passes of the reference and the fused
Triton path, keeps the faster, writes the choice to a JSON cache (as Triton caches its autotuning)
and says so once on stderr. Later processes read the cache. `BIONET_FAST_BACKEND` (read by the model)
still forces a backend; on the CPU "auto" stays the reference without measuring.

Cache: $BIONET_FAST_BACKEND_CACHE, else ~/.cache/bionet_fast/backend.json (written atomically).
The measurement leaves the model as it found it: gradients and BatchNorm buffers are restored.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..utils.files import atomic_write

CACHE_ENV = "BIONET_FAST_BACKEND_CACHE"
BACKENDS = ("reference", "triton")
#: timed passes per backend (after WARMUP untimed ones, which also autotune the Triton kernels)
STEPS, WARMUP = 3, 2

_state = threading.local()  # .forced: the backend a measurement is running, else None
_memory: dict[str, str] = {}  # this process's choices (the disk cache is read once per key)
_lock = threading.Lock()


def cache_path() -> Path:
    """Where the choices are kept: $BIONET_FAST_BACKEND_CACHE or ~/.cache/bionet_fast/backend.json."""
    env = os.environ.get(CACHE_ENV, "").strip()
    return Path(env) if env else Path.home() / ".cache" / "bionet_fast" / "backend.json"


def forced_backend() -> Optional[str]:
    """The backend a running measurement imposes on every model (None outside one)."""
    return getattr(_state, "forced", None)


def choice_key(device_name: str, config: dict, batch: int, size: tuple, precision: str, training: bool,
               layout: str = "contiguous") -> str:
    """The cache key of one setting; `config` is the model's config dict (execution-only fields
    such as the backend are dropped: they do not change what is timed)."""
    arch = {k: v for k, v in sorted(config.items()) if k != "backend"}
    return json.dumps({"device": device_name, "torch": torch.__version__, "config": arch,
                       "batch": batch, "size": list(size), "precision": precision,
                       "mode": "train" if training else "eval", "layout": layout}, sort_keys=True)


def read_cache(path: Optional[Path] = None) -> dict:
    path = path or cache_path()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}  # missing or damaged: measured again and rewritten
    return data if isinstance(data, dict) else {}


def write_choice(key: str, entry: dict, path: Optional[Path] = None) -> None:
    """Add one choice to the cache file (read-modify-write, renamed into place)."""
    path = path or cache_path()
    data = read_cache(path)
    data[key] = entry
    text = json.dumps(data, indent=1, sort_keys=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def choose(key: str, measure: Callable[[str], float], path: Optional[Path] = None,
           say: Optional[Callable[[str], None]] = None) -> str:
    """The faster backend for `key`: from this process's memory, else the disk cache, else
    measured (`measure(backend) -> seconds per pass`), cached and said once."""
    with _lock:
        if key in _memory:
            return _memory[key]
        entry = read_cache(path).get(key)
        if isinstance(entry, dict) and entry.get("backend") in BACKENDS:
            _memory[key] = entry["backend"]
            return entry["backend"]
        seconds = {b: float(measure(b)) for b in BACKENDS}
        best = min(BACKENDS, key=lambda b: seconds[b])
        _memory[key] = best
        try:
            write_choice(key, {"backend": best, "ms": {b: round(s * 1e3, 4) for b, s in seconds.items()}},
                         path)
            where = str(path or cache_path())
        except OSError as err:  # a read-only home must not stop training: keep it in memory
            where = f"not cached ({err})"
        (say or _stderr)(f"bionet_fast: backend auto chose {best} "
                         f"({', '.join(f'{b} {s * 1e3:.2f} ms' for b, s in seconds.items())} per pass; {where})")
        return best


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cuda_timer(run: Callable[[], None], steps: int = STEPS, warmup: int = WARMUP) -> float:
    """Median seconds of `run()` on the current CUDA device (synchronised)."""
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        start = time.perf_counter()
        run()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def _precision(x: torch.Tensor) -> str:
    if torch.is_autocast_enabled(x.device.type):
        return str(torch.get_autocast_dtype(x.device.type)).replace("torch.", "")
    return str(x.dtype).replace("torch.", "")


def model_measure(model: torch.nn.Module, x: torch.Tensor, training: bool,
                  timer: Callable[[Callable[[], None]], float] = cuda_timer) -> Callable[[str], float]:
    """measure(backend) for `choose`: time passes of `model` on `x` with that backend forced,
    restoring the gradients and buffers (BatchNorm statistics) it touched."""
    def measure(backend: str) -> float:
        grads = {p: p.grad for p in model.parameters()}
        buffers = [b.detach().clone() for b in model.buffers()]
        previous = forced_backend()
        _state.forced = backend
        try:
            def run() -> None:
                if training:
                    model(x).float().mean().backward()
                else:
                    with torch.no_grad():
                        model(x)
            return timer(run)
        finally:
            _state.forced = previous
            with torch.no_grad():
                for b, saved in zip(model.buffers(), buffers):
                    b.copy_(saved)
            for p, g in grads.items():
                p.grad = g
    return measure


def choose_backend(model: torch.nn.Module, x: torch.Tensor) -> str:
    """backend="auto" for a forward of `model` on x (B, C, H, W): the measured faster backend on
    CUDA (cached per setting), "triton" while that is impossible (compiling, graph capture), and
    "reference" off CUDA."""
    forced = forced_backend()
    if forced is not None:
        return forced
    if x.device.type != "cuda":
        return "reference"
    training = model.training and torch.is_grad_enabled()
    layout = "channels_last" if x.is_contiguous(memory_format=torch.channels_last) and x.shape[1] > 1 \
        else "contiguous"
    key = choice_key(torch.cuda.get_device_name(x.device), model.config.to_dict(), x.shape[0],
                     tuple(x.shape[2:]), _precision(x), training, layout)
    if key not in _memory and (torch.compiler.is_compiling() or torch.cuda.is_current_stream_capturing()):
        return "triton"  # cannot time here: the default until an eager pass has measured
    # Under DDP a backward outside its forward would fire the reducer's hooks: time forwards only.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    return choose(key, model_measure(model, x, training and not distributed))
