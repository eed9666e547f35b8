"""A bioimage.io model package (format 0.5) of a segmentation model: what deepImageJ, ilastik,
QuPath's bioimage.io support, napari and bioimageio.core run unchanged.

`export_bioimageio(model, "nuclei.zip")` writes one zip holding rdf.yaml and:
  weights.pt / weights.onnx  TorchScript and ONNX files of the reference path (engine.export)
  test_input.npy             a synthetic H&E tile, uint8 (1, C, S, S)
  test_output.npy            PyTorch's probabilities for it, float32 (1, K, S, S)
  cover.png                  a 256-pixel synthetic tile beside its predicted probability (2:1)
  README.md                  the model card, input scaling, pixel size and validation metrics
  config.json, model.safetensors   the bionet_fast folder: from_pretrained(zip) loads the same model

Input: uint8 images (8-bit RGB H&E, or grey), axes batch, channel, y, x with y and x of size
min + n * step, min = step = the model's size multiple (min twice that for reflect padding, which
needs two pixels at the bottleneck); preprocessing ensure_dtype float32 then
scale_linear gain 1/255 (the [0, 1] range the model was trained on: data.readers.to_float). Output:
the logits through sigmoid (one class) or softmax over channels, as postprocessing. Needs
bioimageio.spec (pip install 'bionet_fast[bioimageio]'); `bioimageio test NAME.zip` checks it.
"""
from __future__ import annotations

import shutil
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from ...data.synthetic import make_synthetic_nuclei
from ...models.hub import model_card_text
from ...models.pretrained import CONFIG_NAME, WEIGHTS_NAME, inference_info, save_pretrained
from ...utils.files import atomic_write
from .export import export, reference_copy

__all__ = ["BioimageioReport", "export_bioimageio", "CITATION_URL"]

CITATION_TEXT = ("Xiang T., Zhang C., Liu D., Song Y., Huang H., Cai W. BiO-Net: Learning Recurrent "
                 "Bi-directional Connections for Encoder-Decoder Architecture. MICCAI 2020.")
CITATION_URL = "https://arxiv.org/abs/2007.00243"
INPUT_ID, OUTPUT_ID = "image", "probability"
DTYPE_GAIN = {"uint8": 255.0, "uint16": 65535.0}  # input dtype -> the divisor to [0, 1]


@dataclass
class BioimageioReport:
    """What `export_bioimageio` wrote; max_abs_diff: weight format -> max |file - PyTorch| on the
    test input (probabilities)."""

    path: Path
    weight_formats: tuple = ("torchscript", "onnx")
    max_abs_diff: dict[str, float] = field(default_factory=dict)

    def summary(self) -> str:
        diffs = ", ".join(f"{k} {v:.2e}" for k, v in self.max_abs_diff.items())
        return (f"wrote the bioimage.io model package {self.path} ({' + '.join(self.weight_formats)} weights; "
                f"largest difference from PyTorch on the test tensor: {diffs}); check it with: "
                f"bioimageio test {self.path}")


def _spec():
    try:
        from bioimageio.spec.model import v0_5
    except ImportError as err:
        raise ImportError("a bioimage.io package needs bioimageio.spec: pip install 'bionet_fast[bioimageio]'"
                          ) from err
    return v0_5


