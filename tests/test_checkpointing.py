"""Activation checkpointing across recurrent iterations: exact gradients, BatchNorm running statistics
updated once per step, and memory that stops growing with t."""
from __future__ import annotations


import pytest
import torch

import bionet_fast.models.recurrence as model_module
from bionet_fast import BiONet, peak_step_memory
from checkpoint_compare import assert_checkpointing_is_exact

CONFIGS = {
    "plain": dict(iterations=3, multiplier=0.25, depth=2),
    "int": dict(iterations=3, multiplier=0.25, depth=2, integrate=True),
    "w1": dict(iterations=3, multiplier=0.25, depth=3, backward_skips=1),
    "x0.5": dict(iterations=2, multiplier=0.5, depth=2),
    "segments": dict(iterations=5, multiplier=0.25, depth=2, checkpoint_segments=2),
    "stages": dict(iterations=2, multiplier=0.25, depth=2, checkpoint_stages=True),
    "auto_segments": dict(iterations=17, multiplier=0.25, depth=1),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_gradients_and_running_stats_equal_the_plain_step(name):
    plain = BiONet(**CONFIGS[name])
    # BatchNorms of dead blocks (see BiONet._iteration) get no gradient
    assert_checkpointing_is_exact(plain, no_grad_ok=lambda k: k.startswith("norms.") and ".dec." in k)
    assert plain.norms[0].mid[0].num_batches_tracked.item() == 2


def test_checkpointing_only_while_training_with_grad(monkeypatch):
    calls = []
    original = model_module.checkpointed
    monkeypatch.setattr(model_module, "checkpointed", lambda *a, **kw: calls.append(1) or original(*a, **kw))
    model = BiONet(iterations=3, multiplier=0.25, depth=2, checkpoint_iters=True)
    x = torch.randn(1, 3, 32, 32)
    model.eval()(x)
    with torch.no_grad():
        model.train()(x)
    assert calls == []
    model.train()(x)
    assert len(calls) == 3


def test_segments_group_iterations():
    model = BiONet(iterations=10, multiplier=0.25, depth=1, checkpoint_segments=3)
    assert [list(g) for g in model.segments()] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    assert len(BiONet(iterations=64, multiplier=0.25, depth=1).segments()) == 8  # auto: sqrt(t)
    assert len(BiONet(iterations=8, multiplier=0.25, depth=1).segments()) == 8  # auto: per iteration


def peak(t: int, **kw) -> int:
    torch.manual_seed(0)
    model = BiONet(iterations=t, multiplier=0.25, depth=3, **kw)
    return peak_step_memory(model, torch.randn(2, 3, 64, 64))


def test_memory_growth_with_t_is_a_tenth_when_checkpointed():
    plain = peak(8) - peak(2)
    ckpt = peak(8, checkpoint_iters=True) - peak(2, checkpoint_iters=True)
    assert plain > 0
    assert ckpt <= 0.1 * plain, (plain, ckpt)


def test_segments_keep_fewer_boundaries():
    per_iteration = peak(16, checkpoint_iters=True, checkpoint_segments=16)
    segmented = peak(16, checkpoint_iters=True, checkpoint_segments=4)
    assert segmented < per_iteration


def test_peak_count_is_deterministic_and_sees_saved_tensors():
    assert peak(3) == peak(3)
    model = BiONet(iterations=1, multiplier=0.25, depth=1)
    x = torch.randn(1, 3, 64, 64)
    # the first block alone saves a (1, 8, 64, 64) float32 activation (128 KiB) several times over
    assert peak_step_memory(model, x) > 4 * 8 * 64 * 64 * 4
