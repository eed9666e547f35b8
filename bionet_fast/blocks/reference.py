"""The reference blocks: plain PyTorch, the ground truth for every test.

An activation ("Act") is a dense tensor (B, C, H, W) here; the fused backend uses a pending-affine
representation instead, behind the same five methods.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from . import stats_update_enabled


def batch_norm(x: torch.Tensor, bn: nn.BatchNorm2d) -> torch.Tensor:
    """nn.BatchNorm2d's forward on x (B, C, H, W), except that running statistics are left alone
    while `no_stats_update()` is active (train mode still normalises with batch statistics).
    `bn.momentum=None` is the cumulative moving average (factor 1/num_batches_tracked)."""
    if isinstance(bn, nn.SyncBatchNorm) and bn.training and stats_update_enabled():
        return bn(x)  # DDP --sync-bn: statistics reduced across processes by the module itself
    if bn.training:
        momentum = 0.0 if bn.momentum is None else bn.momentum
        if stats_update_enabled():
            bn.num_batches_tracked.add_(1)
            mean, var = bn.running_mean, bn.running_var
            if bn.momentum is None:  # cumulative moving average, as nn.BatchNorm2d
                momentum = 1.0 / float(bn.num_batches_tracked)
        else:
            # Scratch buffers rather than None: batch_norm saves its running-stat arguments, and the
            # recomputation must save exactly what the original forward saved.
            mean, var = torch.zeros_like(bn.running_mean), torch.ones_like(bn.running_var)
        return F.batch_norm(x, mean, var, bn.weight, bn.bias, True, momentum, bn.eps)
    return F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)


class RefOps:
    """conv -> ReLU -> BatchNorm blocks in pure PyTorch (ReLU before BN, as the paper orders them)."""

    name = "reference"

    def block(self, xs: Sequence[torch.Tensor], conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
        """cat(xs, dim=1) (B, sum C_i, H, W) -> conv3x3 -> ReLU -> BN -> (B, C_out, H, W)."""
        x = xs[0] if len(xs) == 1 else torch.cat(list(xs), dim=1)
        return batch_norm(F.relu(conv(x)), bn)

    def down(self, x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
        """DOWN: conv3x3 -> ReLU -> BN -> 2x2 max-pool: (B, C, H, W) -> (B, C_out, H/2, W/2)."""
        return F.max_pool2d(self.block([x], conv, bn), 2)

    def up(self, x: torch.Tensor, conv: nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> torch.Tensor:
        """UP: transposed conv (3, stride 2) -> ReLU -> BN: (B, C, H, W) -> (B, C_out, 2H, 2W)."""
        return batch_norm(F.relu(conv(x)), bn)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def from_dense(self, x: torch.Tensor) -> torch.Tensor:
        return x
