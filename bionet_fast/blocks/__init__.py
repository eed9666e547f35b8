"""Blocks: the conv -> ReLU -> BatchNorm building blocks, in two interchangeable backends.

Both backends implement the same `Ops` interface (see `reference.RefOps`); the model only talks to
that interface, so parameters and state_dicts are identical whichever backend runs.

This module also holds the switch that keeps BatchNorm running statistics from being updated twice
when an iteration is recomputed under activation checkpointing (pytorch issue 96136).
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterator

_state = threading.local()


def stats_update_enabled() -> bool:
    """Whether train-mode BatchNorms may update their running statistics right now."""
    return getattr(_state, "enabled", True)


@contextlib.contextmanager
def no_stats_update() -> Iterator[None]:
    """Run train-mode BatchNorms on batch statistics without touching running statistics.

    Used for the recomputation pass of a checkpointed iteration: its forward already updated them.
    """
    previous = stats_update_enabled()
    _state.enabled = False
    try:
        yield
    finally:
        _state.enabled = previous
