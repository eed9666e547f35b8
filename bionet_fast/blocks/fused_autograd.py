"""Autograd functions of the fused backend: each fused block's forward and backward.

An activation is a `Pending(raw, scale, shift)` whose value is raw * scale[c] + shift[c] (the
producer's BatchNorm, deferred into its consumers: see blocks/fused.py). The functions:
    ConvReluFn  (x1, s1, b1, x2, s2, b2, weight, bias) -> y, (mean, m2 non-differentiable)
    BNAffineFn  (y, gamma, beta; mean, m2 reused)      -> scale, shift of the batch BatchNorm
    DownFn      DOWN's conv + ReLU + statistics + sign-aware 2x2 max-pool, y recomputed in backward
    UpFn        UP's transposed conv + ReLU on a pending input, its input recomputed in backward
Each saves what its backward cannot cheaply rebuild and nothing else: no concatenation, no
normalised tensor, no materialised pending input.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

from bionet_fast.kernels.bn_stats import bn_affine_backward, bn_finalize
from bionet_fast.kernels.conv_fwd import conv3x3_fwd
from bionet_fast.kernels.padding import padded

# ConvReluFn.backward: bionet_fast.kernels.conv_bwd (default) or torch math (BIONET_FAST_TRITON_BWD=0).
_TRITON_BWD = os.environ.get("BIONET_FAST_TRITON_BWD", "1") != "0"


def set_triton_backward(enabled: bool) -> None:
    """Route ConvReluFn.backward through bionet_fast.kernels.conv_bwd (True) or torch (False)."""
    global _TRITON_BWD
    _TRITON_BWD = bool(enabled)


def triton_backward_enabled() -> bool:
    """Whether the fused blocks' backward runs the Triton kernels (else torch math)."""
    return _TRITON_BWD


class Pending(NamedTuple):
    """An activation with a deferred per-channel affine.

    raw: (B, C, H, W), any layout (channels_last is the fast one).
    scale, shift: (C,) fp32 (fp64 in float64 tests), or both None for the identity.
    """

    raw: torch.Tensor
    scale: Optional[torch.Tensor] = None
    shift: Optional[torch.Tensor] = None

    def value(self) -> torch.Tensor:
        """Materialise raw * scale + shift in raw's dtype (B, C, H, W); differentiable."""
        if self.scale is None:
            return self.raw
        v = self.raw * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        return v.to(self.raw.dtype)


