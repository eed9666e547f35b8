"""Fused blocks: conv3x3 -> ReLU -> BatchNorm with the BatchNorm deferred into its consumers.

An activation is a `Pending(raw, scale, shift)` whose value is raw * scale[c] + shift[c]: a block
never runs its own BatchNorm pass; its (scale, shift) = (gamma*invstd, beta - mean*gamma*invstd)
is applied by the next conv as it loads its input (kernels.conv_fwd), by `dense`, or by the
transposed conv of UP. The statistics come out of the conv's epilogue, so a block reads its inputs
once and writes its output once.

Autograd (blocks/fused_autograd.py): ConvReluFn (conv + ReLU + statistics), BNAffineFn (the
batch affine scale = gamma * invstd, shift = beta - mean * scale as a function of y, gamma, beta),
DownFn, UpFn.
What a training forward keeps: each block's ReLU output (not DOWN's, recomputed), pooled outputs
and (C,) vectors; no concatenation, no normalised tensor, no materialised pending input.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
from torch import nn

from bionet_fast.kernels.bn_stats import bn_eval_affine, bn_finalize, bn_stats
from bionet_fast.kernels.conv_fwd import fold_affine, pack_weight

from . import stats_update_enabled
from .fused_autograd import (BNAffineFn, ConvReluFn, DownFn, Pending, SignedMaxPoolFn, UpFn,  # noqa: F401
                             set_triton_backward, triton_backward_enabled, up_conv)
from .inference_cache import InferenceCache

# torch.compile does not trace into the fused blocks: they launch their own (autotuned) Triton
# kernels and keep per-call state (the inference cache); Dynamo runs them as they are, between the
# graphs it compiles around them. The fused path does not need Inductor, and CUDA graphs capture it.
_opaque_to_compile = torch.compiler.disable

# DOWN recomputes its full-resolution output in backward (DownFn): a quarter less saved per iteration
# for one more conv forward per level. BIONET_FAST_RECOMPUTE_DOWN=0 keeps it instead (speed over memory).
RECOMPUTE_DOWN = os.environ.get("BIONET_FAST_RECOMPUTE_DOWN", "1") != "0"


#: the 3x3 convs' padding modes the kernels implement (kernels/padding.py)
FUSED_PADDING = ("zeros", "reflect", "replicate")


def _check_conv(conv: nn.Module) -> str:
    """The conv's padding mode, after checking that the kernels compute this conv."""
    ok = (isinstance(conv, nn.Conv2d) and tuple(conv.kernel_size) == (3, 3) and tuple(conv.stride) == (1, 1)
          and tuple(conv.padding) == (1, 1) and tuple(conv.dilation) == (1, 1) and conv.groups == 1
          and conv.padding_mode in FUSED_PADDING)
    if not ok:
        raise ValueError(f"FusedOps.block fuses only nn.Conv2d(kernel_size=3, padding=1, stride=1, "
                         f"groups=1, padding_mode in {FUSED_PADDING}); got {conv!r}. Use the reference "
                         "backend for others.")
    return conv.padding_mode


