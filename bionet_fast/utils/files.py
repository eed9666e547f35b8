"""Atomic file writes: a reader (or a killed run) never sees a half-written file.

A leaf module: it imports nothing of bionet_fast.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

_UMASK = os.umask(0)  # read the process umask once (os.umask can only be read by setting it)
os.umask(_UMASK)


def file_mode() -> int:
    """The mode a plain `open(path, "w")` would give a new file under this process' umask."""
    return 0o666 & ~_UMASK


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call `write(tmp_path)` then rename tmp over `path`: a reader never sees a half-written file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, file_mode())  # mkstemp (and safetensors' own rename) make 0600 files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


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
