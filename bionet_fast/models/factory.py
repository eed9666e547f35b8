"""One way to build and load any model: `create_model(name, **kwargs)` and `from_pretrained(folder)`.

`config.json` names the architecture (`"architecture": "bionet"`); folders written before that key
existed load as BiONet. A model class registers itself with `register_model`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from .pretrained import CONFIG_NAME, HUB_OPTIONS, WEIGHTS_NAME, read_config_data, resolve_folder

_MODELS: dict[str, type] = {}


def register_model(name: str, cls: type) -> type:
    """Make `cls` buildable as create_model(name) and loadable from a config.json naming it."""
    _MODELS[name] = cls
    cls.architecture = name
    return cls


def available_models() -> list[str]:
    return sorted(_MODELS)


def model_class(name: str) -> type:
    """The class registered under `name`; ValueError naming the known ones otherwise."""
    try:
        return _MODELS[name]
    except KeyError:
        raise ValueError(f"unknown model architecture {name!r}; choose one of "
                         f"{', '.join(available_models())}") from None


def create_model(name: str = "bionet", **kwargs: Any) -> nn.Module:
    """Build a fresh model: create_model("bionet", iterations=3) or create_model("biolinknet")."""
    return model_class(name)(**kwargs)


def architecture_of(directory: str | Path) -> str:
    """The architecture a saved folder holds ("bionet" for folders older than the key)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: expected a folder written by "
                                "save_pretrained or python -m bionet_fast.train --out")
    data = read_config_data(directory)  # parsed and checked to be an object
    arch = data.get("architecture", "bionet")
    if not isinstance(arch, str):
        raise ValueError(f"{path}: architecture={arch!r}; use one of {', '.join(available_models())}")
    return arch


def from_pretrained(directory: str | Path, **overrides: Any) -> nn.Module:
    """Load any saved model folder, or a Hugging Face Hub repo id ("org/name", with revision,
    cache_dir, local_files_only, token), as its own class (BiONet, BiOLinkNet, ...), in eval mode;
    map_location (default "cpu") and strict (default True) as huggingface_hub's mixin takes them."""
    hub = {k: overrides.pop(k) for k in HUB_OPTIONS if k in overrides}
    folder = resolve_folder(directory, overrides.get("weights_name", WEIGHTS_NAME), **hub)
    return model_class(architecture_of(folder)).from_pretrained(folder, **overrides)
