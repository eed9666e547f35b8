"""The official PyTorch port's numbers (reference/anchors.md): one NVIDIA H200, torch 2.11.0+cu130,
triton 3.6.0, batch 2 unless noted, 3x512x512, BCE, Adam, medians of 8-10 steps after warm-up.
Shown beside our numbers, always marked "official port, H200, another run"."""
from __future__ import annotations

LABEL = "official port, H200, another run"

# (variant, dtype, checkpoint_iters, batch, t) -> (train step ms, peak MiB, note)
TRAIN = {
    ("eager", "fp32", False, 2, 1): (20.4, 1731, ""),
    ("eager", "fp32", False, 2, 3): (39.4, 3142, "54.9 in a second run"),
    ("eager", "fp32", False, 2, 5): (72.1, 4609, ""),
    ("eager", "fp32", False, 2, 8): (110.6, 6805, ""),
    ("graph", "fp32", False, 2, 3): (38.1, 3194, ""),
    ("eager", "bf16", False, 2, 3): (38.1, 1738, "58.9 in a second run"),
    ("graph", "bf16", False, 2, 3): (20.1, 1787, ""),
    ("graph", "bf16", False, 2, 8): (44.7, 3700, ""),
    ("compile-default", "fp32", False, 2, 3): (40.0, 2806, "78 s to compile"),
    ("compile-default", "bf16", False, 2, 3): (44.1, 1521, "69 s to compile"),
    ("eager", "fp32", True, 2, 3): (92, 1521, ""),
    ("eager", "fp32", True, 2, 8): (189, 1688, ""),
    ("eager", "fp32", True, 2, 12): (291, 2065, ""),
    ("eager", "bf16", True, 2, 3): (81, 916, ""),
    ("eager", "bf16", True, 2, 8): (172, 994, ""),
    ("graph", "fp32", False, 8, 3): (123, 12068, ""),
    ("graph", "bf16", False, 8, 3): (55, 6335, ""),
}

# eval forward, no grad, fp32 eager, batch 2: t -> ms
INFER_FP32_B2 = {1: 5.2, 2: 8.1, 3: 10.8}

# largest t (searched up to 64) whose two train steps fit under an 8 GiB cap: (dtype, ckpt, batch)
CAP_8GIB = {
    ("fp32", False, 2): "9", ("fp32", False, 8): "1",
    ("bf16", False, 2): "19", ("bf16", False, 8): "4",
    ("fp32", True, 2): ">= 64", ("fp32", True, 8): "12",
    ("bf16", True, 2): ">= 64", ("bf16", True, 8): "32",
}
