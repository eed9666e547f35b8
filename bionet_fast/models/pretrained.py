"""Saving and loading BiONet weights: `config.json` beside `model.safetensors`, written atomically.

Loading never unpickles code (safetensors). A checkpoint of another configuration is refused with
the differences spelled out.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from ..utils.files import atomic_write
from .config import BiONetConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def save_weights(state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Save a state_dict as safetensors (contiguous CPU copies), atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_pretrained(model, directory: str | Path, weights_name: str = WEIGHTS_NAME) -> Path:
    """Write `directory/config.json` (the config plus its "architecture") and
    `directory/<weights_name>`; returns the directory."""
    directory = Path(directory)
    data = {"architecture": getattr(model, "architecture", "bionet"), **model.config.to_dict()}
    text = json.dumps(data, indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    save_weights(model.state_dict(), directory / weights_name, {"format": "pt", "library": "bionet_fast"})
    return directory


def read_config(directory: str | Path, config_cls=BiONetConfig, architecture: str = "bionet"):
    """The config of a saved folder as `config_cls`; ValueError if the folder holds another
    architecture (folders older than the "architecture" key are BiONets)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: expected a folder written by "
                                "save_pretrained or python -m bionet_fast.train --out")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the folder's config is damaged") from None
    found = data.pop("architecture", "bionet")
    if found != architecture:
        raise ValueError(f"{directory} holds a {found} checkpoint, not a {architecture}; load it with "
                         f"bionet_fast.from_pretrained({str(directory)!r}), which picks the class")
    return config_cls.from_dict(data)


def load_pretrained(cls, directory: str | Path, weights_name: str = WEIGHTS_NAME, **overrides: Any):
    """Build `cls` from `directory/config.json` (overrides win) and load `directory/<weights_name>`."""
    config_cls = getattr(cls, "config_class", BiONetConfig)
    config = read_config(directory, config_cls, getattr(cls, "architecture", "bionet"))
    data = {**config.to_dict(), **overrides}
    model = cls.from_config(config_cls.from_dict(data))
    weights = Path(directory) / weights_name
    if not weights.is_file():
        raise FileNotFoundError(f"no {weights_name} in {directory}; the folder holds "
                                f"{sorted(p.name for p in Path(directory).iterdir())}")
    load_state(model, load_file(str(weights)), source=str(weights))
    return model


def load_state(model, state: Mapping[str, torch.Tensor], source: str = "checkpoint") -> None:
    """load_state_dict with an error that names missing, unexpected and mis-shaped tensors."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} does not match this {type(model).__name__} configuration ({model.config.to_dict()}).\n"
            + _listing("missing keys", missing) + _listing("unexpected keys", unexpected)
            + _listing("shape mismatches", shapes)
            + "Build the model with the checkpoint's configuration (from its config.json), "
              "e.g. bionet_fast.from_pretrained(folder) without architecture overrides.")
    model.load_state_dict(state)


def _listing(title: str, items: list[str], limit: int = 8) -> str:
    if not items:
        return ""
    more = f" ... and {len(items) - limit} more" if len(items) > limit else ""
    return f"  {title} ({len(items)}): {', '.join(items[:limit])}{more}\n"
