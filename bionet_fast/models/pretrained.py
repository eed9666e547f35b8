"""Saving and loading model weights: `config.json` beside `model.safetensors` (and a model card,
README.md, with huggingface_hub), written atomically.

config.json = {"architecture": ..., <the model config's architecture fields>, "inference": {...}}:
the "inference" block (`InferenceInfo`: task, sr_scale, threshold, value range, tile size, metrics)
is what `evaluate`, `predict` and `export` read besides the architecture. Execution choices
(backend, checkpointing) are not written: they do not bind the weights. Folders in the older format
(no "inference" block, execution fields present) still load; a saved backend "triton" on a machine
without CUDA runs the reference path, with one warning.

Loading never unpickles code (safetensors). A checkpoint of another configuration is refused with
the differences spelled out. `directory` may also be a Hugging Face Hub repo id (see `hub`).
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file

from ..utils.files import atomic_write
from .config import EXECUTION_FIELDS, BiONetConfig, InferenceInfo

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
CARD_NAME = "README.md"
INFERENCE_KEY = "inference"
HUB_OPTIONS = ("revision", "cache_dir", "local_files_only", "token", "force_download")


def save_weights(state: Mapping[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> Path:
    """Save a state_dict as safetensors (contiguous CPU copies), atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state.items()}
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def inference_info(model) -> InferenceInfo:
    """The model's InferenceInfo (`model.inference_info`), or the default (segmentation) one."""
    info = getattr(model, "inference_info", None)
    return info if isinstance(info, InferenceInfo) else InferenceInfo()


def config_dict(model) -> dict[str, Any]:
    """What config.json holds for `model`: architecture name, architecture fields, inference block."""
    fields = {k: v for k, v in model.config.to_dict().items() if k not in EXECUTION_FIELDS}
    return {"architecture": getattr(model, "architecture", "bionet"), **fields,
            INFERENCE_KEY: inference_info(model).to_dict()}


def save_pretrained(model, directory: str | Path, weights_name: str = WEIGHTS_NAME,
                    model_card: bool = True, license: str = "unknown", repo_id: str | None = None) -> Path:
    """Write `directory/config.json`, `directory/<weights_name>` and (model_card, when huggingface_hub
    is installed) a README.md model card with `license` (a Hub license id) and, in its example,
    `repo_id`; returns the directory."""
    directory = Path(directory)
    text = json.dumps(config_dict(model), indent=2, sort_keys=True)
    atomic_write(directory / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text + "\n"))
    save_weights(model.state_dict(), directory / weights_name, {"format": "pt", "library": "bionet_fast"})
    card = None
    if model_card:
        from .hub import model_card as make_card  # huggingface_hub's ModelCard, or None without it

        card = make_card(model, repo_id, license=license)
    if card is not None:
        atomic_write(directory / CARD_NAME, lambda tmp: Path(tmp).write_text(str(card)))
    return directory


