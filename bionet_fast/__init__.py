"""bionet_fast: the fastest, leanest BiO-Net (MICCAI 2020).

Public API:
    BiONet, BiONetConfig          the model (reference or fused Triton backend) and its config
    load_official                 import a checkpoint of the official PyTorch port
    peak_step_memory              peak bytes of one training step (CUDA allocator, or a CPU count)
    saved_activation_bytes        bytes a train-mode forward keeps for backward
    sliding_window_inference      tiled, blended inference on images of any size
"""
from .config import BiONetConfig
from .memory import peak_step_memory, saved_activation_bytes
from .model import BiONet
from .official import load_official
from .tiling import sliding_window_inference

__all__ = ["BiONet", "BiONetConfig", "load_official", "peak_step_memory", "saved_activation_bytes",
           "sliding_window_inference"]
__version__ = "0.1.0"
