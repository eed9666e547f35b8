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
"""
import os as _os

# OpenMP threads that spin while they wait make torch many times slower on a CPU shared with another
# job (engine/cpu_threads.py); this must be set before torch loads its OpenMP runtime. Yours wins.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# The names below load on first use (PEP 562): napari's plugin discovery imports this package to find
# bionet_fast/napari/napari.yaml, and a napari start must not pay for importing torch.
_LAZY = {"export": ".engine.export", "peak_step_memory": ".engine.memory", "saved_activation_bytes": ".engine.memory",
         "plan_memory": ".engine.planner", "sliding_window_inference": ".engine.tiling",
         **dict.fromkeys(("BiOLinkNet", "BiOLinkNetConfig", "BiONet", "BiONetConfig", "create_model",
                          "from_pretrained", "load_official"), ".models")}

__all__ = ["BiOLinkNet", "BiOLinkNetConfig", "BiONet", "BiONetConfig", "create_model", "export", "from_pretrained",
           "load_official",
           "peak_step_memory", "plan_memory", "saved_activation_bytes", "sliding_window_inference"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'bionet_fast' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value  # cached (`import bionet_fast.export` later rebinds `export` to the callable CLI module)
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
