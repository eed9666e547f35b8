"""FusedOps (bionet_fast/blocks/fused.py) against a plain torch reference, forward and backward.

The reference is cat -> conv -> ReLU -> nn.BatchNorm2d (-> max-pool / transposed conv) on the
materialised inputs; gradients are compared with torch autograd in float64. Runs in Triton's CPU
interpreter on tiny odd shapes; with TRITON_INTERPRET=0 on a CUDA machine the same tests run on the
GPU and the GPU twins add real sizes.
"""
import copy
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402
from torch import nn  # noqa: E402

from bionet_fast.blocks import no_stats_update  # noqa: E402
from bionet_fast.blocks import fused  # noqa: E402
from bionet_fast.blocks.fused import BNAffineFn, ConvReluFn, FusedOps, Pending  # noqa: E402

CUDA = torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1"
DEV = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="GPU twin: needs CUDA and TRITON_INTERPRET=0")
FP32_RTOL = 5e-3 if CUDA else 1e-4  # TF32 tensor cores on the GPU (fused and cuDNN alike)
# float64: compiled kernels take eps / momentum as fp32 scalars, which shows at ~1e-10 in
# train-mode BatchNorm over few pixels (small variances); the interpreter keeps them in fp64.
F64_RTOL = 1e-8 if CUDA else 1e-10


def _close(got, want, rtol, what):
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item(), 1e-6)
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max |err| {err:.3g} > {rtol:g} * {scale:.3g}"


def _modules(kind, cin, cout, dtype, device, seed, momentum=0.1):
    torch.manual_seed(seed)
    if kind == "up":
        conv = nn.ConvTranspose2d(cin, cout, 3, stride=2, padding=1, output_padding=1)
    else:
        conv = nn.Conv2d(cin, cout, 3, padding=1)
    bn = nn.BatchNorm2d(cout, momentum=momentum)
    with torch.no_grad():  # negative gammas: max-pool must see the affine's sign
        bn.weight.normal_()
        bn.bias.normal_()
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
    conv, bn = conv.to(device, dtype), bn.to(device, dtype)
    return conv, bn, copy.deepcopy(conv), copy.deepcopy(bn)


def _inputs(bsz, chans, h, w, dtype, device, seed):
    """Pending inputs with random affines (negative scales included) and their dense values."""
    g = torch.Generator().manual_seed(seed)
    pend, dense = [], []
    for i, c in enumerate(chans):
        raw = torch.randn(bsz, c, h, w, generator=g, dtype=torch.float64).to(device, dtype)
        if i == 0:
            raw = raw.contiguous(memory_format=torch.channels_last)
        s = torch.randn(c, generator=g, dtype=torch.float64).to(device, torch.float32 if dtype != torch.float64 else dtype)
        b = torch.randn(c, generator=g, dtype=torch.float64).to(s)
        pend.append(Pending(raw, s, b))
        dense.append((raw.double() * s.double().view(1, -1, 1, 1) + b.double().view(1, -1, 1, 1)))
    return pend, dense


def _reference(kind, dense, conv, bn):
    x = torch.cat(dense, dim=1).to(conv.weight.dtype)
    y = bn(F.relu(conv(x)))
    return F.max_pool2d(y, 2) if kind == "down" else y


def _fused(ops, kind, pend, conv, bn):
    if kind == "block":
        return ops.block(pend, conv, bn)
    return getattr(ops, kind)(pend[0], conv, bn)


@settings(max_examples=8, deadline=None)
@given(kind=st.sampled_from(["block", "down", "up"]), two=st.booleans(), train=st.booleans(),
       bsz=st.sampled_from([1, 3]), h=st.integers(2, 7), w=st.integers(2, 7),
       chans=st.tuples(st.sampled_from([3, 5, 16]), st.sampled_from([3, 8])),
       cout=st.sampled_from([3, 8, 20]), seed=st.integers(0, 99))
def test_fused_forward_matches_reference_fp32(kind, two, train, bsz, h, w, chans, cout, seed):
    chans = chans if (two and kind == "block") else chans[:1]
    conv, bn, conv_r, bn_r = _modules(kind, sum(chans), cout, torch.float32, DEV, seed)
    conv_r.double(), bn_r.double()
    bn.train(train), bn_r.train(train)
    pend, dense = _inputs(bsz, chans, h, w, torch.float32, DEV, seed)
    with torch.no_grad():
        got = FusedOps().dense(_fused(FusedOps(), kind, pend, conv, bn))
        want = _reference(kind, dense, conv_r, bn_r)
    assert got.shape == want.shape and got.dtype == torch.float32
    _close(got, want, FP32_RTOL, f"{kind} forward")
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        _close(getattr(bn, name), getattr(bn_r, name), FP32_RTOL / 10, name)


