"""BiONetConfig: the constructor arguments of BiONet, as a JSON-serialisable dataclass.

A leaf module: it imports nothing of bionet_fast outside models.config_checks (its bounds).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from .config_checks import bionet_resources_error, is_number, tile_error

BACKENDS = ("auto", "reference", "triton")
PADDING_MODES = ("zeros", "reflect", "replicate")


class JsonConfig:
    """to_dict / from_dict / to_json / from_json for a dataclass config; unknown fields are refused
    by name (`_UNKNOWN_HINT` adds a class-specific explanation)."""

    _UNKNOWN_HINT = ""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields are {sorted(known)}"
                             + cls._UNKNOWN_HINT)
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    @classmethod
    def from_json(cls, source: str | Path):
        """Read a config from a JSON string or a path to a JSON file."""
        text = str(source)
        if not text.lstrip().startswith("{"):
            text = Path(source).read_text()
        return cls.from_dict(json.loads(text))


@dataclass
class BiONetConfig(JsonConfig):
    """Architecture and execution options of a BiO-Net.

    Architecture (paper notation): ``iterations`` = t, ``multiplier`` = xn, ``depth`` = L,
    ``backward_skips`` = w (None: every level), ``integrate`` = INT.
    Execution (not part of the weights): ``checkpoint_iters``, ``checkpoint_segments``,
    ``checkpoint_stages``, ``backend``.
    """

    in_channels: int = 3
    classes: int = 1
    iterations: int = 3
    multiplier: float = 1.0
    depth: int = 4
    backward_skips: Optional[int] = None
    integrate: bool = False
    bn_momentum: Optional[float] = 0.01
    bn_eps: float = 1e-5
    checkpoint_iters: bool = False
    checkpoint_segments: Optional[int] = None
    checkpoint_stages: bool = False
    backend: str = "auto"
    # How the 3x3 convs pad and the UP deconvs fill their last row/column: "zeros" (the official
    # network) or "reflect" / "replicate" (borders look like image, so the deep features of a small
    # training crop match those of a large window: docs/evaluation.md, "Window size").
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        self.validate()

    @property
    def channels(self) -> list[int]:
        """c[i] = int(32 * 2**i * multiplier) for i = 0..depth, as the official code computes it."""
        return [int(32 * 2**i * self.multiplier) for i in range(self.depth + 1)]

    @property
    def skips(self) -> int:
        """The number of backward skip connections, counted from the deepest level."""
        return self.depth if self.backward_skips is None else self.backward_skips

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this: 2**(depth+1)."""
        return 2 ** (self.depth + 1)

    @property
    def min_side(self) -> int:
        """The smallest input side the network computes as is: size_multiple, and twice that for
        reflect padding (torch reflects at most side - 1 pixels: the deepest 1 x 1 feature map of
        a size_multiple input cannot be reflect-padded). BiONet.forward pads smaller inputs up."""
        return self.size_multiple * (2 if self.padding_mode == "reflect" else 1)

    def has_backward_skip(self, level: int) -> bool:
        """Whether encoder level ``level`` (0 = shallowest) concatenates a decoder feature."""
        return level >= self.depth - self.skips

    def validate(self) -> None:
        """Raise ValueError naming the bad field and a valid choice."""
        def bad(msg: str) -> None:
            raise ValueError(f"invalid BiONetConfig: {msg}")

        for name in ("in_channels", "classes", "iterations", "depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(f"{name}={value!r}; it must be an integer >= 1")
        if not (is_number(self.multiplier) and self.multiplier > 0):
            bad(f"multiplier={self.multiplier!r}; use a positive finite number such as 0.25, 0.5, 1.0")
        if min(self.channels) < 1:
            bad(f"multiplier={self.multiplier} gives {self.channels[0]} channels at the first level; "
                f"use multiplier >= {1 / 32}")
        msg = bionet_resources_error(self.in_channels, self.classes, self.multiplier, self.depth, self.iterations)
        if msg:
            bad(msg)
        if not (is_number(self.bn_eps) and self.bn_eps > 0):
            bad(f"bn_eps={self.bn_eps!r}; use a small positive number such as 1e-5")
        for name in ("integrate", "checkpoint_iters", "checkpoint_stages"):
            if not isinstance(getattr(self, name), bool):
                bad(f"{name}={getattr(self, name)!r}; it must be true or false")
        if self.backward_skips is not None and not (
                isinstance(self.backward_skips, int) and 0 <= self.backward_skips <= self.depth):
            bad(f"backward_skips={self.backward_skips} with depth={self.depth}; use 0..{self.depth} "
                "or None for a backward skip at every level")
        if self.bn_momentum is not None and not (
                is_number(self.bn_momentum) and 0.0 <= self.bn_momentum <= 1.0):
            bad(f"bn_momentum={self.bn_momentum!r}; it must lie in [0, 1] (PyTorch convention), or be "
                "None for a cumulative moving average")
        if self.checkpoint_segments is not None and not (
                isinstance(self.checkpoint_segments, int) and self.checkpoint_segments >= 1):
            bad(f"checkpoint_segments={self.checkpoint_segments!r}; use an integer >= 1 or None (automatic)")
        if self.padding_mode not in PADDING_MODES:
            bad(f"padding_mode={self.padding_mode!r}; choose one of {', '.join(PADDING_MODES)}")
        if self.backend not in BACKENDS:
            bad(f"backend={self.backend!r}; choose one of {', '.join(BACKENDS)}")


TASKS = ("segmentation", "super-resolution")
# Execution choices: how a forward runs, not what the weights compute. save_pretrained leaves them
# out of config.json, so a folder saved on one machine runs on any other.
EXECUTION_FIELDS = ("backend", "checkpoint_iters", "checkpoint_segments", "checkpoint_stages")


@dataclass
class InferenceInfo:
    """What a consumer of saved weights needs besides the architecture: the "inference" block of
    config.json (timm calls it pretrained_cfg).

    ``task``: "segmentation" (outputs logits; sigmoid for one class, softmax for more, then
    ``threshold``) or "super-resolution" (outputs the image; the input is first upsampled bicubically
    ``sr_scale`` times). ``value_range``: the input range (images scaled to [0, 1]).
    ``tile_size``: the default inference window: the training crop side for zero-padded models
    (their BatchNorm statistics hold at it), 512 or more for reflect-padded BiO-Nets (window-invariant);
    None = whole images. ``metrics``: a summary of the validation scores the trainer saw (may be empty).
    ``training_data``: a description of the training images (for the model card).
    ``mpp``: the pixel size of the training images in micrometres per pixel (from their files or
    ``train --train-mpp``; None = unknown): predict reads every slide at it.
    ``target``: "mask" (one nucleus class, or K label classes) or "contour" (3 classes: background,
    interior, boundary; the nucleus is interior + boundary and touching nuclei are separated from
    the interiors; absent from config.json = "mask").
    """

    task: str = "segmentation"
    sr_scale: Optional[int] = None
    threshold: float = 0.5
    value_range: tuple = (0.0, 1.0)
    tile_size: Optional[int] = None
    metrics: dict = dataclasses.field(default_factory=dict)
    training_data: Optional[str] = None
    mpp: Optional[float] = None
    target: str = "mask"

    def __post_init__(self) -> None:
        if not isinstance(self.value_range, (list, tuple)) or not all(is_number(v) for v in self.value_range):
            raise ValueError(f"invalid inference info: value_range={self.value_range!r}; use [0.0, 1.0]")
        if not is_number(self.threshold):
            raise ValueError(f"invalid inference info: threshold={self.threshold!r}; use a number in (0, 1)")
        if tile_error(self.tile_size):
            raise ValueError(f"invalid inference info: {tile_error(self.tile_size)}")
        if not isinstance(self.metrics, dict):
            raise ValueError(f"invalid inference info: metrics={self.metrics!r}; use an object ({{}})")
        self.value_range = tuple(float(v) for v in self.value_range)
        if self.task not in TASKS:
            raise ValueError(f"invalid inference info: task={self.task!r}; choose one of {', '.join(TASKS)}")
        if self.task == "super-resolution" and self.sr_scale is None:
            self.sr_scale = 2
        if self.sr_scale is not None and (not isinstance(self.sr_scale, int) or not 1 <= self.sr_scale <= 64):
            raise ValueError(f"invalid inference info: sr_scale={self.sr_scale!r}; use an integer in 1..64")
        if self.target not in ("mask", "contour"):
            raise ValueError(f"invalid inference info: target={self.target!r}; choose mask or contour")
        if not 0.0 < float(self.threshold) < 1.0 or len(self.value_range) != 2:
            raise ValueError(f"invalid inference info: threshold={self.threshold!r} must lie in (0, 1) and "
                             f"value_range={self.value_range!r} must be [low, high]")
        if self.mpp is not None and not (isinstance(self.mpp, (int, float)) and self.mpp > 0):
            raise ValueError(f"invalid inference info: mpp={self.mpp!r}; micrometres per pixel > 0, or null")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["value_range"] = list(self.value_range)
        if self.target == "mask":  # written only for contour models: config.json of mask models as before
            del data["target"]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "InferenceInfo":
        known = {f.name for f in dataclasses.fields(cls)}
        # Unknown keys are kept out rather than refused: a newer writer may add fields.
        return cls(**{k: v for k, v in data.items() if k in known})
