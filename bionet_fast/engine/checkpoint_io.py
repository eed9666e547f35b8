"""What the trainer writes into its --out folder, and how a run resumes from it.

Layout of a run folder:
    config.json, model.safetensors   the best model so far (BiONet.from_pretrained(folder) loads it)
    last.safetensors                 the weights after the last completed save
    train_args.json                  every option of the run (resume and evaluate read it)
    training_state.json              epoch, step, best score, scheduler / scaler / RNG states, and the
    training_state.<step>.safetensors   name of the tensor file beside it: weights, optimizer moments, RNGs
    metrics.jsonl                    one JSON line per epoch
    curves.png, samples.png          plots

Every file is written to a temporary name and renamed over the old one (os.replace), so a run
killed at any moment leaves the previous complete save. The tensor file of a state is written
first under a new name and the JSON that points at it afterwards, so the pair is always consistent.
Nothing is pickled: tensors go to safetensors, everything else to JSON.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..utils.files import jsonable
from ..utils.files import atomic_write, write_json  # noqa: F401 (re-exported)

STATE_JSON = "training_state.json"
EMA_PREFIX = "ema."  # the --model-ema weights inside the training state's tensor file
ARGS_JSON = "train_args.json"
METRICS_JSONL = "metrics.jsonl"
LAST_WEIGHTS = "last.safetensors"
EMA_WEIGHTS = "ema.safetensors"  # the --model-ema weights alone (engine.training.ema)


# --- atomic writes ------------------------------------------------------------------------------
# atomic_write / write_json come from bionet_fast.utils: one implementation for the package.


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: Optional[dict] = None) -> Path:
    """safetensors file of contiguous CPU copies, atomically."""
    flat = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(flat, tmp, metadata=metadata))


def read_json(path: str | Path, what: str) -> dict:
    """A JSON object from `path`; a truncated or corrupt file is a ValueError naming it."""
    try:
        data = json.loads(Path(path).read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} ({what}) is corrupt or truncated ({err}); it cannot be read") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} ({what}) is not a JSON object")
    return data


def read_safetensors(path: str | Path, what: str) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; a truncated or corrupt file is a ValueError naming it."""
    try:
        return load_file(str(path))
    except Exception as err:  # SafetensorError, OSError: the message alone does not name the file
        raise ValueError(f"{path} ({what}) is corrupt or truncated ({type(err).__name__}: {err}); "
                         "it cannot be read") from None


# --- metrics.jsonl --------------------------------------------------------------------------------
def append_metrics(out: str | Path, record: dict) -> None:
    """Append one line to metrics.jsonl (rewritten atomically: a kill never leaves half a line)."""
    path = Path(out) / METRICS_JSONL
    lines = path.read_text().splitlines() if path.is_file() else []
    lines.append(json.dumps(record, sort_keys=True, default=jsonable))
    atomic_write(path, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))


def read_metrics(out: str | Path, up_to_epoch: Optional[int] = None) -> list[dict]:
    """The records of metrics.jsonl, optionally only those with epoch <= up_to_epoch."""
    path = Path(out) / METRICS_JSONL
    if not path.is_file():
        return []
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in records if up_to_epoch is None or r.get("epoch", 0) <= up_to_epoch]


def truncate_metrics(out: str | Path, up_to_epoch: int) -> list[dict]:
    """Drop the lines of epochs after the resumed state (they are recomputed); returns the rest."""
    records = read_metrics(out, up_to_epoch)
    path = Path(out) / METRICS_JSONL
    if path.is_file():
        text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return records