def read_config_data(directory: str | Path) -> dict[str, Any]:
    """The parsed config.json of a saved folder (FileNotFoundError / ValueError naming the fix)."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"no {CONFIG_NAME} in {directory}: expected a folder written by "
                                "save_pretrained or python -m bionet_fast.train --out")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the folder's config is damaged") from None
    if not isinstance(data, dict):
        kind = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(data), "null")
        raise ValueError(f"{path} holds a JSON {kind}, not an object of model fields "
                         "({\"architecture\": ..., \"in_channels\": ...}); the folder's config is damaged")
    return data


def read_config(directory: str | Path, config_cls=BiONetConfig, architecture: str = "bionet"):
    """The model config of a saved folder as `config_cls`; ValueError if the folder holds another
    architecture (folders older than the "architecture" key are BiONets)."""
    return _split(read_config_data(directory), directory, config_cls, architecture, {})[0]


def _split(data: dict, directory, config_cls, architecture: str, overrides: dict):
    """config.json data -> (model config with overrides, InferenceInfo or None)."""
    data = dict(data)
    found = data.pop("architecture", "bionet")
    if found != architecture:
        raise ValueError(f"{directory} holds a {found} checkpoint, not a {architecture}; load it with "
                         f"bionet_fast.from_pretrained({str(directory)!r}), which picks the class")
    block = data.pop(INFERENCE_KEY, None)
    try:  # types and bounds checked here, before any tensor exists (models.config_checks)
        info = InferenceInfo.from_dict(block) if isinstance(block, dict) else None
    except (TypeError, ValueError) as err:
        raise ValueError(f"{Path(directory) / CONFIG_NAME}, \"{INFERENCE_KEY}\": {err}") from None
    if data.get("backend") == "triton" and "backend" not in overrides and not torch.cuda.is_available():
        warnings.warn(f"{directory} was saved with backend='triton', which needs a CUDA GPU; this machine "
                      "has none, so the reference (PyTorch) backend runs it (same weights, same outputs)",
                      stacklevel=4)
        data["backend"] = "auto"
    try:
        return config_cls.from_dict({**data, **overrides}), info
    except (TypeError, ValueError, OverflowError) as err:
        raise ValueError(f"{Path(directory) / CONFIG_NAME}: {err}") from None


def load_pretrained(cls, directory: str | Path, weights_name: str = WEIGHTS_NAME, *,
                    map_location: str | torch.device = "cpu", strict: bool = True, **overrides: Any):
    """Build `cls` from `directory/config.json` (overrides win), load `directory/<weights_name>` onto
    `map_location` and return the model **in eval mode** (as huggingface_hub's PyTorchModelHubMixin
    and segmentation_models_pytorch do: call .train() to fine-tune).

    `directory`: a local folder, or a Hugging Face Hub repo id ("org/name"; hub options
    revision, cache_dir, local_files_only, token, force_download may be passed). `strict=False`
    loads a checkpoint with missing or unexpected tensors (named in one warning); mis-shaped tensors
    are refused either way. The folder's "inference" block becomes `model.inference_info` (None for
    folders older than it)."""
    device = _device(map_location)
    hub = {k: overrides.pop(k) for k in HUB_OPTIONS if k in overrides}
    folder = resolve_folder(directory, weights_name, **hub)
    config_cls = getattr(cls, "config_class", BiONetConfig)
    config, info = _split(read_config_data(folder), directory, config_cls,
                          getattr(cls, "architecture", "bionet"), overrides)
    weights = folder / weights_name
    if not weights.is_file():  # before the model is built: nothing is allocated for a missing file
        raise FileNotFoundError(f"no {weights_name} in {directory}; the folder holds "
                                f"{sorted(p.name for p in folder.iterdir())}")
    model = cls.from_config(config)
    try:
        state = load_file(str(weights), device=str(device))
    except Exception as err:  # SafetensorError / OSError do not name the file
        raise ValueError(f"{weights} is corrupt or truncated ({type(err).__name__}: {err}); it cannot be "
                         "loaded") from None
    load_state(model.to(device), state, source=str(weights), strict=strict)
    model.inference_info = info
    return model.eval()


def _device(map_location: str | torch.device) -> torch.device:
    """map_location as a torch.device; ValueError naming the fix for a bad one (before any work)."""
    try:
        return torch.device(map_location)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"map_location={map_location!r} is not a device ({err}); pass e.g. 'cpu', "
                         "'cuda' or 'cuda:1'") from None


def resolve_folder(directory: str | Path, weights_name: str = WEIGHTS_NAME, **hub: Any) -> Path:
    """A local folder as is; a bioimage.io package (.zip) of export_bioimageio unpacked; a Hub repo
    id downloaded (or found in the cache) through `hub`."""
    path = Path(directory)
    if path.is_file() and path.suffix.lower() == ".zip":
        return unpack_package(path, weights_name)
    if path.is_dir() or not looks_like_repo_id(str(directory)):
        if hub.get("revision") is not None:
            raise ValueError(f"revision={hub['revision']!r} applies to Hub repo ids, but {directory} is "
                             "a local path; drop revision or pass a repo id such as 'org/name'")
        return path
    from .hub import download_folder

    return download_folder(str(directory), weights_name, **hub)


def unpack_package(path: Path, weights_name: str = WEIGHTS_NAME) -> Path:
    """The config.json + weights a bioimage.io package written by bionet_fast carries, extracted
    once into a cache folder keyed by the zip's path, size and time."""
    import hashlib
    import os
    import shutil
    import tempfile
    import zipfile

    st = path.stat()
    key = hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    folder = Path(tempfile.gettempdir()) / "bionet_fast-packages" / key
    if (folder / weights_name).is_file():
        return folder
    try:
        with zipfile.ZipFile(path) as zf:
            if not {CONFIG_NAME, weights_name} <= set(zf.namelist()):
                raise ValueError(f"{path} holds no {CONFIG_NAME} and {weights_name}: only bioimage.io packages "
                                 "written by python -m bionet_fast.export --format bioimageio load here")
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = tempfile.mkdtemp(dir=folder.parent)
            for name in (CONFIG_NAME, weights_name):
                zf.extract(name, tmp)
    except zipfile.BadZipFile as err:
        raise ValueError(f"{path} is not a readable zip file ({err}); expected a bioimage.io package") from None
    try:
        os.replace(tmp, folder)
    except OSError:  # another process unpacked it first
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def looks_like_repo_id(text: str) -> bool:
    """'org/name' (one slash, no path syntax): a Hub repo id rather than a missing local folder."""
    parts = text.split("/")
    return (len(parts) == 2 and all(parts) and not text.startswith((".", "~"))
            and "\\" not in text and not Path(text).exists())


def load_state(model, state: Mapping[str, torch.Tensor], source: str = "checkpoint", strict: bool = True) -> None:
    """load_state_dict with an error that names missing, unexpected and mis-shaped tensors (strict=False:
    missing and unexpected tensors are named in a warning instead; mis-shaped ones are always an error)."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if not strict and not shapes and (missing or unexpected):
        warnings.warn(f"{source}: loaded with strict=False into a {type(model).__name__}; "
                      + (_listing("missing keys (left as initialised)", missing)
                         + _listing("unexpected keys (ignored)", unexpected)).strip(), stacklevel=3)
        model.load_state_dict(state, strict=False)
        return
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
