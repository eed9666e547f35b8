"""One 2-D image (a PNG or a whole slide) through the streaming predictor into its output files.

PNG / JPEG / BMP inputs (in memory anyway) give NAME_mask.png + NAME_prob.png as before; TIFF and
whole-slide inputs give tiled BigTIFFs NAME_mask.tif (uint8) + NAME_prob.tif (uint16 0..65535 = 0..1,
or float32 with --prob-format tiff; several classes: one grey page per class), written tile by
tile as blocks of windows finish (memory does not grow with the width). Optional: NAME_labels.tif,
NAME.geojson, NAME_nuclei.csv (engine.instances). Every file is written under a temporary name and
renamed when complete.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .instances import InstanceWriter
from .label_writer import ScaledBlocks
from .pixel_size import SlideGeometry, nearest_index
from .split import SplitOptions
from .slide import ArrayReader
from .streaming import StreamOptions, predict_blocks, tissue_mask
from .writers import TiledTiffWriter, mask_of, prob_to_uint16, split_channels, write_outputs

__all__ = ["OutputOptions", "expected_outputs", "predict_image"]


@dataclass
class OutputOptions:
    """Which files predict writes for an image."""

    prob_format: str = "png"
    instances: bool = False
    geojson: bool = False
    measurements: bool = False
    min_area: float = 0  # in predicted pixels (engine.pixel_size.min_area_pixels converts --min-area)
    threshold: float = 0.5  # nucleus where p > threshold (one class)
    rois: bool = False
    class_names: Optional[list] = None  # K classes: names of classes 0..K-1, for a classification
    split: SplitOptions = SplitOptions("none")  # how touching nuclei are separated (engine.split)
    target: str = "mask"  # the model's target: "mask" or "contour"

    @property
    def any_instances(self) -> bool:
        return self.instances or self.geojson or self.measurements or self.rois


def expected_outputs(name: str, tiled: bool, opts: OutputOptions, classes: int) -> list[str]:
    """File names a complete prediction of NAME leaves (a rerun skips images that have them all)."""
    if tiled:
        names = [f"{name}_mask.tif", f"{name}_prob.tif"]
    else:
        tif = opts.prob_format == "tiff" or classes > 1
        names = [f"{name}_mask.png", f"{name}_prob.tif" if tif else f"{name}_prob.png"]
    return names + ([f"{name}_labels.tif"] if opts.instances else []) + \
        ([f"{name}.geojson"] if opts.geojson else []) + ([f"{name}_nuclei.csv"] if opts.measurements else []) + \
        ([f"{name}_rois.zip"] if opts.rois else [])


def predict_image(reader, predictor: Callable[[torch.Tensor], torch.Tensor], in_channels: int, classes: int,
                  size_multiple: int, stream: StreamOptions, opts: OutputOptions, folder: Path, name: str,
                  sw_device: torch.device, geometry: Optional[SlideGeometry] = None) -> list[Path]:
    """Predict `reader`'s image (engine.slide reader) and write its outputs into `folder`, mapped
    to the slide's level 0 by `geometry` (default: the image itself)."""
    h, w = reader.shape[:2]
    tissue = None
    if stream.tissue_only:
        thumb, factor = reader.thumbnail() if hasattr(reader, "thumbnail") else (reader.read(0, 0, h, w), 1.0)
        tissue = (tissue_mask(thumb), factor)
    tiled = not isinstance(getattr(reader, "base", reader), ArrayReader)  # a resampled PNG is still a PNG
    stream = replace(stream, label=stream.label or name)
    mpp = getattr(reader, "mpp", None)
    geometry = geometry or SlideGeometry((h, w), (h, w), mpp, mpp)
    sinks = _Sinks(folder, name, geometry, classes, tiled, opts, reader)
    try:
        for y, x, block in predict_blocks(reader, predictor, in_channels, size_multiple, stream, sw_device,
                                          tissue=tissue, classes=classes):
            sinks.put(y, x, block)
        return sinks.close()
    except BaseException:
        sinks.abort()
        raise