def export_bioimageio(model: nn.Module, path: str | Path, *, name: Optional[str] = None,
                      mpp: Optional[float] = None, input_dtype: str = "uint8", test_size: Optional[int] = None,
                      authors: Sequence[str] = ("bionet_fast",), license: str = "MIT", opset: int = 18,
                      seed: int = 0, onnx_exporter: str = "auto") -> BioimageioReport:
    """Write `model` (a segmentation BiONet / BiOLinkNet) as the bioimage.io model package `path`
    (.zip); `onnx_exporter` as for `export`. `mpp`: the training pixel size in micrometres (None: not recorded); `input_dtype`:
    uint8 or uint16 (the divisor 255 or 65535 is the preprocessing); `test_size`: the test tile's
    side (default: the smallest multiple of the model's size multiple >= 64)."""
    path = Path(path)
    spec = _spec()
    info = inference_info(model)
    if info.task != "segmentation":
        raise ValueError(f"a bioimage.io package is written for segmentation models; this one is {info.task}: "
                         "export it with --format onnx or torchscript instead")
    if mpp is not None and not mpp > 0:
        raise ValueError(f"--mpp {mpp}: the training pixel size must be > 0 micrometres per pixel, e.g. 0.5")
    if input_dtype not in DTYPE_GAIN:
        raise ValueError(f"input_dtype={input_dtype!r}; choose one of {', '.join(DTYPE_GAIN)}")
    if path.suffix.lower() != ".zip":
        raise ValueError(f"--out {path}: a bioimage.io package is a .zip file; use e.g. {path.with_suffix('.zip')}")
    m = model.size_multiple
    side = test_size or -(-64 // m) * m
    if side % m:
        raise ValueError(f"test_size={side} is not a multiple of the model's size multiple {m}")
    with tempfile.TemporaryDirectory(prefix="bionet-bioimageio-") as tmp:
        folder = Path(tmp)
        x, probs = _test_tensors(model, side, input_dtype, seed)
        np.save(folder / "test_input.npy", x)
        np.save(folder / "test_output.npy", probs)
        cover_side = -(-256 // m) * m  # larger than the test tile, which is kept small for `bioimageio test`
        cover_x, cover_p = (x, probs) if cover_side <= side else _test_tensors(model, cover_side, input_dtype, seed)
        _cover(cover_x[0], cover_p[0], folder / "cover.png")
        samples = _samples(x[0], probs[0], folder)
        diffs = {}
        for fmt, fname in (("torchscript", "weights.pt"), ("onnx", "weights.onnx")):
            export(model, folder / fname, format=fmt, opset=opset, verify=False, onnx_exporter=onnx_exporter)
            diffs[fmt] = _max_diff(folder / fname, fmt, x, probs, input_dtype, model.config.classes)
        save_pretrained(model, folder, model_card=False)
        (folder / "README.md").write_text(_documentation(model, mpp, input_dtype))
        descr = _describe(spec, model, folder, name, mpp, input_dtype, authors, license, opset, samples)
        _save_package(descr, path)
    return BioimageioReport(path, ("torchscript", "onnx"), diffs)


def _test_tensors(model: nn.Module, side: int, input_dtype: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(uint8/uint16 input (1, C, S, S), PyTorch's float32 probabilities (1, K, S, S))."""
    c = model.config.in_channels
    if c in (1, 3):
        rgb = make_synthetic_nuclei(1, side, seed=seed, channels=c)[0][0]  # (S, S, C) uint8
    else:  # no H&E look-alike for other channel counts: a random image
        rgb = np.random.default_rng(seed).integers(0, 256, (side, side, c), dtype=np.uint8)
    x = rgb.transpose(2, 0, 1)[None].astype(input_dtype)
    if input_dtype == "uint16":
        x = x * np.uint16(257)  # the same image, 16-bit
    with torch.no_grad():
        logits = reference_copy(model)(torch.from_numpy(x.astype(np.float32) / DTYPE_GAIN[input_dtype]))
    probs = _activate(logits, model.config.classes)
    return np.ascontiguousarray(x), probs.numpy().astype(np.float32)


def _activate(logits: torch.Tensor, classes: int) -> torch.Tensor:
    return torch.sigmoid(logits) if classes == 1 else torch.softmax(logits, dim=1)


def _max_diff(weights: Path, fmt: str, x: np.ndarray, probs: np.ndarray, input_dtype: str, classes: int) -> float:
    """max |probabilities of the written file - PyTorch's| on the test input."""
    inp = x.astype(np.float32) / DTYPE_GAIN[input_dtype]
    if fmt == "torchscript":
        with torch.no_grad():
            out = torch.jit.load(str(weights)).eval()(torch.from_numpy(inp))
    else:
        try:
            import onnxruntime as ort
        except ImportError:
            return float("nan")
        session = ort.InferenceSession(str(weights), providers=["CPUExecutionProvider"])
        out = torch.from_numpy(session.run(None, {session.get_inputs()[0].name: inp})[0])
    return float(np.abs(_activate(out.float(), classes).numpy() - probs).max())


def _cover(image: np.ndarray, probs: np.ndarray, path: Path) -> None:
    """cover.png: the tile (C, S, S) beside its foreground probability as a red overlay (2:1)."""
    from PIL import Image

    img = image.astype(np.float32) / float(np.iinfo(image.dtype).max)
    rgb = np.repeat(img, 3, 0) if img.shape[0] == 1 else img[:3] if img.shape[0] >= 3 else np.repeat(img[:1], 3, 0)
    fg = probs[0] if probs.shape[0] == 1 else 1.0 - probs[0]
    over = rgb * (1 - 0.6 * fg) + np.stack([fg, np.zeros_like(fg), np.zeros_like(fg)]) * 0.6
    both = np.concatenate([rgb, over], axis=2).transpose(1, 2, 0)
    pic = Image.fromarray((np.clip(both, 0, 1) * 255).round().astype(np.uint8))
    scale = max(1, 256 // image.shape[1])  # at least 512 x 256: the website's cover size
    pic.resize((pic.width * scale, pic.height * scale), Image.NEAREST).save(path)


def _samples(image: np.ndarray, probs: np.ndarray, folder: Path) -> dict[str, Path]:
    """PNG sample tensors for people (the website shows them): the tile and, for one class, its
    probability as 8-bit grey; {} where PNG cannot hold them (other channel counts, 16-bit)."""
    from PIL import Image

    if image.dtype != np.uint8 or image.shape[0] not in (1, 3):
        return {}
    out = {INPUT_ID: folder / "sample_input.png"}
    Image.fromarray(image[0] if image.shape[0] == 1 else image.transpose(1, 2, 0)).save(out[INPUT_ID])
    if probs.shape[0] == 1:
        out[OUTPUT_ID] = folder / "sample_output.png"
        Image.fromarray((probs[0] * 255).round().astype(np.uint8)).save(out[OUTPUT_ID])
    return out


def _documentation(model: nn.Module, mpp: Optional[float], input_dtype: str) -> str:
    """README.md: the model card, then what a bioimage.io consumer needs to know."""
    info = inference_info(model)
    metrics = "\n".join(f"| {k} | {v:.4f} |" if isinstance(v, float) else f"| {k} | {v} |"
                        for k, v in sorted(info.metrics.items())) or "| - | not recorded |"
    pixel = f"{mpp} micrometres per pixel" if mpp else "not recorded (give --mpp when exporting)"
    card = model_card_text(model).split("\n---\n", 1)[-1]  # the Hub card without its YAML front matter
    return f"""{card}
## In this bioimage.io package

- Input `{INPUT_ID}`: {input_dtype} images, axes (batch, channel, y, x), {model.config.in_channels} channel(s);
  height and width multiples of {model.size_multiple}. Preprocessing: float32, divided by
  {DTYPE_GAIN[input_dtype]:g} (values in [0, 1], as in training). Training pixel size: {pixel}; images of
  another magnification should be rescaled to it first.
- Output `{OUTPUT_ID}`: {"the nucleus probability (sigmoid of the logits)" if model.config.classes == 1
                         else "class probabilities (softmax over channels)"}; a nucleus where it exceeds
  {info.threshold}. Touching nuclei are separated by bionet_fast's predict --instances, not by this package.
- Weights: TorchScript and ONNX of the plain PyTorch path; config.json + model.safetensors load back with
  `bionet_fast.from_pretrained("THIS.zip")`.

## Validation

Validation metrics recorded by the trainer (on its held-out validation images):

| metric | value |
|---|---|
{metrics}

Validate on your own images before use: compare the thresholded output with a few hand-annotated nuclei
(Dice, and object-level F1 after `python -m bionet_fast.evaluate`).
"""


def _describe(spec, model: nn.Module, folder: Path, name: Optional[str], mpp: Optional[float],
              input_dtype: str, authors: Sequence[str], license: str, opset: int, samples: dict[str, Path]):
    """The v0.5 ModelDescr of the files in `folder`."""
    sample = {k: spec.FileDescr(source=v) for k, v in samples.items()}
    cfg, info = model.config, inference_info(model)
    arch = getattr(model, "architecture", "bionet")
    m = model.size_multiple
    unit = {"unit": "micrometer", "scale": float(mpp)} if mpp else {}
    channels = {1: ["gray"], 3: ["red", "green", "blue"]}.get(cfg.in_channels,
                                                              [f"channel{i}" for i in range(cfg.in_channels)])
    classes = ["nucleus"] if cfg.classes == 1 else ["background"] + [f"class{i}" for i in range(1, cfg.classes)]
    # reflect padding needs 2 pixels at the bottleneck: the smallest side is then twice the multiple
    low = 2 * m if getattr(cfg, "padding_mode", "zeros") == "reflect" else m
    space_in = [spec.SpaceInputAxis(id=spec.AxisId(a), size=spec.ParameterizedSize(min=low, step=m), **unit)
                for a in ("y", "x")]
    space_out = [spec.SpaceOutputAxis(id=spec.AxisId(a), size=spec.SizeReference(
        tensor_id=spec.TensorId(INPUT_ID), axis_id=spec.AxisId(a)), **unit) for a in ("y", "x")]
    inp = spec.InputTensorDescr(
        id=spec.TensorId(INPUT_ID), description=f"{input_dtype} image, values scaled to [0, 1] by the preprocessing",
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in channels]), *space_in],
        test_tensor=spec.FileDescr(source=folder / "test_input.npy"), sample_tensor=sample.get(INPUT_ID),
        data=spec.IntervalOrRatioDataDescr(type=input_dtype),
        # `data` is the stored image; the closing ensure_dtype keeps the spec from casting back to it
        preprocessing=[spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32")),
                       spec.ScaleLinearDescr(kwargs=spec.ScaleLinearKwargs(gain=1.0 / DTYPE_GAIN[input_dtype])),
                       spec.EnsureDtypeDescr(kwargs=spec.EnsureDtypeKwargs(dtype="float32"))])
    post = (spec.SigmoidDescr() if cfg.classes == 1
            else spec.SoftmaxDescr(kwargs=spec.SoftmaxKwargs(axis=spec.AxisId("channel"))))
    out = spec.OutputTensorDescr(
        id=spec.TensorId(OUTPUT_ID), description="probabilities (the model's logits through the postprocessing)",
        axes=[spec.BatchAxis(), spec.ChannelAxis(channel_names=[spec.Identifier(c) for c in classes]), *space_out],
        test_tensor=spec.FileDescr(source=folder / "test_output.npy"), sample_tensor=sample.get(OUTPUT_ID),
        data=spec.IntervalOrRatioDataDescr(type="float32", range=(0.0, 1.0)),
        postprocessing=[post])
    version = torch.__version__.split("+")[0]
    weights = spec.WeightsDescr(
        torchscript=spec.TorchscriptWeightsDescr(source=folder / "weights.pt", pytorch_version=spec.Version(version),
                                                 comment="traced reference (PyTorch) path of bionet_fast"),
        onnx=spec.OnnxWeightsDescr(source=folder / "weights.onnx", opset_version=opset, parent="torchscript",
                                   comment="exported from the same PyTorch model as the TorchScript file"))
    n_params = sum(p.numel() for p in model.parameters())
    bio = spec.BioimageioConfig(
        architecture_type=arch, architecture_description=f"{arch}, t={cfg.iterations} recurrent iterations",
        modality="brightfield H&E histology", target_structure=["nuclei"], task="semantic segmentation",
        model_parameter_count=n_params)
    return spec.ModelDescr(
        name=name or f"BiO-Net nuclei {arch} t{cfg.iterations}",
        description=f"Nuclei segmentation with a {arch} (t={cfg.iterations}) trained with bionet_fast",
        authors=[spec.Author(name=a) for a in authors],
        cite=[spec.CiteEntry(text=CITATION_TEXT, url=spec.HttpUrl(CITATION_URL))],
        license=spec.LicenseId(license),
        documentation=spec.FileDescr(source=folder / "README.md"),
        covers=[spec.FileDescr(source=folder / "cover.png")],
        tags=["nuclei", "segmentation", "2d", "histology", "h&e", "pytorch", "bionet"],
        attachments=[spec.FileDescr(source=folder / CONFIG_NAME), spec.FileDescr(source=folder / WEIGHTS_NAME)],
        inputs=[inp], outputs=[out], weights=weights,
        config=spec.Config(bioimageio=bio, bionet_fast={
            "architecture": arch, "threshold": info.threshold, "tile_size": info.tile_size,
            "size_multiple": m, "pixel_size_um": mpp, "validation_metrics": dict(info.metrics)}),
    )


def _save_package(descr, path: Path) -> None:
    """Zip the description and its files as `path`, atomically (a temporary .zip, then renamed)."""
    from bioimageio.spec import save_bioimageio_package

    def write(tmp: str) -> None:
        with tempfile.TemporaryDirectory(prefix="bionet-zip-") as d:
            staged = Path(d) / path.name
            # stored, not deflated: float weights barely compress and deflating them was 6x slower
            save_bioimageio_package(descr, output_path=staged, compression=zipfile.ZIP_STORED)
            shutil.copyfile(staged, tmp)

    atomic_write(path, write)