class FusedOps:
    """The `Ops` interface (see blocks.reference.RefOps) on fused Triton kernels; Act = Pending.

    One instance per forward: it caches the packed (9, Cin, Cout) conv weights, which BiO-Net's
    iterations share, and checks the weight's version so an in-place update is never missed.
    A pending input affine is folded into the weights by conv3x3_fwd (one small launch per call).
    With an `InferenceCache` (the model passes its own in eval mode without grad) the eval-mode
    BatchNorm affines, the folded weights and the casts are kept across forwards instead.
    """

    name = "triton"

    def __init__(self, cache: Optional[InferenceCache] = None) -> None:
        # this forward's packed weights (held whatever their size, validated as the cache's are)
        self._packs = InferenceCache(budget_bytes=0)
        self._cache = cache
        self._stable: set = set()  # ids of affine vectors that came out of the cache

    # --- inference cache ------------------------------------------------------------------------
    def _caching(self) -> bool:
        return self._cache is not None and not torch.is_grad_enabled()

    def _memo(self, tag, inputs, compute, big=False):
        """compute() through the inference cache; tensors it returns count as stable inputs."""
        value = self._cache.get(tag, inputs, compute, big=big)
        for v in value if isinstance(value, tuple) else (value,):
            self._stable.add(id(v))
        return value

    def _is_stable(self, *xs: Pending) -> bool:
        """True when every pending affine of xs is a cached (call-to-call identical) tensor."""
        return all(v is None or id(v) in self._stable for x in xs for v in (x.scale, x.shift))

    def _folded(self, weight: torch.Tensor, dtype: torch.dtype, x1: Pending, x2: Pending):
        """Cached fold_affine of weight with x1's / x2's affines, or None when not cacheable."""
        if not self._caching() or (x1.scale is None and x2.scale is None) or not self._is_stable(x1, x2):
            return None
        c1 = x1.raw.shape[1]
        s2, b2 = (x2.scale, x2.shift) if x2.raw is not None else (None, None)

        def fold():
            return fold_affine(pack_weight(weight, weight.dtype), dtype, c1, x1.scale, x1.shift, s2, b2)

        return self._memo(("fold", dtype, c1), (weight, x1.scale, x1.shift, s2, b2), fold, big=True)

    def _cast(self, t: Optional[torch.Tensor], dtype: torch.dtype) -> Optional[torch.Tensor]:
        if t is None or t.dtype == dtype:
            return t
        if self._caching():
            return self._memo(("cast", dtype), (t,), lambda: t.to(dtype), big=True)
        return t.to(dtype)

    # --- helpers ------------------------------------------------------------------------------
    @staticmethod
    def _dtype(x: torch.Tensor) -> torch.dtype:
        """The compute dtype: autocast's when it is on for x's device, else x's own."""
        if torch.is_autocast_enabled(x.device.type):
            return torch.get_autocast_dtype(x.device.type)
        return x.dtype

    def _packed(self, weight: torch.Tensor, dtype: torch.dtype, *xs: Pending) -> torch.Tensor:
        """Packed (9, Cin, Cout) weight: in the compute dtype when no input has a pending affine,
        else in the weight's own dtype (the kernel folds the affine into it, rounding once)."""
        if any(x.scale is not None for x in xs):
            dtype = weight.dtype
        def pack():
            return pack_weight(weight, dtype)

        if self._caching():
            return self._memo(("pack", dtype), (weight,), pack, big=True)
        return self._packs.get(("pack", dtype), (weight,), pack)

    def _updates_running_stats(self, bn: nn.BatchNorm2d) -> bool:
        """Whether this call of `bn` updates its running statistics; if so, the inference cache is
        cleared (the kernels write them in place without bumping `_version`)."""
        update = bn.training and bn.running_mean is not None and stats_update_enabled()
        if update and self._cache is not None:
            self._cache.clear()
        return update

    def _bn_affine(self, y: torch.Tensor, mean, m2, bn: nn.BatchNorm2d):
        """(scale, shift) (C,) of BatchNorm `bn` applied to y (B, C, H, W)."""
        gamma, beta = bn.weight, bn.bias
        batch = bn.training or bn.running_mean is None
        grad = torch.is_grad_enabled() and (y.requires_grad or (gamma is not None and gamma.requires_grad))
        if not batch:
            if not grad:
                def affine():
                    return bn_eval_affine(gamma, beta, bn.running_mean, bn.running_var, bn.eps)

                if self._caching():
                    return self._memo(("bn", bn.eps), (gamma, beta, bn.running_mean, bn.running_var), affine)
                return affine()
            invstd = torch.rsqrt(bn.running_var + bn.eps)
            scale = invstd if gamma is None else gamma * invstd
            return scale, (-bn.running_mean * scale if beta is None else beta - bn.running_mean * scale)
        if mean is None:
            mean, m2, _ = bn_stats(y)
        update = self._updates_running_stats(bn)
        count = y.numel() // y.shape[1]
        if not grad:
            scale, shift, _, _ = bn_finalize(mean, m2, count, gamma, beta, bn.running_mean,
                                             bn.running_var, bn.num_batches_tracked, bn.momentum,
                                             bn.eps, update)
            return scale, shift
        return BNAffineFn.apply(y, mean, m2, gamma, beta, bn.eps, bn.running_mean, bn.running_var,
                                bn.num_batches_tracked, bn.momentum, update)

    # --- the Ops interface ----------------------------------------------------------------------
    @_opaque_to_compile
    def block(self, xs: Sequence[Pending], conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Pending:
        """cat(xs) (B, sum C_i, H, W) -> conv3x3 -> ReLU -> BN, BN left pending: (B, C_out, H, W)."""
        if len(xs) not in (1, 2):
            raise ValueError(f"FusedOps.block takes 1 or 2 inputs to concatenate, got {len(xs)}.")
        pad = _check_conv(conv)
        dt = self._dtype(xs[0].raw)
        x1 = xs[0]
        x2 = xs[1] if len(xs) == 2 else Pending(None)
        want = bn.training or bn.running_mean is None
        folded = self._folded(conv.weight, dt, x1, x2)
        packed = None if folded is not None else self._packed(conv.weight, dt, x1, x2)
        y, mean, m2 = ConvReluFn.apply(
            x1.raw.to(dt), x1.scale, x1.shift, None if x2.raw is None else x2.raw.to(dt),
            x2.scale, x2.shift, conv.weight, conv.bias, want, packed, folded, pad)
        return Pending(y, *self._bn_affine(y, mean, m2, bn))

    @_opaque_to_compile
    def down(self, x: Pending, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Pending:
        """DOWN: conv3x3 -> ReLU -> BN -> 2x2 max-pool: (B, C, H, W) -> (B, C_out, H/2, W/2).

        Pooling is done on raw with per-channel sign of the scale (gamma may be negative), so the
        result is max-pool(BN(y)) exactly while BN itself stays pending. Training with grad goes
        through DownFn, which does not keep the full-resolution y for backward (it recomputes it).
        """
        if RECOMPUTE_DOWN and torch.is_grad_enabled() and (bn.training or bn.running_mean is None):
            return self._down_recomputed(x, conv, bn)
        p = self.block([x], conv, bn)

        def signs():
            sgn = torch.where(p.scale >= 0, 1.0, -1.0).detach()
            return sgn.to(p.raw.dtype), p.scale * sgn.to(p.scale.dtype)

        if self._caching() and self._is_stable(p):
            sgn, scale = self._memo(("down", p.raw.dtype), (p.scale,), signs)
        else:
            sgn, scale = signs()
        pooled = SignedMaxPoolFn.apply(p.raw, sgn)
        return Pending(pooled, scale, p.shift)

    def _down_recomputed(self, x: Pending, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Pending:
        pad = _check_conv(conv)
        dt = self._dtype(x.raw)
        gamma, beta = bn.weight, bn.bias
        sgn = torch.ones(conv.out_channels, device=x.raw.device) if gamma is None else \
            torch.where(gamma >= 0, 1.0, -1.0).detach()  # sign(gamma * invstd) = sign(gamma)
        update = self._updates_running_stats(bn)
        pooled, scale, shift = DownFn.apply(
            x.raw.to(dt), x.scale, x.shift, conv.weight, conv.bias, gamma, beta, sgn.to(dt), bn.eps,
            bn.running_mean, bn.running_var, bn.num_batches_tracked, bn.momentum, update,
            self._packed(conv.weight, dt, x), pad)
        return Pending(pooled, scale, shift)

    @_opaque_to_compile
    def up(self, x: Pending, conv: nn.ConvTranspose2d, bn: nn.BatchNorm2d) -> Pending:
        """UP: transposed conv (3, s2, p1, op1) -> ReLU -> BN: (B, C, H, W) -> (B, C_out, 2H, 2W).

        The transposed conv is PyTorch's (cuDNN) on the materialised input; the statistics come
        from the bn_stats kernel and BN stays pending. An `_EdgeUp` (padded models: `edge_mode`)
        reads its bottom / right edge padded by that mode, as the reference does."""
        dt = self._dtype(x.raw)
        if tuple(conv.dilation) != (1, 1) or conv.groups != 1:
            raise ValueError(f"FusedOps.up takes an nn.ConvTranspose2d without dilation or groups; got {conv!r}.")
        edge = getattr(conv, "edge_mode", None)
        if self._caching():  # inference: the cast weights are kept between calls
            v = self.dense(x).to(dt)
            y = torch.relu_(up_conv(v, self._cast(conv.weight, dt), self._cast(conv.bias, dt),
                                    conv.stride, conv.padding, conv.output_padding, edge))
        else:
            y = UpFn.apply(x.raw.to(dt), x.scale, x.shift, conv.weight, conv.bias, dt,
                           tuple(conv.stride), tuple(conv.padding), tuple(conv.output_padding), edge)
        return Pending(y, *self._bn_affine(y, None, None, bn))

    def dense(self, x: Pending) -> torch.Tensor:
        """The materialised value (B, C, H, W) in raw's dtype."""
        return x.value()

    def from_dense(self, x: torch.Tensor) -> Pending:
        """A dense tensor as an activation (identity affine: scale = shift = None)."""
        return Pending(x)
