"""Peak memory of one training step, measurable without a GPU.

On CUDA: the caching allocator's `max_memory_allocated` above what was allocated before the step.
On the CPU: a deterministic count of the same quantity. A TorchDispatchMode sees every tensor the
step creates (forward, backward, checkpoint recomputation); each new storage is counted from its
creation until it is freed (storages keep their Python object alive while autograd holds them, so a
weakref finalizer fires exactly at the free). Parameters, buffers and inputs are not counted.
"""
from __future__ import annotations

import weakref
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


class LiveBytesMode(TorchDispatchMode):
    """Track the bytes of storages created under this mode; `peak` is their maximum live total."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude = exclude  # data_ptrs of storages that existed before (params, inputs)
        self.live: dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor):
                self._track(t.untyped_storage())
        return out

    def _track(self, storage) -> None:
        key = id(storage)
        if key in self.live or storage.data_ptr() in self.exclude or storage.nbytes() == 0:
            return
        self.live[key] = storage.nbytes()
        self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.current -= self.live.pop(key, 0)


def _bce(logits: torch.Tensor, target: Optional[torch.Tensor]) -> torch.Tensor:
    target = torch.zeros_like(logits) if target is None else target
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def peak_step_memory(model: torch.nn.Module, x: torch.Tensor, target: Optional[torch.Tensor] = None,
                     loss_fn: Callable[[torch.Tensor, Optional[torch.Tensor]], torch.Tensor] = _bce) -> int:
    """Peak bytes allocated by one training step (forward + backward) of `model` on `x`.

    x: (B, C, H, W); target: what `loss_fn(logits, target)` expects (default BCE against zeros).
    Gradients are accumulated into `.grad` as in a real step (set them to None first for a clean count).
    """
    model.train()
    if x.is_cuda:
        torch.cuda.synchronize(x.device)
        torch.cuda.reset_peak_memory_stats(x.device)
        base = torch.cuda.memory_allocated(x.device)
        loss_fn(model(x), target).backward()
        torch.cuda.synchronize(x.device)
        return torch.cuda.max_memory_allocated(x.device) - base
    held = [p for p in model.parameters()] + [b for b in model.buffers()] + [x]
    held += [target] if target is not None else []
    exclude = {t.untyped_storage().data_ptr() for t in held}
    exclude |= {p.grad.untyped_storage().data_ptr() for p in model.parameters() if p.grad is not None}
    mode = LiveBytesMode(exclude)
    with mode:
        loss_fn(model(x), target).backward()
    return mode.peak


def saved_activation_bytes(model: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes of the distinct tensors a train-mode forward of `model` on x (B, C, H, W) saves for
    backward (autograd's saved tensors, via `saved_tensors_hooks`), parameters, buffers and x
    excluded. Views of one storage count once. Runs on any device; the forward's output is dropped.
    """
    held = list(model.parameters()) + list(model.buffers()) + [x]
    exclude = {t.untyped_storage().data_ptr() for t in held}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s.data_ptr() not in exclude:
            seen[s.data_ptr()] = max(seen.get(s.data_ptr(), 0), s.nbytes())
        return t

    model.train()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x)
    del out
    return sum(seen.values())
