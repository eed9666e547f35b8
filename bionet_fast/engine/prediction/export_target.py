"""Where `python -m bionet_fast.export --out FILE` may write (issue 24): never onto a folder, never
onto a model folder's own files (its weights, config, training state: the folder would no longer
load), never over an existing file without --overwrite, and nowhere that cannot be written. Checked
before the model is loaded or traced."""
from __future__ import annotations

import os
from pathlib import Path

from ...models.pretrained import CARD_NAME, CONFIG_NAME
from ..checkpoint_io import EMA_WEIGHTS, RUN_FILES, STATE_JSON

# A folder holding one of these is a model or run folder: its own files are never export targets.
_MARKERS = (CONFIG_NAME, STATE_JSON)
_OWN = set(RUN_FILES) | {EMA_WEIGHTS, CARD_NAME, "curves.png", "samples.png"}


def _own_file(path: Path) -> bool:
    folder = path.parent
    if not any((folder / m).is_file() for m in _MARKERS):
        return False
    return path.name in _OWN or (path.name.startswith("training_state.") and path.suffix == ".safetensors")


def check_export_target(out: str | Path, checkpoint: str | Path, overwrite: bool) -> Path:
    """ValueError naming the problem and the fix, or the path to write (and OUT.json beside it)."""
    out = Path(out)
    meta = out.with_name(out.name + ".json")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the file to write, e.g. --out {out / 'model.onnx'}")
    source = Path(checkpoint)
    for target in (out, meta):
        if (source.is_file() and target.exists() and target.resolve() == source.resolve()) or _own_file(target):
            raise ValueError(f"--out {out} would write {target}, one of the files of the model folder "
                             f"{target.parent} (it would no longer load); export to another folder, e.g. "
                             f"--out {target.parent.parent / ('export' + (out.suffix or '.onnx'))}")
    taken = [str(t) for t in (out, meta) if t.exists()]
    if taken and not overwrite:
        raise ValueError(f"--out {out}: {' and '.join(taken)} already exist(s); pass --overwrite to replace, "
                         "or choose another --out")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        raise ValueError(f"--out {out}: {parent} is not a writable folder; choose another --out")
    return out
