"""The inference engine of predict, evaluate and sliding_window_inference: torch (eager, bf16
autocast + channels_last, CUDA graphs), OpenVINO or onnxruntime (CPU only).

`auto` is OpenVINO on a CPU device where the openvino package is installed (pip install
'bionet_fast[openvino]'), torch otherwise and on GPUs. Every engine is a callable with the model's
own interface, windows (N, C, H, W) -> logits (N, K, H, W), so the tiler (engine.tiling) and the
streaming whole-slide path (engine.streaming) run it unchanged: `InferenceSetup.forward` replaces
model(windows) exactly where a CUDA graph does. A model that OpenVINO or onnxruntime cannot run
falls back to torch with one line on stderr saying why.
"""
from __future__ import annotations

import contextlib
import importlib.util
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import openvino_engine
from ..cpu_threads import default_threads
from ..cuda_graph import graphed_forward
from ..precision import autocast_context, prepare_model, resolve_precision

ENGINES = ("auto", "torch", "openvino", "onnxruntime")
_INSTALL = {"openvino": "pip install 'bionet_fast[openvino]'", "onnxruntime": "pip install 'bionet_fast[onnx]'"}

__all__ = ["ENGINES", "InferenceSetup", "engine_predictor", "inference_setup", "resolve_engine"]


def installed(engine: str) -> bool:
    """Whether `engine`'s runtime can be imported (torch always)."""
    if engine == "openvino":
        return openvino_engine.installed()
    if engine == "onnxruntime":
        try:
            return importlib.util.find_spec("onnxruntime") is not None
        except (ImportError, ValueError):
            return False
    return True


def resolve_engine(engine: str, device: torch.device) -> str:
    """The engine that runs: `auto` -> "openvino" on a CPU device where it is installed, else "torch".
    An explicit OpenVINO / onnxruntime on a GPU device, or not installed, is a ValueError naming the
    fix."""
    if engine not in ENGINES:
        raise ValueError(f"--engine {engine}: use one of {', '.join(ENGINES)}")
    device = torch.device(device)
    if engine == "auto":
        return "openvino" if device.type == "cpu" and installed("openvino") else "torch"
    if engine != "torch" and device.type != "cpu":
        raise ValueError(f"--engine {engine} runs on the CPU; use --device cpu, or --engine torch on {device}")
    if not installed(engine):
        raise ValueError(f"--engine {engine}: the {engine} package is not installed; {_INSTALL[engine]}, "
                         "or use --engine torch")
    return engine


@dataclass
class InferenceSetup:
    """How windows run: `forward` replaces model(windows) (None: the model itself), under `autocast`
    (None: fp32), channels_last or not. `precision` is what the engine computes in; `note` says why
    an engine fell back to torch (None when it did not)."""

    engine: str
    precision: str
    forward: Optional[Callable[[torch.Tensor], torch.Tensor]]
    autocast: Any
    channels_last: bool
    threads: Optional[int] = None
    note: Optional[str] = None

    def describe(self) -> str:
        threads = f", {self.threads} thread(s)" if self.threads else ""
        return f"engine {self.engine}, precision {self.precision}{threads}"


def inference_setup(model: nn.Module, device: torch.device, engine: str = "auto", precision: Optional[str] = None,
                    threads: Optional[int] = None, cuda_graph: bool = False) -> InferenceSetup:
    """Resolve engine, precision (None: bf16 where native, see engine.precision) and CPU threads
    (None: engine.cpu_threads.default_threads; torch's own count is set too) and prepare the model
    for them. OpenVINO / onnxruntime are converted from `model` here (once per process)."""
    device = torch.device(device)
    precision = resolve_precision(precision, device)
    name = resolve_engine(engine, device)
    if device.type == "cpu":
        threads = threads or default_threads()
        torch.set_num_threads(threads)
    else:
        threads = None
    note = None
    if name != "torch":
        graphed_forward(model, device, cuda_graph)  # on the CPU: its one line saying the flag does nothing
        try:
            forward, used = _compiled_forward(model, name, precision, threads)
            return InferenceSetup(name, used, forward, None, False, threads)
        except Exception as err:  # noqa: BLE001 - whatever the converter says, torch still runs the model
            first = (str(err).strip().splitlines() or [""])[0][:200]
            note = f"{name} cannot run this model ({type(err).__name__}: {first}); running it with torch"
            print(f"note: {note}", file=sys.stderr)
    channels_last = precision != "fp32"
    prepare_model(model, channels_last)
    return InferenceSetup("torch", precision, graphed_forward(model, device, cuda_graph),
                          autocast_context(precision, device), channels_last, threads, note)