class _Sinks:
    """Fans each finished (K, n, m) block out to the output writers: straight into the tiled TIFFs
    (memory does not grow with the width); assembled into full-width row bands (K, n, W) only for
    the instances (connected components need whole rows) and for in-memory (PNG) inputs."""

    def __init__(self, folder: Path, name: str, geometry: SlideGeometry, classes: int, tiled: bool,
                 opts: OutputOptions, reader):
        shape, out_shape = geometry.shape, geometry.level0_shape
        self.folder, self.name, self.shape, self.classes, self.tiled = folder, name, shape, classes, tiled
        self.opts, self.mpp, self.geometry = opts, geometry.level0_mpp, geometry
        mpp = self.mpp
        self.bands: list[np.ndarray] = []
        self.band, self.band_y = None, -1
        self.writers = []
        self.dtype = np.float32 if opts.prob_format == "tiff" else np.uint16
        if tiled:
            prob_shape = out_shape if classes == 1 else (*out_shape, classes)
            self.prob_path = folder / (f"{name}_prob.tif" if classes == 1 else f".{name}_prob.channels.tmp")
            self.writers += [TiledTiffWriter(self.prob_path, prob_shape, self.dtype, mpp),
                             TiledTiffWriter(folder / f"{name}_mask.tif", out_shape, np.uint8, mpp)]
        self.scaled = [ScaledBlocks(wr, shape, out_shape) for wr in self.writers]  # level-0 pixels
        self.instances = None
        if opts.any_instances:
            self.instances = InstanceWriter(folder, name, shape, opts.instances, opts.geojson, opts.measurements,
                                            opts.min_area, geometry.mpp, threshold=opts.threshold, rois=opts.rois,
                                            geometry=geometry, image=reader, class_names=opts.class_names,
                                            split=opts.split, target=opts.target)

    def put(self, y: int, x: int, block: np.ndarray) -> None:
        """block (K, n, m): the finished output at rows y.., columns x.."""
        if self.tiled:
            prob = block if self.dtype == np.float32 else prob_to_uint16(block)
            self.scaled[0].put_block(y, x, prob[0] if self.classes == 1 else np.moveaxis(prob, 0, -1))
            self.scaled[1].put_block(y, x, mask_of(block, threshold=self.opts.threshold))
        if self.instances is None and self.tiled:
            return
        if y != self.band_y:
            self._flush()
            self.band, self.band_y = np.empty((block.shape[0], block.shape[1], self.shape[1]), np.float32), y
        self.band[:, :, x:x + block.shape[2]] = block

    def _flush(self) -> None:
        if self.band is None:
            return
        if not self.tiled:
            self.bands.append(self.band)
        if self.instances is not None:
            self.instances.put(self.band)
        self.band = None

    def close(self) -> list[Path]:
        self._flush()
        paths = [w.close() for w in self.writers]
        if self.tiled and self.classes > 1:
            final = split_channels(self.prob_path, self.folder / f"{self.name}_prob.tif", self.classes, self.mpp)
            os.unlink(self.prob_path)
            paths[0] = final
        if not self.tiled:
            out = np.concatenate(self.bands, axis=1)
            if not self.geometry.identity:  # to level 0: nearest, as the tiled outputs
                (h, w), (oh, ow) = self.shape, self.geometry.level0_shape
                out = out[:, nearest_index(h, oh)][:, :, nearest_index(w, ow)]
            paths = write_outputs(self.folder, self.name, out, "segmentation",
                                  self.opts.prob_format, self.mpp, self.opts.threshold)
        if self.instances is not None:
            paths += self.instances.close()
        return paths

    def abort(self) -> None:
        for w in self.writers:
            w.abort()
        if self.instances is not None:
            self.instances.abort()
