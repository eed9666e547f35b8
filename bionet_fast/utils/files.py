"""Atomic file writes: a reader (or a killed run) never sees a half-written file.

A leaf module: it imports nothing of bionet_fast.
"""
from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Callable

_UMASK = os.umask(0)  # read the process umask once (os.umask can only be read by setting it)
os.umask(_UMASK)
TMP_SUFFIX = ".tmp"


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file under this process' umask."""
    return 0o666 & ~_UMASK


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)`, then fsync the temporary file, give it the umask's mode, rename it
    over `path` and fsync the folder: a reader (or a run killed at any moment, or a power cut)
    sees the old file or the new one, never half of one. A folder that cannot be written is a
    PermissionError naming it."""
    path = Path(path)
    fd, tmp = temp_beside(path)
    os.close(fd)
    try:
        write(tmp)
        commit(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def temp_beside(path: Path) -> tuple[int, str]:
    """(fd, name) of a new temporary file in `path`'s folder (created), to `commit` as `path`
    once complete; a folder that cannot be written is a PermissionError naming it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except PermissionError as err:
        raise PermissionError(f"cannot write {path}: {path.parent} is not writable ({err.strerror}); "
                              "choose another output folder") from err


def commit(tmp: str, path: Path) -> None:
    """Give the complete temporary file `tmp` the umask's mode, fsync it, rename it over `path` and
    fsync the folder (the rename itself)."""
    # chmod after the write: mkstemp, and safetensors' own temp-and-rename, make 0600 files
    os.chmod(tmp, file_mode())
    _fsync(tmp, os.O_RDONLY)
    os.replace(tmp, path)
    _fsync(path.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: str | Path, flags: int) -> None:
    try:
        fd = os.open(path, flags)
    except OSError:  # folders cannot be opened on some systems (Windows): nothing to sync
        return
    try:
        os.fsync(fd)
    except OSError:  # file systems without fsync on folders
        pass
    finally:
        os.close(fd)


def remove_stale_temps(folder: str | Path) -> list[Path]:
    """Delete the temporary files of saves that were killed before their rename (ours,
    ``.NAME.XXXX.tmp``, and safetensors' own ``.tmpXXXXXX``); returns what was removed. Call it
    only on a folder no other process is writing (a run folder whose lock is held)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and p.name.startswith(".")
             and (p.name.endswith(TMP_SUFFIX) or re.fullmatch(r"\.tmp[A-Za-z0-9]{6}", p.name))]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


def jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and hasattr(value, "dtype"):  # numpy / torch scalars
        return value.item()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def write_json(path: str | Path, data: Any) -> Path:
    """Write `data` as indented JSON, atomically."""
    text = json.dumps(data, indent=2, sort_keys=True, default=jsonable)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text + "\n"))
