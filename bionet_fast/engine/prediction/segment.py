"""One in-memory image -> nucleus labels and probabilities, through exactly the code path of
`python -m bionet_fast.predict --instances` (streamed windows, blending, engine.instances), for
callers that hold the image as an array: the napari widget, notebooks.

    model = load_model("runs/bionet-t5")           # or from_pretrained(...), a .zip package, a Hub id
    result = segment_array(model, rgb)              # rgb (H, W, 3) uint8
    result.labels                                   # (H, W) uint16 nuclei (uint32 past 65535 of them)
    result.probability                              # (H, W) float32 (several classes: (K, H, W))

Whatever options predict's instances take (OutputOptions fields, e.g. a split of touching nuclei
where it exists) pass through as keywords: `segment_array(model, rgb, **{"split": True})`.
"""
from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch

from .inference import pick_device, window_predictor
from .engines import inference_setup
from .pixel_size import SlideGeometry, min_area_pixels
from .slide import ArrayReader
from .split import SplitOptions, resolve_split
from .streaming import StreamOptions, count_windows
from .whole_slide import OutputOptions, predict_image

__all__ = ["Segmentation", "segment_array", "instance_options"]


@dataclass
class Segmentation:
    """labels (H, W) uint16 (uint32 when there are more nuclei), probability (H, W) float32 for one
    class, (K, H, W) for several; count: the number of nuclei; threshold: the one used."""

    labels: np.ndarray
    probability: np.ndarray
    count: int
    threshold: float


def instance_options() -> set[str]:
    """The names of predict's instance options beyond the basics (e.g. "split" where a watershed split
    of touching nuclei exists): what `segment_array` passes through and a GUI may offer."""
    basic = {"prob_format", "instances", "geojson", "measurements", "threshold", "target", "class_names"}
    return {f.name for f in dataclasses.fields(OutputOptions)} - basic


def segment_array(model: torch.nn.Module, image: np.ndarray, *, tile_size: Optional[int] = None,
                  overlap: float = 0.25, batch_size: int = 4, threshold: Optional[float] = None,
                  precision: Optional[str] = None, device: Optional[str] = None, engine: str = "auto",
                  progress: Optional[Callable[[int, int], None]] = None, **instance_kw: Any) -> Segmentation:
    """Segment `image` (H, W) grey or (H, W, C), any dtype (scaled as predict scales files) with
    `model` (a segmentation model). tile_size, threshold: None = the model's own (config.json);
    precision: None = predict's default for the device; device: None = the model's; engine: as
    predict's --engine (auto: OpenVINO on a CPU where installed). `progress(done,
    total)` is called after every batch of windows (from the calling thread). `instance_kw`: further
    OutputOptions fields (see `instance_options()`), e.g. min_area."""
    if image.ndim not in (2, 3) or image.shape[0] < 1 or image.shape[1] < 1:
        raise ValueError(f"expected a 2-D image (H, W) or (H, W, C), got shape {image.shape}; "
                         "pick one plane of a stack first")
    unknown = set(instance_kw) - instance_options()
    if unknown:
        raise ValueError(f"unknown instance option(s) {', '.join(sorted(unknown))}; this version has "
                         f"{', '.join(sorted(instance_options())) or 'none'}")
    info = getattr(model, "inference_info", None)
    tile = tile_size or (info.tile_size if info is not None and info.tile_size else 512)
    thr = threshold if threshold is not None else (info.threshold if info is not None else 0.5)
    if tile < model.size_multiple:
        raise ValueError(f"window size {tile}: the model needs windows of at least {model.size_multiple} pixels")
    dev = pick_device(device) if device else next(model.parameters()).device
    model = model.to(dev).eval()
    setup = inference_setup(model, dev, engine, precision)  # predict's choices: engine, precision, layout
    run = window_predictor(model, "segmentation", setup.autocast, setup.channels_last, setup.forward)
    h, w = image.shape[:2]
    total = count_windows(h, w, tile, overlap, model.size_multiple)
    done = [0]

    def predictor(windows: torch.Tensor) -> torch.Tensor:
        out = run(windows)
        done[0] += windows.shape[0]
        if progress is not None:
            progress(done[0], total)
        return out

    cfg = model.config
    # predict's default --min-area (15 px: an array carries no pixel size)
    instance_kw.setdefault("min_area", min_area_pixels(None, SlideGeometry((h, w), (h, w))))
    # the split as predict's --split: "auto" (default), "watershed", "contour", "none"; True = "auto"
    target = getattr(info, "target", "mask") if info is not None else "mask"
    split = instance_kw.pop("split", "auto")
    split = {True: "auto", False: "none"}.get(split, split) if isinstance(split, bool) else split
    instance_kw.update(split=SplitOptions(resolve_split(split, target)), target=target)
    stream = StreamOptions(tile, overlap, batch_size, progress=False)
    outputs = OutputOptions("tiff", instances=True, threshold=thr, **instance_kw)
    with tempfile.TemporaryDirectory(prefix="bionet-segment-") as tmp:
        predict_image(ArrayReader(image), predictor, cfg.in_channels, cfg.classes, model.size_multiple, stream,
                      outputs, Path(tmp), "image", dev)
        return _read_results(Path(tmp), thr)


def _read_results(folder: Path, threshold: float) -> Segmentation:
    import tifffile

    labels = tifffile.imread(folder / "image_labels.tif")
    prob = tifffile.imread(folder / "image_prob.tif").astype(np.float32, copy=False)
    if prob.ndim == 3 and prob.shape[0] == 1:  # one class: the ImageJ file's single channel
        prob = prob[0]
    count = int(labels.max(initial=0))
    if count <= np.iinfo(np.uint16).max:
        labels = labels.astype(np.uint16)
    return Segmentation(labels, prob, count, threshold)
