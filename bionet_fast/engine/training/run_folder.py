"""The output folder of a training run: locked for the run's life, checked (resume needs a state,
a folder holding a run or a model needs --overwrite), cleaned of an interrupted save's temporary
files; and the options a resumed run may change."""
from __future__ import annotations

import sys
from pathlib import Path

from ...utils.files import remove_stale_temps
from .. import checkpoint_io as tio
from ..checkpoint_io import ARGS_JSON
from ..run_lock import RunLock, print_stale
from .train_config import TrainConfig

# Options a resumed run cannot change (besides the architecture): the data and the sampling of
# its steps. The others (lr, lr-decay, epochs, precise-bn, devices...) take effect and are printed.
RESUME_FIXED = ("train_data", "valid_data", "data_format", "image_size", "batch_size", "steps", "seed",
                "n_train", "n_val", "sr_scale", "no_augment")


def resume_changes(args: TrainConfig) -> list[str]:
    """'--lr 0.01 -> 0.001' for each option given with --resume that differs from the run's own;
    ValueError naming those that cannot change."""
    saved = tio.read_json(Path(args.resume) / ARGS_JSON, "the run's options")
    now = args.to_json()
    diff = {k: (saved[k], now[k]) for k in now if k in saved and saved[k] != now[k] and k != "out"}
    fixed = [f"--{k.replace('_', '-')}" for k in RESUME_FIXED if k in diff]
    if fixed:
        raise ValueError(f"--resume {args.resume}: {', '.join(fixed)} cannot change in a resumed run (the "
                         "steps already taken depend on them); start a new run with --out instead")
    return [f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in diff.items()]


def take_folder(args: TrainConfig) -> RunLock:
    """Lock the output folder for this run and prepare it; the folder checks are repeated under
    the lock (another run may have written there since main() looked)."""
    out = Path(args.out)
    try:
        lock = RunLock(out).acquire()
    except OSError as err:
        raise ValueError(f"--out {out}: cannot create or write this folder ({type(err).__name__}: "
                         f"{err.strerror or err}); choose another --out") from None
    try:
        print_stale(lock)
        tio.check_out_folder(out, bool(args.resume), args.overwrite)
        removed = remove_stale_temps(out)
        if removed:
            print(f"note: removed {len(removed)} temporary file(s) of an interrupted save in {out}", file=sys.stderr)
        if not args.resume:
            tio.clear_run(out)
    except BaseException:
        lock.release()
        raise
    return lock
