"""bionet_fast: a fast, lean BiO-Net (MICCAI 2020) in PyTorch and Triton.

The top-level ``kernels/`` folder installs as ``bionet_fast.kernels``: PyPI's ``kernels``
package owns the top-level name, and the kernels are an implementation detail of the
fused blocks, not a library of their own.

Dependencies: inference (evaluate, predict, export to TorchScript) needs only the install
requirements; training adds ``[train]`` (no triton, no kornia); the Hub, ONNX and whole-slide
readers are extras; ``[test]`` is everything the test suite needs (the docs build included).
"""
from setuptools import find_packages, setup

# scipy: predict's objects; scikit-image: Aperio XML / QuPath GeoJSON annotations drawn as labels
INSTANCES = ["scipy", "scikit-image"]
# training on the CPU: no triton (torch's CUDA wheels bring their own), no kornia (tests only);
# imagecodecs and the instance extras, so that real annotated data (MoNuSeg's XML, QuPath's GeoJSON)
# trains as installed; huggingface_hub writes the saved folders' model cards
TRAIN = ["matplotlib", "tqdm", "PyYAML", "imagecodecs", "scipy", "scikit-image", "huggingface_hub"]
HUB = ["huggingface_hub"]
# onnxscript: torch.onnx.export(dynamo=True), the default ONNX exporter
ONNX = ["onnx", "onnxscript", "onnxruntime"]
DOCS = ["mkdocs"]
# the CPU engine of predict / evaluate (engine.engines); onnx: the faster conversion route
OPENVINO = ["openvino", "onnx"]
# bioimage.io packages (export --format bioimageio) and their validator (`bioimageio test`): green with
# bioimageio.spec 0.5.12.0 + pydantic 2.13.4; pydantic 2.14 breaks the spec's own serializer
# (package_file_descr_serializer: "'index_key' is expected to be an integer or a string")
BIOIMAGEIO = ["bioimageio.core>=0.11", "bioimageio.spec>=0.5.12", "pydantic>=2.11,<2.14", *ONNX]
# the napari plugin (bionet_fast/napari, npe2 manifest); its tests add pytest-qt and need Xvfb + Mesa
NAPARI = ["napari[pyqt6]>=0.5", "npe2", *INSTANCES]

setup(
    name="bionet_fast",
    version="0.1.0",
    description="BiO-Net (bi-directional O-shape U-Net) with fused Triton kernels and "
    "activation checkpointing across recurrent iterations",
    python_requires=">=3.10",
    packages=sorted({*find_packages(include=["bionet_fast", "bionet_fast.*"]), "bionet_fast.kernels"}),
    package_dir={"bionet_fast.kernels": "kernels"},
    package_data={"bionet_fast.napari": ["napari.yaml"]},
    entry_points={"napari.manifest": ["bionet_fast = bionet_fast.napari:napari.yaml"]},
    install_requires=[
        "torch>=2.4",
        "numpy",
        "safetensors",
        "Pillow",
        "tifffile",
        # tifffile's codecs: LZW (MoNuSeg's TIFFs), JPEG, JPEG 2000, deflate ... are imagecodecs'
        "imagecodecs",
    ],
    extras_require={
        "train": TRAIN,
        "hub": HUB,
        "onnx": ONNX,
        "openvino": OPENVINO,
        # predict --instances / --geojson / --measurements; training on Aperio XML / QuPath GeoJSON
        "instances": INSTANCES,
        # predict --rois: ImageJ ROI zip
        "rois": ["roifile"],
        # SVS / NDPI / MRXS whole slides (TIFF, BigTIFF, OME-TIFF need only tifffile)
        "slides": ["tiffslide"],
        # Triton ships with CUDA builds of torch; on the CPU it runs the kernels in its interpreter.
        "triton": ["triton"],
        "bench": ["pytest-benchmark", "nvidia-ml-py"],
        "docs": DOCS,
        "bioimageio": BIOIMAGEIO,
        "napari": NAPARI,
        # kornia only to check the torch augmentation against its warp_affine
        "test": ["pytest", "hypothesis", "triton", "pytest-benchmark", "kornia", *TRAIN, *HUB, *ONNX,
                 *INSTANCES, *DOCS, *OPENVINO, *BIOIMAGEIO, *NAPARI, "roifile", "pytest-qt"],
    },
)
