"""Triton kernels of bionet_fast (installed as ``bionet_fast.kernels``).

Forward: ``conv_fwd`` (fused two-input 3x3 conv + bias + ReLU + BatchNorm partial statistics),
``bn_stats`` (per-channel statistics, BatchNorm finalize / eval affine).
Backward: ``conv_bwd`` (dgrad / wgrad).
Each module imports triton; importing this package alone does not.
"""
