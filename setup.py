"""bionet_fast: a fast, lean BiO-Net (MICCAI 2020) in PyTorch and Triton.

The top-level ``kernels/`` folder installs as ``bionet_fast.kernels``: PyPI's ``kernels``
package owns the top-level name, and the kernels are an implementation detail of the
fused blocks, not a library of their own.

Dependencies: inference (evaluate, predict, export to TorchScript) needs only the install
requirements; training adds ``[train]``; the Hub, ONNX and whole-slide readers are extras.
"""
from setuptools import setup

TRAIN = ["matplotlib", "tqdm", "PyYAML"]
HUB = ["huggingface_hub"]
ONNX = ["onnx", "onnxruntime"]
INSTANCES = ["scipy", "scikit-image"]

setup(
    name="bionet_fast",
    version="0.1.0",
    description="BiO-Net (bi-directional O-shape U-Net) with fused Triton kernels and "
    "activation checkpointing across recurrent iterations",
    python_requires=">=3.10",
    packages=["bionet_fast", "bionet_fast.blocks", "bionet_fast.data", "bionet_fast.engine",
              "bionet_fast.models", "bionet_fast.utils", "bionet_fast.kernels"],
    package_dir={"bionet_fast.kernels": "kernels"},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "Pillow",
        "tifffile",
    ],
    extras_require={
        "train": TRAIN,
        "hub": HUB,
        "onnx": ONNX,
        # predict --instances / --geojson / --measurements (scikit-image: the watershed split)
        "instances": INSTANCES,
        # SVS / NDPI / MRXS whole slides (TIFF, BigTIFF, OME-TIFF need only tifffile)
        "slides": ["tiffslide"],
        # Triton ships with CUDA builds of torch; on the CPU it runs the kernels in its interpreter.
        "triton": ["triton"],
        "bench": ["pytest-benchmark", "nvidia-ml-py"],
        # kornia only to check the torch augmentation against its warp_affine
        "test": ["pytest", "hypothesis", "triton", "pytest-benchmark", "kornia", *TRAIN, *HUB, *ONNX,
                 *INSTANCES],
    },
)
