"""Predict as a cohort tool that is safe to run many times at once (issue 24).

- Every output image NAME is claimed by an OS file lock, ``OUT/.NAME.lock`` (the training run's
  lock, engine.run_lock: released by the kernel when a process dies, so a killed run never blocks
  anyone). A process that cannot take it skips the image: another live process is predicting it.
  Sharded runs (RANK / WORLD_SIZE) and plain runs into one folder therefore never write the same
  image at once. The lock file is removed on release (a holder re-checks after locking that the
  file it locked is still the one on disk), so a finished run leaves only its outputs.
- Only temporary files proven abandoned are removed: under the image's lock, the exact temporary
  names of NAME's own outputs (``.NAME_mask.tif.XXXXXXXX.tmp``: `utils.files.temp_beside`), never a
  prefix glob (``.s_*`` also matches image ``s_x``'s files).
- One bad file in a batch is reported (file, reason) and skipped; the run goes on and ends with a
  summary and exit code 2. Errors of the output folder itself (full disk, read-only) end the run.
"""
from __future__ import annotations

import errno
import os
import re
import sys
from pathlib import Path
from typing import Optional

from .names import SCRATCH_SUFFIXES, is_output_name, output_files
from ..run_lock import RunLock, RunLocked

# mkstemp's random part (8 characters of [a-z0-9_]); no dots, so ".s_mask.tif.<random>.tmp" can
# never be a temporary file of another output name (those all hold a dot of their own suffix)
_RANDOM = r"[A-Za-z0-9_]+"
# Errors of the output folder, not of one input: every later image would fail the same way.
FOLDER_ERRNOS = {errno.ENOSPC, errno.EROFS, errno.EACCES, errno.EPERM, getattr(errno, "EDQUOT", -1)}


def shard_of(environ=os.environ) -> tuple[int, int]:
    """(RANK, WORLD_SIZE) from the environment (torchrun), checked: ValueError naming the variable."""
    def number(key: str, default: int) -> int:
        text = environ.get(key, str(default))
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{key}={text!r} is not an integer; unset it or use e.g. {key}={default}") from None

    rank, world = number("RANK", 0), number("WORLD_SIZE", 1)
    if world < 1:
        raise ValueError(f"WORLD_SIZE={world}: it must be at least 1 (the number of processes); unset it "
                         "for a single process")
    if not 0 <= rank < world:
        raise ValueError(f"RANK={rank} with WORLD_SIZE={world}: RANK must lie in 0..{world - 1}")
    return rank, world


def drop_earlier_outputs(files: list[Path], out: Path) -> tuple[list[Path], int]:
    """Leave out files in the --out folder that are predict's own outputs (NAME_mask.png ...): a
    folder used as input and --out must not have its masks predicted again (a_mask_mask.png)."""
    out = out.resolve()
    keep = [f for f in files if not (f.resolve().parent == out and is_output_name(f.stem))]
    return keep, len(files) - len(keep)


class _ImageLock(RunLock):
    """RunLock whose file is deleted on release: after locking, the holder checks that the file
    it locked is still the one at the path (not one a releasing holder just deleted), else retries."""

    def acquire(self) -> "_ImageLock":
        while True:
            super().acquire()
            try:
                if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                    return self
            except FileNotFoundError:
                pass
            super().release()

    def release(self) -> None:
        if self.fd is not None:
            try:
                self.path.unlink()  # while still held: a process waiting on the old file retries
            except OSError:
                pass
        super().release()