@pytest.mark.parametrize("kind", ["block", "down", "up"])
def test_fused_forward_bf16_autocast(kind):
    chans = (5, 8) if kind == "block" else (8,)
    conv, bn, conv_r, bn_r = _modules(kind, sum(chans), 12, torch.float32, DEV, 1)
    conv_r.double(), bn_r.double()
    pend, dense = _inputs(2, chans, 6, 5, torch.bfloat16, DEV, 1)
    with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16):
        p = _fused(FusedOps(), kind, pend, conv, bn)
    assert p.raw.dtype == torch.bfloat16 and p.scale.dtype == torch.float32
    want = _reference(kind, dense, conv_r, bn_r)
    _close(FusedOps().dense(p), want, 2e-2, f"{kind} bf16 forward")
    _close(bn.running_var, bn_r.running_var, 2e-2, "running_var")


@pytest.mark.parametrize("kind", ["block", "down", "up"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_gradients_float64(kind, train):
    """Gradients of the whole fused block (inputs, input affines, conv and BN parameters) equal
    torch autograd of the reference in float64."""
    chans = (5, 3) if kind == "block" else (4,)
    conv, bn, conv_r, bn_r = _modules(kind, sum(chans), 6, torch.float64, DEV, 2)
    bn.train(train), bn_r.train(train)
    pend, _ = _inputs(2, chans, 5, 7 if kind != "down" else 6, torch.float64, DEV, 2)
    leaves = [t.requires_grad_(True) for p in pend for t in p]
    out = FusedOps().dense(_fused(FusedOps(), kind, pend, conv, bn))
    dense = [p.raw * p.scale.view(1, -1, 1, 1) + p.shift.view(1, -1, 1, 1) for p in pend]
    want = _reference(kind, dense, conv_r, bn_r)
    _close(out, want, F64_RTOL, "forward")
    g = torch.randn_like(want)
    params = [conv.weight, conv.bias, bn.weight, bn.bias]
    params_r = [conv_r.weight, conv_r.bias, bn_r.weight, bn_r.bias]
    got = torch.autograd.grad((out * g).sum(), leaves + params)
    ref = torch.autograd.grad((want * g).sum(), leaves + params_r)
    for i, (a, b) in enumerate(zip(got, ref)):
        _close(a, b, 10 * F64_RTOL, f"grad {i}")


def test_conv_relu_fn_gradcheck():
    """ConvReluFn's hand-written backward (torch math, swappable for kernels.conv_bwd) by gradcheck."""
    torch.manual_seed(0)
    d = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    x1, x2 = torch.randn(1, 2, 3, 4, **d), torch.randn(1, 3, 3, 4, **d)
    s1, b1, s2, b2 = torch.randn(2, **d), torch.randn(2, **d), torch.randn(3, **d), torch.randn(3, **d)
    w, bias = torch.randn(2, 5, 3, 3, **d), torch.randn(2, **d)
    fn = lambda *a: ConvReluFn.apply(*a, False, None)[0]  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x1, s1, b1, x2, s2, b2, w, bias), eps=1e-6, atol=1e-6,
                                    fast_mode=True)


