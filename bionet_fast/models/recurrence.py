"""The recurrence both models share: t iterations over one set of weights, and activation
checkpointing across iterations (per iteration, nested segments, sqrt(t) above 16).

`RecurrentModel` holds everything that is not the wiring of one iteration: the checkpoint policy,
the iteration loop, `predict`, `set_grad_checkpointing` and the `save_pretrained` /
`from_pretrained` pair. A model subclasses it and implements `_iteration`; BiONet and BiOLinkNet
both run through `_recurrence`, so checkpointing keeps one set of guarantees (exact gradients,
running statistics updated once, the same segments) for both.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten
from torch.utils.checkpoint import checkpoint

from ..blocks import no_stats_update


def _recompute_contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    # The recomputation in backward must normalise with the same batch statistics but must not
    # update the running statistics a second time (torch.utils.checkpoint alone would).
    return contextlib.nullcontext(), no_stats_update()


def checkpointed(fn: Callable, *args: Any, traceable: bool = True) -> Any:
    """Non-reentrant checkpoint of fn(*args), where args may nest tensors in lists or tuples.

    The tensors are passed as flat positional arguments: checkpoint hands only those to its parent
    (a nested checkpoint then drops them) and would keep tensors inside containers alive itself.
    traceable: whether torch.compile can trace fn (the reference blocks can; the fused ones are
    opaque to it, so Dynamo runs such a checkpoint eagerly, where context_fn is what keeps the
    running statistics from a second update).
    """
    leaves, spec = tree_flatten(args)
    flat = lambda *xs: fn(*tree_unflatten(list(xs), spec))  # noqa: E731
    if traceable and torch.compiler.is_compiling():
        # Under torch.compile the recomputation is part of the compiled backward graph, which does
        # not replay the forward's buffer mutations (and context_fn must be dispatch modes there).
        return checkpoint(flat, *leaves, use_reentrant=False, preserve_rng_state=False)
    return checkpoint(flat, *leaves, use_reentrant=False, preserve_rng_state=False,
                      context_fn=_recompute_contexts)


def ckpt(ops, fn: Callable, *args: Any) -> Any:
    """checkpointed(fn, *args) for blocks of backend `ops` (torch.compile traces only the reference;
    `ops=None` means plain PyTorch modules)."""
    return checkpointed(fn, *args, traceable=ops is None or ops.name == "reference")


def segment_ranges(t: int, segments: Optional[int]) -> list[range]:
    """Iterations 0..t-1 grouped for segment checkpointing. `segments=None` picks ceil(sqrt(t))
    groups above t=16 and one group per iteration below (plain per-iteration checkpointing)."""
    n = segments
    if n is None:
        n = math.ceil(math.sqrt(t)) if t > 16 else t
    size = math.ceil(t / min(n, t))
    return [range(s, min(s + size, t)) for s in range(0, t, size)]


def run_iterations(iteration: Callable, x0: Any, t: int, segments: Optional[int], run_ckpt: bool,
                   checkpoint_fn: Callable) -> list:
    """The recurrence both models (and the memory planner's replay) run: iteration(i, x0, backs)
    -> (output or None, backs) for i = 0..t-1, the backward skips of one iteration feeding the next.

    run_ckpt: checkpoint every iteration with `checkpoint_fn(fn, *args)`, and every group of
    `segment_ranges(t, segments)` with more than one iteration around them (only each group's
    first boundary is kept through the forward). Returns the non-None outputs, in order."""
    groups = segment_ranges(t, segments) if run_ckpt else [range(t)]
    outs, backs = [], None
    for group in groups:
        run = lambda x, b, g=group: _segment(iteration, g, run_ckpt, checkpoint_fn, x, b)  # noqa: E731
        seg_outs, backs = checkpoint_fn(run, x0, backs) if run_ckpt and len(group) > 1 else run(x0, backs)
        outs.extend(seg_outs)
    return [o for o in outs if o is not None]


def _segment(iteration: Callable, group: range, run_ckpt: bool, checkpoint_fn: Callable, x0, backs):
    outs = []
    for i in group:
        step = lambda x, b, i=i: iteration(i, x, b)  # noqa: E731
        out, backs = checkpoint_fn(step, x0, backs) if run_ckpt else step(x0, backs)
        outs.append(out)
    return outs, backs


class RecurrentModel(nn.Module):
    """Base of the recurrent encoder-decoders. A subclass sets `self.config` (with `iterations`,
    `classes`, `checkpoint_iters`, `checkpoint_segments`, `checkpoint_stages`) and implements
    `_iteration(ops, i, x0, backs) -> (output or None, backs)`."""

    config: Any

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """timm-style switch: checkpoint each recurrent iteration while training with grad enabled."""
        self.config.checkpoint_iters = bool(enable)

    def _checkpointing(self) -> bool:
        return bool(self.config.checkpoint_iters) and self.training and torch.is_grad_enabled()

    def segments(self) -> list[range]:
        """Iterations grouped for segment checkpointing: only each group's first boundary is kept
        through the forward (see `segment_ranges`)."""
        return segment_ranges(self.config.iterations, self.config.checkpoint_segments)

    def _iteration(self, ops, i: int, x0, backs: Optional[list]):
        raise NotImplementedError

    def _size_rule(self) -> str:
        """Why sides must be multiples of `config.size_multiple`, for the error message."""
        return f"not a multiple of {self.config.size_multiple}"

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ValueError, with the fix, unless x is (B, in_channels, H, W) with H and W multiples
        of `config.size_multiple`."""
        cfg, name = self.config, type(self).__name__
        if x.dim() != 4:
            raise ValueError(f"{name} expects a 4-D batch (B, C, H, W); got shape {tuple(x.shape)}. "
                             "Add a batch dimension with x.unsqueeze(0).")
        if x.shape[1] != cfg.in_channels:
            raise ValueError(f"{name} was built with in_channels={cfg.in_channels} but the input has "
                             f"{x.shape[1]} channels (shape {tuple(x.shape)}). Convert the images "
                             f"(e.g. gray <-> RGB) or build the model with in_channels={x.shape[1]}.")
        m = cfg.size_multiple
        for side, size in (("height", x.shape[2]), ("width", x.shape[3])):
            if size % m:
                lo, hi = (size // m) * m, (size // m + 1) * m
                near = f"{lo} or {hi}" if lo else f"{hi}"
                raise ValueError(f"input {side} {size} is {self._size_rule()}; crop or pad to {near}, or "
                                 "use bionet_fast.sliding_window_inference for images of any size.")

    def _recurrence(self, ops, x0) -> list:
        """Run the t iterations; returns the outputs the head needs (the non-None ones, in order)."""
        run_ckpt = self._checkpointing()
        return run_iterations(lambda i, x, b: self._iteration(ops, i, x, b), x0, self.config.iterations,
                              self.config.checkpoint_segments if run_ckpt else None, run_ckpt,
                              lambda fn, *args: ckpt(ops, fn, *args))

    # --- inference and persistence ----------------------------------------------------------
    @torch.inference_mode()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Probabilities in eval mode: sigmoid for one class, softmax over dim 1 for more."""
        was_training = self.training
        self.eval()
        try:
            logits = self(x)
        finally:
            self.train(was_training)
        return torch.sigmoid(logits) if self.config.classes == 1 else torch.softmax(logits, dim=1)

    def save_pretrained(self, directory: str | Path, **kwargs: Any) -> Path:
        """Write `config.json`, `model.safetensors` and (with huggingface_hub) a README.md model card
        into `directory` (atomically); kwargs: weights_name, model_card, license, repo_id."""
        from .pretrained import save_pretrained

        return save_pretrained(self, directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        """Upload what save_pretrained writes to the Hugging Face Hub repo `repo_id` (needs
        bionet_fast[hub]); kwargs: token, private, revision, commit_message, create_pr, license."""
        from .hub import push_to_hub

        return push_to_hub(self, repo_id, **kwargs)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **overrides: Any):
        """Load a directory written by `save_pretrained` (or by the trainer), or a Hugging Face Hub
        repo id (revision, cache_dir, local_files_only, token), in eval mode, onto `map_location`
        (default "cpu"); `strict=False` tolerates missing / unexpected tensors; overrides win."""
        from .pretrained import load_pretrained

        return load_pretrained(cls, directory, **overrides)
