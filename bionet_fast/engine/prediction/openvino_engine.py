"""OpenVINO as the CPU inference engine: the PyTorch model converted once, compiled at a precision
and a thread count, and called like the model (windows (N, C, H, W) -> logits (N, K, H, W)).

Conversion is engine.export.to_openvino: the project's own ONNX export (the reference path, dynamic
batch, height and width) and `openvino.convert_model` of that file; measured on this repository's
CPU, it takes about half the CPU time of `convert_model` on the PyTorch module (3.5 s against 6-7 s
for the default model), and both give the same graph (max probability difference from torch fp32
6e-8). Without the `onnx` package the PyTorch module is converted directly.

Two caches, both under `cache_root()` (~/.cache/bionet_fast/openvino unless BIONET_FAST_OPENVINO_CACHE
names another folder, or "off"): the converted IR (`models/<key>/model.xml + .bin`, key = a hash of
the architecture, config, weights and library versions), so a second process skips the conversion,
and OpenVINO's own compiled-model cache (`compiled/`, its CACHE_DIR), so it skips most of the
compilation. An unreadable cache entry is deleted and rebuilt; an unwritable cache folder is used
as no cache. Within one process a compiled model is kept per (weights, precision, threads).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import nn

from .export import openvino_route, reference_copy, to_openvino

CACHE_ENV = "BIONET_FAST_OPENVINO_CACHE"
_OFF = ("", "0", "off", "none", "false")
_HINTS = {"fp32": "f32", "bf16": "bf16"}
_COMPILED: dict[tuple, object] = {}  # (model key, precision, threads) -> CompiledModel, this process


def installed() -> bool:
    """Whether the openvino package can be imported (False where it is hidden or absent)."""
    try:
        return importlib.util.find_spec("openvino") is not None
    except (ImportError, ValueError):  # sys.modules["openvino"] = None hides it
        return False


def cache_root() -> Optional[Path]:
    """The cache folder: $BIONET_FAST_OPENVINO_CACHE ("off" = none), else
    $XDG_CACHE_HOME/bionet_fast/openvino, else ~/.cache/bionet_fast/openvino."""
    given = os.environ.get(CACHE_ENV)
    if given is not None:
        return None if given.strip().lower() in _OFF else Path(given).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "bionet_fast" / "openvino"


def model_key(ref: nn.Module) -> str:
    """A hash of what the converted graph depends on: architecture, config, every weight and
    running statistic, and the torch / OpenVINO versions."""
    import openvino as ov

    h = hashlib.sha256()
    cfg = ref.config.to_dict() if hasattr(ref.config, "to_dict") else vars(ref.config)
    h.update(json.dumps([getattr(ref, "architecture", type(ref).__name__), cfg, torch.__version__,
                         ov.__version__, openvino_route()], sort_keys=True, default=str).encode())
    for name, value in ref.state_dict().items():
        h.update(name.encode())
        h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:32]


def load_ir(ref: nn.Module, key: str, root: Optional[Path]):
    """The converted model of `ref`: read from the IR cache when it holds a readable entry for `key`,
    else converted (and stored there when there is a writable cache)."""
    import openvino as ov

    folder = root / "models" / key if root is not None else None
    if folder is not None and (folder / "model.xml").is_file():
        try:
            return ov.Core().read_model(str(folder / "model.xml"))
        except Exception as err:  # noqa: BLE001 - any damage: rebuild
            print(f"note: the OpenVINO cache entry {folder} is unreadable ({type(err).__name__}); rebuilding it",
                  file=sys.stderr)
            shutil.rmtree(folder, ignore_errors=True)
    model = to_openvino(ref)
    if folder is not None:
        _store(model, folder)
    return model


def _store(model, folder: Path) -> None:
    """Save the IR into `folder` atomically (a temporary folder beside it, then a rename); a cache
    that cannot be written is skipped."""
    import openvino as ov

    tmp = None
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        ov.save_model(model, str(tmp / "model.xml"), compress_to_fp16=False)
        os.replace(tmp, folder)
    except OSError:  # unwritable, or another process stored it first
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def compile_model(model, precision: str = "fp32", threads: Optional[int] = None, root: Optional[Path] = None):
    """`model` compiled for the CPU with INFERENCE_PRECISION_HINT (fp32 -> f32, bf16 -> bf16: on
    CPUs without native bf16 OpenVINO runs f32), INFERENCE_NUM_THREADS and, with a cache, CACHE_DIR.
    A compiled cache that fails is deleted and the model compiled afresh."""
    import openvino as ov

    if precision not in _HINTS:
        raise ValueError(f"precision={precision!r}: OpenVINO on the CPU runs fp32 or bf16")
    config = {"INFERENCE_PRECISION_HINT": _HINTS[precision], "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    core = ov.Core()
    compiled_dir = root / "compiled" if root is not None else None
    if compiled_dir is not None and _writable(compiled_dir):
        try:
            return core.compile_model(model, "CPU", {**config, "CACHE_DIR": str(compiled_dir)})
        except Exception as err:  # noqa: BLE001 - a damaged blob: clear the cache, compile afresh
            print(f"note: the OpenVINO compiled cache {compiled_dir} failed ({type(err).__name__}); "
                  "clearing it", file=sys.stderr)
            shutil.rmtree(compiled_dir, ignore_errors=True)
    return core.compile_model(model, "CPU", config)


def _writable(folder: Path) -> bool:
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        return False
    return os.access(folder, os.W_OK)


def effective_precision(compiled, asked: str) -> str:
    """What the compiled model computes in: OpenVINO runs f32 where bf16 was asked on a CPU without
    it."""
    try:
        hint = str(compiled.get_property("INFERENCE_PRECISION_HINT"))
    except Exception:  # noqa: BLE001 - a runtime that does not report it: trust the request
        return asked
    return "bf16" if "bfloat16" in hint or "bf16" in hint else "fp32" if "32" in hint else asked


class OpenVINOForward:
    """A compiled model called like the PyTorch one: float (N, C, H, W) -> float32 logits
    (N, K, H', W') on the CPU (sides multiples of the model's size_multiple)."""

    def __init__(self, compiled, precision: str, threads: Optional[int]):
        self.compiled, self.threads = compiled, threads
        self.precision = effective_precision(compiled, precision)
        self.request = compiled.create_infer_request()
        self.output = compiled.output(0)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        out = self.request.infer({0: arr}, share_inputs=True)[self.output]  # a copy (share_outputs=False)
        return torch.from_numpy(out if out.dtype == np.float32 else out.astype(np.float32))


def openvino_forward(model: nn.Module, precision: str = "fp32", threads: Optional[int] = None) -> OpenVINOForward:
    """`model` (any backend, device, dtype) as an OpenVINOForward at `precision` and `threads`:
    converted and compiled once per process (and per cache folder across processes)."""
    ref = reference_copy(model)
    key = model_key(ref)
    root = cache_root()
    memo = (key, precision, threads, str(root))
    if memo not in _COMPILED:
        _COMPILED[memo] = compile_model(load_ir(ref, key, root), precision, threads, root)
    return OpenVINOForward(_COMPILED[memo], precision, threads)


def clear_memo() -> None:
    """Forget the compiled models of this process (the next call reads the disk cache)."""
    _COMPILED.clear()


def read_metadata(path: str | Path) -> dict:
    """The export metadata stored in an IR's rt_info."""
    import openvino as ov

    return json.loads(ov.Core().read_model(str(path)).get_rt_info(["bionet_fast", "metadata"]).astype(str))