def _affine(x: torch.Tensor, s: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> torch.Tensor:
    """x * s + b per channel, in fp32 (or wider), rounded back to x's dtype as the kernel does."""
    if s is None:
        return x
    return (x * s.view(1, -1, 1, 1) + b.view(1, -1, 1, 1)).to(x.dtype)


def pending_input_grads(dv: torch.Tensor, raw: torch.Tensor, scale: Optional[torch.Tensor],
                        needs=(True, True, True)):
    """(d raw, d scale, d shift) of v = raw * scale + shift given dL/dv (B,C,H,W); the (C,) sums
    in fp32 (fp64 for fp64). Without an affine (scale None) v is raw: (dv, None, None)."""
    if scale is None:
        return (dv.to(raw.dtype) if needs[0] else None), None, None
    wide = torch.float64 if dv.dtype == torch.float64 else torch.float32
    draw = (dv * scale.view(1, -1, 1, 1)).to(raw.dtype) if needs[0] else None
    dscale = (dv.to(wide) * raw.to(wide)).sum((0, 2, 3)).to(scale.dtype) if needs[1] else None
    dshift = dv.sum((0, 2, 3), dtype=wide).to(scale.dtype) if needs[2] else None
    return draw, dscale, dshift


def _conv_relu_backward_torch(gy, y, weight, x1, x2, s1, b1, s2, b2, needs, pad="zeros"):
    """Torch reference of the fused backward; same outputs as kernels.conv_bwd (dweight, dbias in
    weight's dtype here). A = pad(cat(affine(x1), affine(x2))) is recomputed, never saved."""
    dz = gy * (y > 0)
    c1 = x1.shape[1]
    a = _affine(x1, s1, b1)
    if x2 is not None:
        a = torch.cat([a, _affine(x2, s2, b2)], dim=1)
    w = weight.to(dz.dtype)
    dx1 = ds1 = db1 = dx2 = ds2 = db2 = dweight = dbias = None
    if any(needs[:6]):
        if pad == "zeros":
            da = torch.nn.grad.conv2d_input(a.shape, w, dz, padding=1)
        else:  # conv(pad(A)) is linear in A: autograd at A = 0 gives the adjoint of the padding too
            with torch.enable_grad():
                a0 = torch.zeros_like(a, requires_grad=True)
                (da,) = torch.autograd.grad(F.conv2d(padded(a0, pad), w), a0, dz)
        dx1, ds1, db1 = pending_input_grads(da[:, :c1], x1, s1)
        if x2 is not None:
            dx2, ds2, db2 = pending_input_grads(da[:, c1:], x2, s2)
    if needs[6]:
        ap, p = (a, 1) if pad == "zeros" else (padded(a, pad), 0)
        dweight = torch.nn.grad.conv2d_weight(ap, weight.shape, dz, padding=p).to(weight.dtype)
    if needs[7]:
        dbias = dz.sum((0, 2, 3), dtype=torch.float64 if dz.dtype == torch.float64 else torch.float32)
    return dx1, ds1, db1, dx2, ds2, db2, dweight, dbias


class ConvReluFn(torch.autograd.Function):
    """y = relu(conv3x3(cat(pad0(x1*s1+b1), pad0(x2*s2+b2))) + bias), plus BN statistics of y.

    forward(x1 (B,C1,H,W), s1, b1 (C1,)|None, x2 (B,C2,H,W)|None, s2, b2 (C2,)|None,
            weight (Cout,C1+C2,3,3), bias (Cout,)|None, want_stats, packed_weight|None, folded|None,
            pad ("zeros", "reflect", "replicate": how conv3x3 pads, after the affines))
        -> y (B,Cout,H,W) channels_last, mean (Cout,)|None, m2 (Cout,)|None (non-differentiable).
    """

    @staticmethod
    def forward(ctx, x1, s1, b1, x2, s2, b2, weight, bias, want_stats=True, packed_weight=None,
                folded=None, pad="zeros"):
        y, mean, m2 = conv3x3_fwd(x1, weight, bias, x2, s1, b1, s2, b2, want_stats=want_stats,
                                  packed_weight=packed_weight, folded=folded, pad=pad)
        ctx.save_for_backward(x1, s1, b1, x2, s2, b2, weight, y)
        ctx.bias_dtype, ctx.pad = (None if bias is None else bias.dtype), pad
        if mean is not None:
            ctx.mark_non_differentiable(mean, m2)
        ctx.set_materialize_grads(False)
        return y, mean, m2

    @staticmethod
    def backward(ctx, gy, _gmean, _gm2):
        x1, s1, b1, x2, s2, b2, weight, y = ctx.saved_tensors
        if gy is None:  # grads are not materialised (no zero tensors for mean and m2 either)
            return (None,) * 12
        grads = conv_relu_backward(gy, y, weight, x1, x2, s1, b1, s2, b2, ctx.needs_input_grad[:8],
                                   ctx.bias_dtype, ctx.pad)
        return (*grads, None, None, None, None)


def conv_relu_backward(gy, y, weight, x1, x2, s1, b1, s2, b2, needs, bias_dtype, pad="zeros"):
    """Gradients of ConvReluFn's inputs (x1, s1, b1, x2, s2, b2, weight, bias) given dL/dy (B,Co,H,W)
    and y: Triton dgrad/wgrad kernels, or torch math with BIONET_FAST_TRITON_BWD=0. `needs`: which
    of the eight are wanted (the others come back None). pad: the forward's padding mode."""
    if _TRITON_BWD:
        from bionet_fast.kernels.conv_bwd import conv3x3_dgrad, conv3x3_wgrad

        dx1 = dx2 = ds1 = db1 = ds2 = db2 = dweight = dbias = None
        if any(needs[:6]):
            dx1, dx2, ds1, db1, ds2, db2 = conv3x3_dgrad(gy, y, weight, x1.shape[1], x1, x2, s1, s2, pad=pad)
        if needs[6] or needs[7]:
            dweight, dbias = conv3x3_wgrad(gy, y, x1, x2, s1, b1, s2, b2, pad=pad)
    else:
        dx1, ds1, db1, dx2, ds2, db2, dweight, dbias = _conv_relu_backward_torch(
            gy, y, weight, x1, x2, s1, b1, s2, b2, needs, pad)
    dweight = None if dweight is None or not needs[6] else dweight.to(weight.dtype)
    dbias = None if dbias is None or not needs[7] else dbias.to(bias_dtype)
    grads = [dx1, ds1, db1, dx2, ds2, db2]
    return [g if n else None for g, n in zip(grads, needs[:6])] + [dweight, dbias]


class BNAffineFn(torch.autograd.Function):
    """BatchNorm's batch affine of y as a differentiable function of y, gamma and beta; updates the
    running statistics once.

    forward(y (B,C,H,W), mean (C,), m2 (C,) (from the conv's epilogue, non-differentiable),
            gamma, beta (C,) or None, eps, running_mean, running_var, num_batches_tracked (or None),
            momentum, update)
        -> scale = gamma * invstd, shift = beta - mean * scale (C,), invstd = 1/sqrt(m2/N + eps).
    One finalize launch forward; backward one launch for the (C,) coefficients and one pass over y
    (dL/dy = alpha * y + beta_c), instead of a dozen small torch ops per block.
    """

    @staticmethod
    def forward(ctx, y, mean, m2, gamma, beta, eps, running_mean, running_var, nbt, momentum, update):
        count = y.numel() // y.shape[1]
        scale, shift, mean, invstd = bn_finalize(mean, m2, count, gamma, beta, running_mean, running_var,
                                                 nbt, momentum, eps, update)
        ctx.save_for_backward(y, mean, invstd, gamma)
        ctx.set_materialize_grads(False)  # an unused scale or shift needs no zero tensor
        return scale, shift

    @staticmethod
    def backward(ctx, g_scale, g_shift):
        y, mean, invstd, gamma = ctx.saved_tensors
        dy, g_gamma, g_beta = affine_backward(y, mean, invstd, gamma, g_scale, g_shift, ctx.needs_input_grad[0])
        needs = ctx.needs_input_grad
        return (dy, None, None, g_gamma if needs[3] else None, g_beta if needs[4] else None,
                None, None, None, None, None, None)


def affine_backward(y, mean, invstd, gamma, g_scale, g_shift, need_y: bool = True):
    """(dL/dy (B,C,H,W) or None, dL/dgamma, dL/dbeta (C,)) of the batch affine of y given dL/dscale
    and dL/dshift (C,) (either may be None)."""
    alpha, beta_c, g_gamma, g_beta = bn_affine_backward(g_scale, g_shift, mean, invstd, gamma,
                                                        y.numel() // y.shape[1])
    dy = torch.addcmul(beta_c.view(1, -1, 1, 1), y, alpha.view(1, -1, 1, 1)).to(y.dtype) if need_y else None
    return dy, g_gamma, g_beta


class SignedMaxPoolFn(torch.autograd.Function):
    """max_pool2d(y * sgn, 2) for sgn (C,) = +-1: pooling BEFORE a per-channel affine whose scale
    has sign sgn equals pooling after it. Saves nothing new (y is ConvReluFn's saved output):
    the backward recomputes the argmax instead of keeping int64 indices alive."""

    @staticmethod
    def forward(ctx, y, sgn):
        ctx.save_for_backward(y, sgn)
        return F.max_pool2d(y * sgn.view(1, -1, 1, 1), 2)

    @staticmethod
    def backward(ctx, g):
        y, sgn = ctx.saved_tensors
        return signed_pool_backward(y, sgn, g), None


def signed_pool_backward(y, sgn, g) -> torch.Tensor:
    """dL/dy of max_pool2d(y * sgn, 2) given dL/dpooled g: the argmax is recomputed, not stored."""
    with torch.enable_grad():
        yy = y.detach().requires_grad_(True)
        out = F.max_pool2d(yy * sgn.view(1, -1, 1, 1), 2)
        (dy,) = torch.autograd.grad(out, yy, g)
    return dy


def up_conv(v, weight, bias, stride, padding, output_padding, edge=None):
    """UP's transposed conv of v (B,C,H,W) -> (B,Co,sH,sW), before the ReLU. edge: None (the official
    deconv) or a torch pad mode ("reflect", "replicate"): the input is padded by one row / column at
    the bottom / right with it and the output cropped, as models.bionet._EdgeUp does."""
    if edge is None:
        return F.conv_transpose2d(v, weight, bias, stride, padding, output_padding)
    h, w = v.shape[-2:]
    z = F.conv_transpose2d(F.pad(v, (0, 1, 0, 1), mode=edge), weight, bias, stride, padding, output_padding)
    return z[..., :stride[0] * h, :stride[1] * w]


def _edge_adjoint(dv, shape, edge):
    """dL/dv of F.pad(v, (0, 1, 0, 1), mode=edge) given dL/d(padded) dv: the extra row / column
    added back where it was read from."""
    with torch.enable_grad():
        v0 = torch.zeros(shape, dtype=dv.dtype, device=dv.device, requires_grad=True)
        (g,) = torch.autograd.grad(F.pad(v0, (0, 1, 0, 1), mode=edge), v0, dv)
    return g


class UpFn(torch.autograd.Function):
    """UP's transposed conv + ReLU on a pending input: relu(conv_transpose2d(raw*s + b, W, bias)).

    forward(raw (B,C,H,W), scale, shift (C,)|None, weight (C,Co,3,3), bias (Co,)|None, dtype,
            stride, padding, output_padding, edge=None) -> y (B,Co,2H,2W) in dtype (edge: see up_conv).
    Saves raw (another block's output, alive anyway), y and the parameters: not the materialised
    input, which autograd would keep for the weight gradient (a whole activation per UP per
    iteration), nor a per-iteration cast copy of the weight. The backward recomputes the input
    (one elementwise pass) and calls the transposed conv's own backward (cuDNN on the GPU).
    """

    @staticmethod
    def forward(ctx, raw, scale, shift, weight, bias, dtype, stride, padding, output_padding, edge=None):
        v = Pending(raw, scale, shift).value().to(dtype)
        w = weight.to(dtype)
        y = torch.relu(up_conv(v, w, None if bias is None else bias.to(dtype), stride, padding, output_padding,
                               edge))
        ctx.save_for_backward(raw, scale, shift, weight, y)
        ctx.conf = (dtype, stride, padding, output_padding, bias is not None, edge)
        return y

    @staticmethod
    def backward(ctx, gy):
        raw, scale, shift, weight, y = ctx.saved_tensors
        dtype, stride, padding, output_padding, has_bias, edge = ctx.conf
        need_raw, need_s, need_b, need_w, need_bias = ctx.needs_input_grad[:5]
        dz = (gy * (y > 0)).to(dtype)
        v = Pending(raw, scale, shift).value().to(dtype)
        if edge is not None:  # the padded input; the cropped output rows / columns get no gradient
            v = F.pad(v, (0, 1, 0, 1), mode=edge)
            full = [(v.shape[i] - 1) * stride[i - 2] - 2 * padding[i - 2] + 3 + output_padding[i - 2]
                    for i in (2, 3)]
            dz = F.pad(dz, (0, full[1] - dz.shape[3], 0, full[0] - dz.shape[2]))
        dv, dw, dbias = torch.ops.aten.convolution_backward(
            dz, v, weight.to(dtype), [weight.shape[1]] if has_bias else None, list(stride), list(padding),
            [1, 1], True, list(output_padding), 1, [need_raw or need_s or need_b, need_w, need_bias and has_bias])
        draw = dscale = dshift = None
        if dv is not None and edge is not None:
            dv = _edge_adjoint(dv, raw.shape, edge)
        if dv is not None:
            draw, dscale, dshift = pending_input_grads(dv, raw, scale, (need_raw, need_s, need_b))
        dw = None if dw is None else dw.to(weight.dtype)
        dbias = None if dbias is None or not need_bias else dbias.to(weight.dtype)
        return draw, dscale, dshift, dw, dbias, None, None, None, None, None


class DownFn(torch.autograd.Function):
    """DOWN with its conv output recomputed: y = relu(conv3x3(pad0(x*s + b)) + bias), the batch
    affine of y (running statistics updated once, as BNAffineFn), pooled = max_pool2d(y * sgn, 2) * sgn.

    forward(x (B,C,H,W), s, b (C,)|None, weight (Co,C,3,3), bias (Co,)|None, gamma, beta (Co,)|None,
            sgn (Co,) = sign of gamma, eps, running_mean, running_var, num_batches_tracked,
            momentum, update, packed, pad)
        -> pooled (B,Co,H/2,W/2) (raw, before the pending BatchNorm), scale (Co,), shift (Co,).
    DOWN's y is the largest tensor of its level (twice the channels at the level's resolution);
    keeping only x (another block's output, alive anyway) and the pooled result cuts what an
    iteration saves by about a quarter, for one more conv forward (no statistics) in backward.
    """

    @staticmethod
    def forward(ctx, x, s, b, weight, bias, gamma, beta, sgn, eps, running_mean, running_var, nbt,
                momentum, update, packed=None, pad="zeros"):
        y, mean, m2 = conv3x3_fwd(x, weight, bias, None, s, b, want_stats=True, packed_weight=packed, pad=pad)
        count = y.numel() // y.shape[1]
        scale, shift, mean, invstd = bn_finalize(mean, m2, count, gamma, beta, running_mean, running_var,
                                                 nbt, momentum, eps, update)
        pooled = F.max_pool2d(y * sgn.view(1, -1, 1, 1), 2) * sgn.view(1, -1, 1, 1)
        ctx.save_for_backward(x, s, b, weight, bias, gamma, sgn, mean, invstd)
        ctx.bias_dtype, ctx.pad = (None if bias is None else bias.dtype), pad
        ctx.set_materialize_grads(False)
        return pooled, scale, shift

    @staticmethod
    def backward(ctx, g_pooled, g_scale, g_shift):
        x, s, b, weight, bias, gamma, sgn, mean, invstd = ctx.saved_tensors
        y, _, _ = conv3x3_fwd(x, weight, bias, None, s, b, want_stats=False, pad=ctx.pad)  # bitwise the forward's y
        gy, g_gamma, g_beta = affine_backward(y, mean, invstd, gamma, g_scale, g_shift)
        if g_pooled is not None:
            gy = gy + signed_pool_backward(y, sgn, g_pooled * sgn.view(1, -1, 1, 1))
        needs = ctx.needs_input_grad
        grads = conv_relu_backward(gy, y, weight, x, None, s, b, None, None,
                                   (*needs[:3], False, False, False, *needs[3:5]), ctx.bias_dtype, ctx.pad)
        dx, ds, db, _, _, _, dweight, dbias = grads
        return (dx, ds, db, dweight, dbias, g_gamma if needs[5] else None, g_beta if needs[6] else None,
                None, None, None, None, None, None, None, None, None)