@pytest.mark.parametrize("affine", [True, False], ids=["gamma-beta", "no-affine"])
def test_bn_affine_fn_gradcheck(affine):
    """BNAffineFn's analytic backward (the bn_affine_backward kernel) by gradcheck: y, gamma, beta."""
    from bionet_fast.kernels.bn_stats import bn_stats
    d = dict(dtype=torch.float64, device=DEV, requires_grad=True)
    y = torch.rand(2, 3, 3, 2, **d)
    gamma, beta = (torch.randn(3, **d), torch.randn(3, **d)) if affine else (None, None)

    def fn(y, *gb):
        mean, m2, _ = bn_stats(y.detach())
        return BNAffineFn.apply(y, mean, m2, *(gb or (None, None)), 1e-5, None, None, None, 0.1, False)

    assert torch.autograd.gradcheck(fn, (y, gamma, beta) if affine else (y,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["block", "down"])
def test_triton_backward_swap_matches_torch(kind):
    """set_triton_backward(True) routes ConvReluFn.backward through kernels.conv_bwd: same grads."""
    chans = (5, 3) if kind == "block" else (6,)
    conv, bn, _, _ = _modules(kind, sum(chans), 7, torch.float32, DEV, 6)
    pend, _ = _inputs(2, chans, 6, 5 if kind == "block" else 6, torch.float32, DEV, 6)
    leaves = [t.requires_grad_(True) for p in pend for t in p] + [conv.weight, conv.bias]
    g = None
    grads = []
    previous = fused.triton_backward_enabled()
    try:
        for flag in (False, True):
            fused.set_triton_backward(flag)
            out = FusedOps().dense(_fused(FusedOps(), kind, pend, conv, bn))
            g = torch.randn_like(out) if g is None else g
            grads.append(torch.autograd.grad((out * g).sum(), leaves))
    finally:
        fused.set_triton_backward(previous)
    for i, (a, b) in enumerate(zip(*grads)):
        _close(b, a, FP32_RTOL * 10, f"grad {i}")


def test_running_stats_update_once_and_no_stats_update():
    conv, bn, conv_r, bn_r = _modules("block", 4, 5, torch.float32, DEV, 3, momentum=None)
    pend, dense = _inputs(2, (4,), 5, 5, torch.float32, DEV, 3)
    ops = FusedOps()
    for _ in range(2):  # cumulative average (momentum=None) over two batches
        p = ops.block(pend, conv, bn)
        _reference("block", dense, conv_r.double(), bn_r.double())
    assert bn.num_batches_tracked.item() == 2
    _close(bn.running_var, bn_r.running_var, FP32_RTOL, "running_var")
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with no_stats_update():
        q = ops.block(pend, conv, bn)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed under no_stats_update()"
    _close(ops.dense(q), ops.dense(p), 1e-6, "batch statistics still used")


def test_packed_weight_cache_sees_in_place_updates():
    conv, bn, _, _ = _modules("block", 3, 4, torch.float32, DEV, 4)
    bn.eval()
    pend, _ = _inputs(1, (3,), 4, 4, torch.float32, DEV, 4)
    ops = FusedOps()
    with torch.no_grad():
        a = ops.dense(ops.block(pend, conv, bn))
        conv.weight.mul_(2.0)
        conv.bias.mul_(2.0)
        b = ops.dense(ops.block(pend, conv, bn))
    shift = bn.bias - bn.running_mean * bn.weight / torch.sqrt(bn.running_var + bn.eps)
    _close(b - shift.view(1, -1, 1, 1), 2 * (a - shift.view(1, -1, 1, 1)), FP32_RTOL, "after update")


def test_from_dense_and_bad_modules():
    ops = FusedOps()
    x = torch.randn(1, 3, 4, 4, device=DEV)
    assert ops.dense(ops.from_dense(x)) is x
    with pytest.raises(ValueError):
        ops.block([ops.from_dense(x)], nn.Conv2d(3, 4, 5, padding=2), nn.BatchNorm2d(4))
    with pytest.raises(ValueError):
        ops.block([ops.from_dense(x)] * 3, nn.Conv2d(9, 4, 3, padding=1), nn.BatchNorm2d(4))


# --- GPU twins at real sizes -------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("kind", ["block", "down", "up"])
@pytest.mark.parametrize("train", [True, False])
def test_fused_gpu_bf16_and_fp32(kind, train):
    chans = (64, 64) if kind == "block" else (64,)
    for dtype, rtol in ((torch.float32, 1e-2), (torch.bfloat16, 3e-2)):
        conv, bn, conv_r, bn_r = _modules(kind, sum(chans), 64, torch.float32, "cuda", 5)
        conv_r.double(), bn_r.double()
        bn.train(train), bn_r.train(train)
        pend, dense = _inputs(2, chans, 128, 96, dtype, "cuda", 5)
        leaves = [t.requires_grad_(True) for p in pend for t in p]
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = FusedOps().dense(_fused(FusedOps(), kind, pend, conv, bn))
        want = _reference(kind, dense, conv_r, bn_r)
        _close(out, want, rtol, f"{kind} {dtype}")
        _close(bn.running_mean, bn_r.running_mean, rtol, "running_mean")
        out.float().square().mean().backward()  # the backward runs and reaches every input
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves + [conv.weight])
