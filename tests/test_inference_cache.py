"""The fused backend's inference cache (blocks/inference_cache.py): eval-mode BatchNorm affines and
folded weights kept across forwards must never go stale. Interpreter-sized models."""
from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from bionet_fast import BiONet
from bionet_fast.blocks.inference_cache import InferenceCache


def fused_model(**kw) -> BiONet:
    torch.manual_seed(0)
    m = BiONet(backend="triton", iterations=2, multiplier=0.25, depth=1, **kw)
    with torch.no_grad():  # non-trivial running statistics, negative gammas (max-pool sign path)
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.5, 0.5)
                mod.running_var.uniform_(0.5, 2.0)
                mod.weight.uniform_(-1.5, 1.5)
    return m.eval()


def uncached(model: BiONet, x: torch.Tensor) -> torch.Tensor:
    """The forward of a fresh copy (empty cache): what the cached model must reproduce."""
    with torch.no_grad():
        return copy.deepcopy(model)(x)


def test_second_forward_reuses_and_matches():
    m = fused_model(integrate=True)
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        first = m(x)
        misses = m.inference_cache.misses
        second = m(x)
    assert len(m.inference_cache) > 0 and m.inference_cache.big_bytes > 0
    assert m.inference_cache.misses == misses, "second forward recomputed cached values"
    assert m.inference_cache.hits >= misses
    assert torch.equal(first, second)
    assert torch.equal(second, uncached(m, x))


def test_updates_invalidate_the_cache():
    m = fused_model()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        m(x)
        m.encoders[0].conv1.weight.mul_(0.5)        # in-place parameter update
        m.norms[1].enc[0][1].running_var.mul_(3.0)  # in-place buffer update
    assert torch.equal(torch.no_grad()(m)(x), uncached(m, x))

    other = fused_model()
    with torch.no_grad():
        other.norms[0].mid[0].bias.add_(1.0)
    m.load_state_dict(other.state_dict())
    assert torch.equal(torch.no_grad()(m)(x), uncached(other, x))


def test_training_step_then_eval_is_fresh():
    """Train-mode forwards update running statistics inside the kernels (no _version bump)."""
    m = fused_model(backward_skips=1)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        before = m(x)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.1)
    F.binary_cross_entropy_with_logits(m(x), torch.ones(2, 1, 8, 8)).backward()
    opt.step()
    m.eval()
    with torch.no_grad():
        after = m(x)
    assert not torch.equal(before, after)
    assert torch.equal(after, uncached(m, x))


def test_single_bn_in_train_mode_inside_an_eval_model():
    m = fused_model()
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        m(x)
        m.norms[0].enc[0][0].train()  # updates its running stats in a no-grad forward
        m(x)
        m.norms[0].enc[0][0].eval()
        got = m(x)
    assert torch.equal(got, uncached(m, x))


def test_grad_enabled_or_zero_budget_bypass_big_entries():
    m = fused_model()
    x = torch.randn(1, 3, 8, 8)
    m(x)  # eval with grad enabled: no cache
    assert len(m.inference_cache) == 0
    m.inference_cache = InferenceCache(budget_bytes=0)
    with torch.no_grad():
        a, b = m(x), m(x)
    assert m.inference_cache.big_bytes == 0 and torch.equal(a, b)


def test_copies_start_empty():
    m = fused_model()
    with torch.no_grad():
        m(torch.randn(1, 3, 8, 8))
    assert len(m.inference_cache) > 0
    assert len(copy.deepcopy(m).inference_cache) == 0
    m.double()
    assert len(m.inference_cache) == 0