class ImageClaim:
    """``claim = ImageClaim(out, name); if claim.take(): ... claim.release()``: the lock of one
    output image, and the cleanup of its abandoned temporary files once it is held."""

    def __init__(self, out: Path, name: str):
        self.out, self.name = out, name
        self.lock = _ImageLock(out, f".{name}.lock", what=f"predict run (image {name})")
        self.owner = ""

    def take(self) -> bool:
        """True when this process now holds the image; False when another live process does."""
        try:
            self.lock.acquire()
        except RunLocked:
            self.owner = self.lock._owner() or "?"
            return False
        self.remove_abandoned()
        return True

    def release(self) -> None:
        self.lock.release()

    def remove_abandoned(self) -> list[Path]:
        """Delete the temporary files of NAME's outputs a killed run left (the lock is held, so no
        live process is writing them); exact names only."""
        fixed = {f".{self.name}{s}" for s in SCRATCH_SUFFIXES}
        wanted = {re.escape(f) for f in [*output_files(self.name), *fixed]}  # and the scratch files' temporaries
        pattern = re.compile(r"\.(?:%s)\.%s\.tmp" % ("|".join(sorted(wanted)), _RANDOM))
        gone = []
        if self.out.is_dir():
            for p in self.out.iterdir():
                if p.name in fixed or pattern.fullmatch(p.name):
                    p.unlink(missing_ok=True)
                    gone.append(p)
        return gone


def folder_error(err: BaseException, out: Path) -> bool:
    """Whether `err` is about the output folder: a full disk or read-only file system, or no
    permission on a file in `out` (an unreadable input is that input's own failure)."""
    out = out.resolve()
    while err is not None:
        if isinstance(err, OSError) and err.errno in FOLDER_ERRNOS:
            name = getattr(err, "filename", None)
            inside = name is None or out in Path(os.path.abspath(name)).parents
            if err.errno in (errno.ENOSPC, errno.EROFS, getattr(errno, "EDQUOT", -1)) or inside:
                return True
        err = err.__cause__ or err.__context__
    return False


def reason(err: BaseException) -> str:
    """One line: the exception's class and message (tifffile / zlib errors name no file)."""
    text = str(err).strip().splitlines()[0] if str(err).strip() else ""
    if type(err) is ValueError and text:  # our own named errors: the message says it all
        return text
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class BatchReport:
    """The failures of a batch: reported as they happen, summarised at the end."""

    def __init__(self):
        self.failed: list[tuple[Path, str]] = []
        self.busy: list[tuple[Path, str]] = []

    def fail(self, path: Path, err: BaseException) -> None:
        msg = reason(err)
        self.failed.append((path, msg))
        print(f"error: {path}: {msg}; skipped, the run goes on", file=sys.stderr)

    def skip_busy(self, path: Path, owner: str) -> None:
        self.busy.append((path, owner))
        print(f"{path}: being predicted by another process ({owner}), skipped")

    def summary(self) -> Optional[str]:
        """The closing summary of the failures (None when there were none)."""
        if not self.failed:
            return None
        lines = [f"{len(self.failed)} image(s) failed:"] + [f"  {p}: {m}" for p, m in self.failed]
        return "\n".join(lines)

    @property
    def exit_code(self) -> int:
        return 2 if self.failed else 0


def check_tiff(path: Path, pages: int = 64) -> None:
    """ValueError naming the page and the damage when a TIFF's header cannot describe its pixels: a
    0-size page, or fewer tiles / strips than its size needs (truncated, or damaged size tags).
    Read from the header only; other files pass."""
    import tifffile

    if path.suffix.lower() not in (".tif", ".tiff", ".btf", ".tf8", ".tf2", ".svs", ".ndpi"):
        return
    try:
        tif = tifffile.TiffFile(path)
    except Exception as err:  # noqa: BLE001 - tifffile raises several kinds for a broken header
        raise ValueError(f"not a readable TIFF ({reason(err)})") from None
    with tif:
        for i, page in enumerate(tif.pages[:pages]):
            if not isinstance(page, tifffile.TiffPage):
                continue
            h, w = page.imagelength, page.imagewidth
            if h < 1 or w < 1:
                raise ValueError(f"page {i} is {h} x {w} pixels: the file is damaged (no pixels to predict)")
            planes = page.samplesperpixel if page.planarconfig == 2 else 1
            if page.is_tiled:
                need = -(-h // page.tilelength) * -(-w // page.tilewidth) * max(1, page.imagedepth) * planes
                what = "tiles"
            else:
                need = -(-h // min(page.rowsperstrip or h, h)) * planes
                what = "strips"
            have = len(page.dataoffsets)
            if have < need:
                raise ValueError(f"page {i} ({h} x {w} pixels) holds {have} of the {need} {what} its size needs: "
                                 "the file is truncated or its size tags are damaged")
