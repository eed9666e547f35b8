"""bionet_fast: the fastest, leanest BiO-Net (MICCAI 2020).

Public API:
    BiONet, BiONetConfig          the model (reference or fused Triton backend) and its config
    BiOLinkNet, BiOLinkNetConfig  LinkNet with BiO-Net's recurrence (PyTorch path) and its config
    create_model, from_pretrained build any architecture by name / load any saved folder
    load_official                 import a checkpoint of the official PyTorch port
    peak_step_memory              peak bytes of one training step (CUDA allocator, or a CPU count)
    saved_activation_bytes        bytes a train-mode forward keeps for backward
    plan_memory                   predict a training step's memory, pick the checkpointing that fits
    sliding_window_inference      tiled, blended inference on images of any size
    export                        one ONNX / TorchScript / ExportedProgram file (+ JSON) of a model

Layers (each imports only those below it): the CLIs (train, evaluate, predict) -> engine ->
models -> blocks -> kernels; data, metrics and utils are leaves.

Importing the package has no side effect on the process: nothing is set in os.environ, and torch is
loaded only when a name above is first used (PEP 562), so that `python -m bionet_fast.train` can
choose its own process's OpenMP settings before torch loads (bionet_fast/_process.py).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_LAZY = {
    "export": "bionet_fast.engine.prediction.export",
    "peak_step_memory": "bionet_fast.engine.planning.memory",
    "saved_activation_bytes": "bionet_fast.engine.planning.memory",
    "plan_memory": "bionet_fast.engine.planning.planner",
    "sliding_window_inference": "bionet_fast.engine.prediction.tiling",
    **{name: "bionet_fast.models" for name in ("BiOLinkNet", "BiOLinkNetConfig", "BiONet", "BiONetConfig",
                                                "create_model", "from_pretrained", "load_official")},
}
_SUBPACKAGES = ("blocks", "data", "engine", "kernels", "metrics", "models", "utils")

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load on first use
    from .engine.prediction.export import export
    from .engine.planning.memory import peak_step_memory, saved_activation_bytes
    from .engine.planning.planner import plan_memory
    from .engine.prediction.tiling import sliding_window_inference
    from .models import (BiOLinkNet, BiOLinkNetConfig, BiONet, BiONetConfig, create_model, from_pretrained,
                         load_official)

__all__ = ["BiOLinkNet", "BiOLinkNetConfig", "BiONet", "BiONetConfig", "create_model", "export", "from_pretrained",
           "load_official",
           "peak_step_memory", "plan_memory", "saved_activation_bytes", "sliding_window_inference"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value  # later lookups skip this function
        return value
    if name in _SUBPACKAGES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
