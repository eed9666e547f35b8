"""Helpers shared by the command-line modules (train, evaluate, predict, export, plan): they turn
the argparse namespace into the typed options the engine takes, so no namespace travels down."""
from __future__ import annotations

import argparse
import os
from pathlib import Path

from .engine.prediction.engines import ENGINES
from .engine.prediction.inference import InferenceOptions
from .models.config_checks import MAX_TILE


def inference_options(args: argparse.Namespace) -> InferenceOptions:
    """The typed loading options of an evaluate / predict command line."""
    return InferenceOptions(args.checkpoint, args.device, args.backend, args.task, args.sr_scale,
                            args.tile_size)


# --- numeric arguments, checked before any work -------------------------------------------------
def _finite(v) -> bool:
    return v == v and v not in (float("inf"), float("-inf"))


AT_LEAST_1 = (lambda v: v >= 1, "at least 1")
AT_LEAST_0 = (lambda v: _finite(v) and v >= 0, "0 or more")
POSITIVE = (lambda v: _finite(v) and v > 0, "a positive number")
FRACTION = (lambda v: _finite(v) and 0 <= v < 1, "a fraction in [0, 1), e.g. 0.25")
MOMENTUM = (lambda v: _finite(v) and 0 < v <= 1, "in (0, 1], e.g. 0.01")
WINDOW = (lambda v: 1 <= v <= MAX_TILE, f"at least 1 and at most {MAX_TILE} (a window side, e.g. 512)")  # models.config_checks
PROBABILITY = (lambda v: _finite(v) and 0 < v < 1, "a probability in (0, 1), e.g. 0.5")


def model_target(model) -> str:
    """The model's training target from its "inference" block: "mask" (default) or "contour"."""
    info = getattr(model, "inference_info", None)
    return getattr(info, "target", "mask") if info is not None else "mask"


def model_threshold(model, given=None) -> float:
    """The mask threshold: `given` (a --threshold flag), else the model's stored one, else 0.5."""
    info = getattr(model, "inference_info", None)
    return given if given is not None else (info.threshold if info is not None else 0.5)


def check_numbers(args, rules: dict) -> None:
    """Raise ValueError naming the flag for the first value of `args` (a namespace or a config)
    that breaks its rule; rules: {dest: (predicate, "what it must be")}; None values are unset."""
    for dest, (ok, what) in rules.items():
        value = getattr(args, dest, None)
        if value is not None and not ok(value):
            raise ValueError(f"--{dest.replace('_', '-')} {value}: must be {what}")


def check_multiple(flag: str, value, multiple: int, why: str) -> None:
    """ValueError naming `flag` and the two nearest valid values when `value` % `multiple` != 0."""
    if value is not None and value % multiple:
        lo, hi = value // multiple * multiple, (value // multiple + 1) * multiple
        raise ValueError(f"{flag} {value} is not a multiple of {why} = {multiple}; use {lo or hi} or {hi}")


def check_writable(folder: Path, flag: str) -> Path:
    """ValueError naming `flag` when `folder` cannot be created or written (nothing is created)."""
    parent = folder
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        what = "is not a folder" if not parent.is_dir() else "is not writable"
        raise ValueError(f"{flag} {folder}: {parent} {what}; choose another {flag}")
    return folder


def add_engine_arguments(p: argparse.ArgumentParser) -> None:
    """--engine and --threads of evaluate and predict (engine.engines)."""
    p.add_argument("--engine", default="auto", choices=ENGINES,
                   help="what runs the model: auto (default) = OpenVINO on a CPU where it is installed "
                        "(pip install 'bionet_fast[openvino]'), else torch; torch on GPUs")
    p.add_argument("--threads", type=int, help="CPU threads (default: the CPUs idle at the start, at most 8)")
