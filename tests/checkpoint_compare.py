"""The exactness check of activation checkpointing, shared by the BiO-Net and BiO-LinkNet tests."""
from __future__ import annotations

import copy
from typing import Callable

import torch
import torch.nn.functional as F


def step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """One forward + backward from zeroed gradients; the loss (detached)."""
    model.zero_grad(set_to_none=True)
    loss = F.binary_cross_entropy_with_logits(model(x), y)
    loss.backward()
    return loss.detach()


def assert_checkpointing_is_exact(plain: torch.nn.Module,
                                  no_grad_ok: Callable[[str], bool] = lambda name: False) -> None:
    """Two train steps of `plain` and of a checkpointed copy on a (2, 3, 32, 32) batch: the same
    losses, gradients and BatchNorm buffers (the second step starts from updated running
    statistics, so a recomputation that updated them twice would show). `no_grad_ok(name)`: the
    parameters allowed to get no gradient (in both models alike)."""
    plain.train()
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, 32, 32)
    y = (torch.rand(2, 1, 32, 32) > 0.5).float()
    for _ in range(2):
        torch.testing.assert_close(step(ckpt, x, y), step(plain, x, y), rtol=1e-6, atol=0)
    for (k, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters()):
        if a.grad is None:
            assert b.grad is None and no_grad_ok(k), k
            continue
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=f"grad of {k}")
    for (k, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-8, msg=f"buffer {k}")