def _compiled_forward(model: nn.Module, engine: str, precision: str, threads: Optional[int]):
    """(forward, precision it computes in) of `engine` for `model`."""
    side = getattr(model.config, "min_side", 0)
    if engine == "openvino":
        forward = openvino_engine.openvino_forward(model, precision, threads)
        if forward.precision != precision:
            print(f"note: OpenVINO runs {forward.precision} on this CPU (no native {precision})", file=sys.stderr)
        return _padded_up(forward, side), forward.precision
    if precision != "fp32":
        print(f"note: onnxruntime runs fp32 on the CPU (no {precision} convolutions); --precision {precision} "
              "ignored", file=sys.stderr)
    return _padded_up(OnnxRuntimeForward(model, threads), side), "fp32"


def _padded_up(forward: Callable[[torch.Tensor], torch.Tensor], side: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """`forward` with BiONet.forward's rule for inputs below the model's min_side (replicated edges
    up to it, the output cropped back): that rule is Python control flow, which a converted graph
    (traced at a larger size) does not hold."""
    def run(x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        if h >= side and w >= side:
            return forward(x)
        padded = torch.nn.functional.pad(x, (0, max(side - w, 0), 0, max(side - h, 0)), mode="replicate")
        return forward(padded)[..., :h, :w]

    return run


class OnnxRuntimeForward:
    """The model exported to ONNX (engine.export, dynamic batch / height / width) in an onnxruntime
    CPU session: float (N, C, H, W) -> float32 logits."""

    def __init__(self, model: nn.Module, threads: Optional[int] = None):
        import onnxruntime as ort

        from .export import INPUT_NAME, _reference_backend, _write_onnx_torchscript, default_sizes, reference_copy

        ref = reference_copy(model)
        x = torch.rand(default_sizes(ref, ref.config.in_channels)[0])
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or 0
        options.inter_op_num_threads = 1
        with tempfile.TemporaryDirectory() as tmp, _reference_backend(), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            path = Path(tmp) / "model.onnx"
            _write_onnx_torchscript(ref, x, path, 17)
            self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = INPUT_NAME

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {self.input_name: arr})[0])


def engine_predictor(model: nn.Module, engine: str = "auto", precision: Optional[str] = None,
                     threads: Optional[int] = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """windows (N, C, H, W) -> `model`'s logits (N, K, H, W), float32, through `engine` (on the
    model's device; see `inference_setup`; threads default to torch.get_num_threads()): what
    sliding_window_inference(..., engine=) runs."""
    if not hasattr(model, "config") or not hasattr(model, "size_multiple"):
        raise ValueError(f"engine={engine!r} needs a bionet_fast model as the predictor (got "
                         f"{type(model).__name__}); use engine='torch' for other callables")
    device = next(model.parameters()).device
    # threads: torch's current count unless given (no idle-CPU sampling on every call)
    setup = inference_setup(model, device, engine, precision, threads or torch.get_num_threads())
    net = setup.forward or model

    def run(windows: torch.Tensor) -> torch.Tensor:
        if setup.channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last)
        with setup.autocast or contextlib.nullcontext():
            return net(windows).float()

    run.setup = setup  # what ran, for callers that report it
    return run