# --- optimizer state <-> (tensors, JSON) ----------------------------------------------------------
def _split_optimizer(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for idx, per_param in state["state"].items():
        for name, value in per_param.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.{idx}.{name}"] = value
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _join_optimizer(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer."):
            idx, name = key[len("optimizer."):].split(".", 1)
            state.setdefault(int(idx), {})[name] = value
    for key, value in meta["scalars"].items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = value
    return {"state": state, "param_groups": meta["param_groups"]}


# --- RNG states -----------------------------------------------------------------------------------
def rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    """torch CPU / CUDA, numpy and python `random` states as (tensors, JSON-able dict)."""
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(keys.astype(np.int64))
    version, internal, gauss_py = random.getstate()
    meta = {"numpy": [kind, int(pos), int(has_gauss), float(gauss)],
            "python": [version, list(internal), gauss_py]}
    return tensors, meta


def set_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[:torch.cuda.device_count()])
    kind, pos, has_gauss, gauss = meta["numpy"]
    np.random.set_state((kind, tensors["rng.numpy"].numpy().astype(np.uint32), pos, has_gauss, gauss))
    version, internal, gauss_py = meta["python"]
    random.setstate((version, tuple(internal), gauss_py))


# --- the training state ---------------------------------------------------------------------------
def save_training_state(out: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, scaler, progress: dict, grads: Optional[dict] = None,
                        ema: Optional[dict] = None) -> Path:
    """Write training_state.<step>.safetensors, then training_state.json pointing at it, then
    remove older tensor files. `progress`: JSON-able {"epoch", "step_in_epoch", "global_step",
    "best", ...}; `epoch` counts completed epochs. `grads`: {parameter name: gradient} summed so far
    in an unfinished --grad-accum-steps cycle (restored by load_training_state). `ema`: the
    --model-ema state (engine.ema): saved in the same tensor file, so the EMA and the state are
    one generation, committed by the one write of training_state.json (issue 24)."""
    out = Path(out)
    opt_tensors, opt_meta = _split_optimizer(optimizer.state_dict())
    rng_tensors, rng_meta = rng_state()
    tensors = {**{f"model.{k}": v for k, v in model.state_dict().items()}, **opt_tensors, **rng_tensors,
               **{f"grad.{k}": v for k, v in (grads or {}).items()},
               **{f"{EMA_PREFIX}{k}": v for k, v in (ema or {}).items()}}
    name = f"training_state.{progress['global_step']}.safetensors"
    save_tensors(out / name, tensors, {"format": "pt", "library": "bionet_fast"})
    sched = {k: v for k, v in scheduler.state_dict().items() if k != "lr_lambdas"}
    meta = {"tensors": name, "progress": progress, "optimizer": opt_meta, "scheduler": sched,
            "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
            "rng": rng_meta}
    write_json(out / STATE_JSON, meta)
    for old in out.glob("training_state.*.safetensors"):
        if old.name != name:
            old.unlink(missing_ok=True)
    return out / STATE_JSON


def has_training_state(out: str | Path) -> bool:
    return (Path(out) / STATE_JSON).is_file()


# Files that make a folder "hold a run or a model": writing into it needs --overwrite.
RUN_FILES = (STATE_JSON, "model.safetensors", "config.json", LAST_WEIGHTS, METRICS_JSONL, ARGS_JSON)


def run_files(out: str | Path) -> list[str]:
    """The names of the run / model files in `out` (training state, weights, config, logs)."""
    out = Path(out)
    found = [n for n in RUN_FILES if (out / n).is_file()]
    return found + sorted(p.name for p in out.glob("training_state.*.safetensors")) if out.is_dir() else []


def check_out_folder(out: str | Path, resume: bool, overwrite: bool) -> None:
    """ValueError unless `out` may be written: --resume needs a resumable state there; a new run
    needs an empty folder (of run files) or --overwrite. Nothing is written."""
    out = Path(out)
    found = run_files(out)
    if resume and not has_training_state(out):
        held = ", ".join(found) if found else "no run files"
        raise ValueError(f"--resume {out}: there is no resumable state in it ({STATE_JSON} is missing; the folder "
                         f"holds {held}); the run stopped before its first save. Start it again with "
                         f"--out {out} --overwrite")
    if resume or overwrite or not found:
        return
    if has_training_state(out):
        raise ValueError(f"{out} already holds a run; pass --resume {out} to continue it, --overwrite "
                         "to replace it, or another --out")
    raise ValueError(f"{out} already holds a model or a run's files ({', '.join(found)}); pass --overwrite to "
                     "replace them, or another --out")


def clear_run(out: str | Path) -> None:
    """--overwrite: delete the earlier run's files, so none of them is mistaken for the new run's."""
    out = Path(out)
    for name in run_files(out) + ["curves.png", "samples.png"]:
        (out / name).unlink(missing_ok=True)


def load_training_state(out: str | Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        scheduler, scaler, restore_rng: bool = True, ema=None) -> dict:
    """Restore everything `save_training_state` wrote; returns the progress dict. `ema`: a
    ModelEma restored from the same tensor file (states older than that: from ema.safetensors)."""
    out = Path(out)
    path = out / STATE_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --resume needs the --out folder of an earlier "
                                "run of python -m bionet_fast.train (it holds training_state.json)")
    meta = read_json(path, "the training state")
    if not isinstance(meta, dict) or not isinstance(meta.get("progress"), dict):
        raise ValueError(f"{path} is not a training state (an object with \"progress\", \"tensors\" ...); the run "
                         "folder is damaged, start again with --overwrite")
    tensor_path = out / str(meta.get("tensors"))
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{tensor_path} (named by {path}) is missing; the run folder is incomplete")
    tensors = read_safetensors(tensor_path, "the training state's tensors")
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    for name, param in model.named_parameters():  # an unfinished accumulation cycle's gradients
        if f"grad.{name}" in tensors:
            param.grad = tensors[f"grad.{name}"].to(param.device, param.dtype)
    optimizer.load_state_dict(_join_optimizer(tensors, meta["optimizer"]))  # moves to the params' device
    check_scheduler_state(meta.get("scheduler"), scheduler.state_dict(), path)
    scheduler.load_state_dict({**scheduler.state_dict(), **meta["scheduler"]})
    if ema is not None:
        saved = {k[len(EMA_PREFIX):]: v for k, v in tensors.items() if k.startswith(EMA_PREFIX)}
        if saved:
            ema.load_tensors(saved)
        else:  # a state written before the EMA moved into it
            ema.load(out)
    if scaler is not None and meta.get("scaler"):
        scaler.load_state_dict(meta["scaler"])
    if restore_rng:
        set_rng_state(tensors, meta["rng"])
    return meta["progress"]


def check_scheduler_state(saved, own: dict, path: Path) -> None:
    """ValueError naming `path` and the field when the saved scheduler state is not an object of
    the types the scheduler holds (a hand-edited or damaged training_state.json)."""
    if not isinstance(saved, dict):
        raise ValueError(f"{path}: \"scheduler\" is {saved!r}, not an object; the training state is damaged, "
                         "start again with --overwrite")
    for key, value in saved.items():
        if key not in own or own[key] is None:
            continue
        want = (int, float) if isinstance(own[key], (int, float)) and not isinstance(own[key], bool) else type(own[key])
        if isinstance(value, bool) != isinstance(own[key], bool) or not isinstance(value, want):
            raise ValueError(f"{path}: scheduler field {key!r} is {value!r}, expected a {type(own[key]).__name__}; "
                             "the training state is damaged, start again with --overwrite")
        if isinstance(value, list) and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                               for v in value if v is not None):
            raise ValueError(f"{path}: scheduler field {key!r} is {value!r}, expected a list of numbers; "
                             "the training state is damaged, start again with --overwrite")
