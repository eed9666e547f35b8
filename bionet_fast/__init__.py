"""bionet_fast: the fastest, leanest BiO-Net (MICCAI 2020).

Public API:
    BiONet, BiONetConfig          the model (reference or fused Triton backend) and its config
    create_model, from_pretrained build any architecture by name / load any saved folder
    load_official                 import a checkpoint of the official PyTorch port
    peak_step_memory              peak bytes of one training step (CUDA allocator, or a CPU count)
    saved_activation_bytes        bytes a train-mode forward keeps for backward
    sliding_window_inference      tiled, blended inference on images of any size

Layers (each imports only those below it): the CLIs (train, evaluate, predict) -> engine ->
models -> blocks -> kernels; data, metrics and utils are leaves.
"""
from .engine.memory import peak_step_memory, saved_activation_bytes
from .engine.tiling import sliding_window_inference
from .models import BiONet, BiONetConfig, create_model, from_pretrained, load_official

__all__ = ["BiONet", "BiONetConfig", "create_model", "from_pretrained", "load_official",
           "peak_step_memory", "saved_activation_bytes", "sliding_window_inference"]
__version__ = "0.1.0"
