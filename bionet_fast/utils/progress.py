"""Progress bars: tqdm's when it is installed (the [train] extra), else a silent stand-in, so the
inference commands (evaluate, predict) need no more than torch, numpy, safetensors, Pillow, tifffile.

A leaf module: it imports nothing of bionet_fast.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional

try:
    from tqdm import tqdm
except ImportError:  # inference-only install: no bars, same interface
    class tqdm:  # noqa: N801 (the name of the class it stands in for)
        """The part of tqdm's interface bionet_fast uses, doing nothing."""

        def __init__(self, iterable: Optional[Iterable] = None, *args: Any, **kwargs: Any):
            self.iterable = iterable

        def __iter__(self):
            return iter(self.iterable if self.iterable is not None else ())

        def update(self, n: int = 1) -> None:
            pass

        def set_postfix(self, *args: Any, **kwargs: Any) -> None:
            pass

        def close(self) -> None:
            pass

        def __enter__(self) -> "tqdm":
            return self

        def __exit__(self, *exc: Any) -> None:
            pass

__all__ = ["tqdm"]
