"""What an eval-mode, no-grad forward of the fused backend recomputes identically on every call.

In inference every BatchNorm is a fixed affine (running statistics), and the next conv folds that
affine into its weights (kernels.conv_fwd.fold_affine). Recomputing both per call costs two small
launches per block (~70 blocks at t=3): on an H200 the weight folds alone were ~0.8 ms of a 4.6 ms
graphed forward (bench/RESULTS.md, per-layer table). This cache keeps them between calls.

Validity: an entry remembers the tensors it was computed from (by identity, holding a reference so
ids are never reused) and their `_version` counters, so in-place updates (optimizer steps,
`load_state_dict`, `copy_`) invalidate it. The fused kernels write running statistics without
bumping `_version`, so the model clears the cache on every train-mode forward and on `train()`,
`eval()` and `.to()`. Folded weights are bounded by a byte budget (``BIONET_FAST_FOLD_CACHE_MB``,
default 512): BiO-Net folds each shared conv once per iteration (each iteration has its own
BatchNorms), so large t would otherwise keep t copies of the recurrent weights.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Hashable, Optional, Sequence

import torch

_DEFAULT_BUDGET_MB = 512


def _state(tensors: Sequence[Optional[torch.Tensor]]) -> tuple:
    return tuple((t, t._version) if t is not None else (None, 0) for t in tensors)


def _same(a: tuple, b: tuple) -> bool:
    return len(a) == len(b) and all(x is y and vx == vy for (x, vx), (y, vy) in zip(a, b))


def _nbytes(value: Any) -> int:
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if isinstance(value, (tuple, list)):
        return sum(_nbytes(v) for v in value)
    return 0


class InferenceCache:
    """Memo of values derived from parameters and buffers, valid while none of them changes.

    ``get(tag, inputs, compute)`` returns compute()'s value, recomputing it when any tensor of
    ``inputs`` is another object or has been modified in place since. ``budget_bytes`` bounds the
    entries whose tag says they are big (``big=True``); small ones (per-channel vectors) always fit.
    """

    def __init__(self, budget_bytes: Optional[int] = None) -> None:
        if budget_bytes is None:
            budget_bytes = int(float(os.environ.get("BIONET_FAST_FOLD_CACHE_MB", _DEFAULT_BUDGET_MB)) * 2**20)
        self.budget_bytes = budget_bytes
        self._entries: dict = {}
        self.big_bytes = 0
        self.hits = self.misses = 0

    def clear(self) -> None:
        self._entries.clear()
        self.big_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, tag: Hashable, inputs: Sequence[Optional[torch.Tensor]], compute: Callable[[], Any],
            big: bool = False) -> Any:
        key = (tag, tuple(id(t) for t in inputs))
        state = _state(inputs)
        hit = self._entries.get(key)
        if hit is not None and _same(hit[0], state):
            self.hits += 1
            return hit[1]
        self.misses += 1
        value = compute()
        size = _nbytes(value) if big else 0
        if hit is not None:
            self.big_bytes -= hit[2]
            del self._entries[key]
        if self.big_bytes + size <= self.budget_bytes:
            self._entries[key] = (state, value, size)
            self.big_bytes += size
        return value

    # A model deep-copied or pickled starts with an empty cache: entries refer to the original's
    # tensors and would only waste memory in the copy.
    def __deepcopy__(self, memo: dict) -> "InferenceCache":
        return InferenceCache(self.budget_bytes)

    def __getstate__(self) -> dict:
        return {"budget_bytes": self.budget_bytes}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["budget_bytes"])
