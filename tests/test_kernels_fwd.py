"""Forward kernels (kernels/conv_fwd.py, kernels/bn_stats.py) against torch references in float64.

Runs under Triton's CPU interpreter (TRITON_INTERPRET=1, set before triton is imported) on tiny odd
shapes. With TRITON_INTERPRET=0 on a CUDA machine the same tests run compiled on the GPU, and the
GPU twins at the bottom add real sizes.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from hypothesis import given, settings, strategies as st  # noqa: E402

from bionet_fast.kernels.bn_stats import (bn_eval_affine, bn_finalize, bn_stats,  # noqa: E402
                                          merge_partials)
from bionet_fast.kernels.conv_fwd import (conv3x3_fwd, conv3x3_fwd_reference,  # noqa: E402
                                          fold_affine, pack_weight)

# GPU twins need compiled kernels: TRITON_INTERPRET=0 on a CUDA machine. The small tests then run
# on the GPU too (DEV), since compiled Triton cannot read CPU tensors.
CUDA = torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1"
DEV = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="GPU twin: needs CUDA and TRITON_INTERPRET=0")
# Relative tolerance (to the largest |value|) per input dtype: a few ulps of the output dtype
# (bf16 outputs round to nearest even on the GPU and, through round_to, in the interpreter);
# fp32 is TF32 on the GPU.
RTOL = {torch.float64: 1e-10, torch.float32: 5e-3 if CUDA else 1e-4, torch.float16: 4e-3,
        torch.bfloat16: 1e-2}


def _close(got, want, rtol, what, scale=None):
    """max |got - want| <= rtol * scale; scale: the largest |want| unless given (see _magnitude)."""
    got, want = got.double(), want.double()
    scale = max(want.abs().max().item() if scale is None else scale, 1e-6)
    err = (got - want).abs().max().item()
    assert err <= rtol * scale, f"{what}: max |err| {err:.3g} > {rtol:g} * {scale:.3g}"


def _magnitude(x1, weight, bias, x2, aff) -> float:
    """The largest sum of |terms| of an output, max over outputs of sum |a| |w| (+ |bias|): an output
    that cancels is only as exact as its terms, and bf16 operands carry 2**-9 of each (found by
    hypothesis: h=1, w=7, an output of 0.31 summed from terms up to 5; 9 bf16 ulps off in the
    interpreter)."""
    mags = {k: v.abs() for k, v in aff.items()}
    return conv3x3_fwd_reference(x1.abs(), weight.abs(), None if bias is None else bias.abs(),
                                 None if x2 is None else x2.abs(), **mags)[0].abs().max().item()


def _m2_scale(y_ref, mean_ref, m2_ref, mag: float) -> float:
    """The bar of m2 = sum (y - mean)**2 given |dy| <= rtol * mag: |dm2| <= 2 sum |y - mean| |dy|."""
    spread = (y_ref.double() - mean_ref.double()[None, :, None, None]).abs().sum((0, 2, 3)).max().item()
    return max(2 * mag * spread, m2_ref.abs().max().item())


def _case(bsz, c1, c2, cout, h, w, dtype, affine, bias, channels_last, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device)

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x1 = rnd(bsz, c1, h, w).to(dtype).contiguous(memory_format=fmt)
    x2 = rnd(bsz, c2, h, w).to(dtype) if c2 else None  # second half always NCHW: mixed layouts
    weight = rnd(cout, c1 + c2, 3, 3, scale=0.3).float()
    b = rnd(cout).float() if bias else None
    aff = {}
    if affine:  # different affines per half, negative scales included, fp32 as BN vectors are
        aff = dict(s1=rnd(c1).float(), b1=rnd(c1).float())
        if c2:
            aff.update(s2=-rnd(c2).abs().float(), b2=rnd(c2, scale=3.0).float())
    return x1, weight, b, x2, aff


def _check_conv(args, dtype, rtol=None):
    x1, weight, bias, x2, aff = args
    y, mean, m2 = conv3x3_fwd(x1, weight, bias, x2, **aff)
    yr, mr, m2r = conv3x3_fwd_reference(x1, weight, bias, x2, **aff)
    rtol = rtol or RTOL[dtype]
    assert y.dtype == x1.dtype and y.shape == yr.shape
    assert y.is_contiguous(memory_format=torch.channels_last)
    mag = _magnitude(x1, weight, bias, x2, aff)
    _close(y, yr, rtol, "y", mag)
    _close(mean, mr, rtol, "mean", mag)
    _close(m2, m2r, rtol, "m2", _m2_scale(yr, mr, m2r, mag))
    return y, mean, m2


@settings(max_examples=12, deadline=None)
@given(bsz=st.sampled_from([1, 3]), c1=st.sampled_from([3, 5, 16, 24]), c2=st.sampled_from([0, 5, 24]),
       cout=st.sampled_from([3, 8, 20, 33]), h=st.integers(1, 9), w=st.integers(1, 9),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16, torch.float16]),
       affine=st.booleans(), bias=st.booleans(), cl=st.booleans(), seed=st.integers(0, 99))
def test_conv3x3_fwd_matches_reference(bsz, c1, c2, cout, h, w, dtype, affine, bias, cl, seed):
    _check_conv(_case(bsz, c1, c2, cout, h, w, dtype, affine, bias, cl, device=DEV, seed=seed), dtype)


def test_conv3x3_fwd_same_tensor_both_halves_and_no_stats():
    """Iteration 0 of BiO-Net concatenates x with itself; want_stats=False skips the statistics."""
    x1, weight, bias, _, _ = _case(2, 5, 0, 7, 5, 7, torch.float64, False, True, True, device=DEV)
    weight = torch.randn(7, 10, 3, 3, device=DEV)
    s, b = torch.randn(5, device=DEV), torch.randn(5, device=DEV)
    y, mean, m2 = conv3x3_fwd(x1, weight, bias, x1, s, b, -s, b, want_stats=False)
    assert mean is None and m2 is None
    yr, _, _ = conv3x3_fwd_reference(x1, weight, bias, x1, s, b, -s, b)
    _close(y, yr, 1e-10, "y")


def test_zero_padding_is_applied_after_the_affine():
    """x = 0 with shift 1: interior taps all see 1, border taps see the zero padding (not 1)."""
    x = torch.zeros(1, 4, 3, 3, device=DEV)
    one = torch.ones(4, device=DEV)
    y, _, _ = conv3x3_fwd(x, torch.ones(1, 4, 3, 3, device=DEV), None, None, one, one)
    want = torch.tensor([[4, 6, 4], [6, 9, 6], [4, 6, 4]], dtype=torch.float32, device=DEV) * 4
    assert torch.equal(y[0, 0], want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("halves", ["both", "first", "second"])
def test_fold_affine_matches_torch(dtype, halves):
    """wp = W*s per input channel, bt_hi + bt_lo = sum_c W*b per tap (Cin = 48 spans two blocks)."""
    x1, weight, _, x2, aff = _case(1, 24, 24, 40, 2, 2, dtype, True, False, False, device=DEV)
    s1, b1, s2, b2 = aff["s1"], aff["b1"], aff["s2"], aff["b2"]
    if halves == "first":
        s2 = b2 = None
    elif halves == "second":
        s1 = b1 = None
    wide = torch.float64
    packed = pack_weight(weight.to(wide if dtype == torch.float64 else torch.float32), weight.dtype)
    wp, bt = fold_affine(packed.to(wide) if dtype == torch.float64 else packed, dtype, 24, s1, b1, s2, b2)
    ones, zeros = torch.ones(24, device=DEV), torch.zeros(24, device=DEV)
    s = torch.cat([ones if s1 is None else s1, ones if s2 is None else s2]).to(wide)
    b = torch.cat([zeros if b1 is None else b1, zeros if b2 is None else b2]).to(wide)
    w64 = packed.to(wide)
    rtol = RTOL[dtype] if dtype != torch.float32 else 1e-6
    _close(wp, w64 * s[None, :, None], rtol, "wp")
    # hi + lo in bf16 keeps ~16 bits: far below the bf16 rounding of the conv's output
    bt_rtol = {torch.bfloat16: 1e-4, torch.float32: 1e-6, torch.float64: 1e-10}[dtype]
    _close(bt[:9].to(wide) + bt[9:].to(wide), torch.einsum("tcn,c->tn", w64, b), bt_rtol, "bt")


def test_conv3x3_fwd_is_deterministic():
    args = _case(2, 24, 5, 20, 5, 7, torch.float32, True, True, True, device=DEV, seed=3)
    a = conv3x3_fwd(args[0], args[1], args[2], args[3], **args[4])
    b = conv3x3_fwd(args[0], args[1], args[2], args[3], **args[4])
    for u, v in zip(a, b):
        assert torch.equal(u, v)


@pytest.mark.parametrize("bad", ["weight", "dtype", "half_affine", "spatial"])
def test_conv3x3_fwd_rejects_bad_input(bad):
    x1, weight, bias, x2, aff = _case(1, 3, 5, 4, 5, 5, torch.float32, True, True, False, device=DEV)
    if bad == "weight":
        weight = weight[:, :7]
    elif bad == "dtype":
        x2 = x2.double()
    elif bad == "half_affine":
        aff["b1"] = None
    else:
        x2 = x2[..., :4]
    with pytest.raises(ValueError):
        conv3x3_fwd(x1, weight, bias, x2, **aff)


@settings(max_examples=6, deadline=None)
@given(shape=st.tuples(st.sampled_from([1, 3]), st.sampled_from([1, 3, 24, 40]), st.integers(1, 13),
                       st.integers(1, 13)),
       layout=st.sampled_from(["nchw", "cl", "slice"]), offset=st.sampled_from([0.0, 1e3]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float64]))
def test_bn_stats_matches_torch(shape, layout, offset, dtype):
    y = (torch.randn(*shape, dtype=torch.float64) + offset).to(DEV, dtype)
    if layout == "cl":
        y = y.contiguous(memory_format=torch.channels_last)
    elif layout == "slice":
        y = torch.cat([y, y], dim=3)[..., ::2]
    mean, m2, count = bn_stats(y)
    yd = y.double()
    assert count == shape[0] * shape[2] * shape[3]
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    _close(mean, yd.mean((0, 2, 3)), rtol, "mean")
    _close(m2 / count, yd.var((0, 2, 3), unbiased=False), 10 * rtol, "biased var")


def test_bn_stats_is_numerically_sound_far_from_zero():
    """Mean 1e4, std 1, 20k values: a raw fp32 sum of squares loses the variance entirely."""
    y = (torch.randn(2, 2, 100, 100, dtype=torch.float64) + 1e4).to(DEV, torch.float32)
    mean, m2, count = bn_stats(y)
    want = y.double().var((0, 2, 3), unbiased=False)
    assert ((m2 / count).double() - want).abs().max() < 1e-3 * want.max()


def test_merge_partials_unequal_tiles():
    g = torch.Generator().manual_seed(1)
    total, rows, c = 1003, 10, 7  # 101 tiles, the last one holding 3 rows
    data = (torch.randn(total, c, generator=g, dtype=torch.float64) * 3 + 5).to(DEV)
    tiles = [data[i:i + rows] for i in range(0, total, rows)]
    pmean = torch.stack([t.mean(0) for t in tiles]).float()
    pm2 = torch.stack([((t - t.mean(0)) ** 2).sum(0) for t in tiles]).float()
    pad = torch.full((5, c), float("nan"), device=DEV)  # rows past `tiles` must never be read
    mean, m2 = merge_partials(torch.cat([pmean, pad]), torch.cat([pm2, pad]), len(tiles), total, rows)
    _close(mean, data.mean(0), 1e-6, "mean")
    _close(m2, ((data - data.mean(0)) ** 2).sum(0), 1e-5, "m2")


@pytest.mark.parametrize("momentum", [0.1, 0.01, None])
@pytest.mark.parametrize("affine", [True, False])
def test_bn_finalize_matches_batch_norm(momentum, affine):
    y = torch.rand(3, 6, 5, 7, dtype=torch.float64, device=DEV) * 4 - 1
    bn = torch.nn.BatchNorm2d(6, momentum=momentum, affine=affine).to(DEV, torch.float64)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.num_batches_tracked.fill_(4)
        if affine:
            bn.weight.normal_()
            bn.bias.normal_()
    state = {k: v.clone() for k, v in bn.state_dict().items()}
    mean, m2, count = bn_stats(y)
    scale, shift, bmean, invstd = bn_finalize(
        mean, m2, count, bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked,
        momentum, bn.eps, update_running=True)
    ref = torch.nn.BatchNorm2d(6, momentum=momentum, affine=affine).to(DEV, torch.float64)
    ref.load_state_dict(state)
    want = ref.train()(y)
    _close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), want, 1e-10, "normalised")
    _close(invstd, 1 / torch.sqrt(y.var((0, 2, 3), unbiased=False) + bn.eps), 1e-10, "invstd")
    for name in ("running_mean", "running_var"):  # momentum reaches the GPU kernel as an fp32 scalar
        _close(getattr(bn, name), getattr(ref, name), 1e-10 if not CUDA else 1e-7, name)
    assert bn.num_batches_tracked.item() == ref.num_batches_tracked.item() == 5
    # without update_running the buffers stay as they are
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    bn_finalize(mean, m2, count, bn.weight, bn.bias, bn.running_mean, bn.running_var,
                bn.num_batches_tracked, momentum, bn.eps, update_running=False)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bn_finalize_rejects_single_value_per_channel():
    z = torch.zeros(3, device=DEV)
    with pytest.raises(ValueError):
        bn_finalize(z, z, 1, None, None, z.clone(), z.clone(), torch.zeros((), dtype=torch.long, device=DEV),
                    0.1, 1e-5, update_running=True)


def test_bn_eval_affine():
    bn = torch.nn.BatchNorm2d(5).to(DEV).eval()
    with torch.no_grad():
        for p in (bn.weight, bn.bias, bn.running_mean):
            p.normal_()
        bn.running_var.uniform_(0.1, 3)
    y = torch.randn(2, 5, 3, 4, device=DEV)
    scale, shift = bn_eval_affine(bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.eps)
    _close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), bn(y), 1e-6, "eval bn")


# --- GPU twins at real sizes -------------------------------------------------------------------
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32, torch.float16])
@pytest.mark.parametrize("dims", [(2, 32, 32, 32, 256, 256), (2, 64, 64, 64, 128, 128),
                                  (2, 256, 0, 256, 32, 32), (2, 3, 0, 32, 64, 64),
                                  (2, 128, 64, 64, 64, 64)])
def test_conv3x3_fwd_gpu(dtype, dims):
    bsz, c1, c2, cout, h, w = dims
    args = _case(bsz, c1, c2, cout, h, w, dtype, True, True, True, device="cuda", seed=7)
    # fp32 runs on TF32 tensor cores: 10-bit mantissa products, hence the looser tolerance.
    _check_conv(args, dtype, rtol={torch.float32: 5e-3, torch.float16: 4e-3, torch.bfloat16: 1e-2}[dtype])


@needs_gpu
def test_bn_stats_and_finalize_gpu():
    y = (torch.randn(2, 64, 256, 256, device="cuda") * 2 + 30).contiguous(memory_format=torch.channels_last)
    mean, m2, count = bn_stats(y)
    _close(mean, y.double().mean((0, 2, 3)), 1e-6, "mean")
    _close(m2 / count, y.double().var((0, 2, 3), unbiased=False), 1e-4, "var")
    a = bn_stats(y)
    assert torch.equal(a[0], mean) and torch.equal(a[1], m2)
    rm, rv, nbt = torch.zeros(64, device="cuda"), torch.ones(64, device="cuda"), torch.zeros((), dtype=torch.long, device="cuda")
    scale, shift, _, _ = bn_finalize(mean, m2, count, None, None, rm, rv, nbt, 0.01, 1e-5, True)
    _close(rm, 0.01 * y.double().mean((0, 2, 3)), 1e-5, "running_mean")
    assert nbt.item() == 1


def test_bf16_outputs_round_to_nearest_even():
    """y in bf16 is the fp32 accumulator rounded to nearest even, as on the GPU: (almost) every value
    equals the exact result rounded by torch, and the rounding error has no sign bias (the
    interpreter's own cast truncates, which biased whole-model bf16 errors 4x upwards)."""
    # no affine: with one, the kernel rounds W*s where the reference rounds x*s+b (other operands)
    x1, weight, bias, x2, aff = _case(2, 5, 3, 16, 9, 11, torch.bfloat16, False, True, True, DEV)
    y, _, _ = conv3x3_fwd(x1, weight, bias, x2, **aff)
    exact, _, _ = conv3x3_fwd_reference(x1, weight, bias, x2, **aff)
    same = (y == exact.to(torch.bfloat16)).double().mean().item()
    assert same >= 0.98, f"only {same:.1%} of bf16 outputs are the exact value rounded to nearest"
    err = y.double() - exact
    bias_ratio = err.sum().item() / err.abs().sum().clamp_min(1e-30).item()
    assert abs(bias_ratio) <= 0.2, f"bf16 rounding is biased: sum(err)/sum|err| = {bias_ratio:.2f}"


@pytest.mark.parametrize("has_gs,has_gb,has_gamma", [(True, True, True), (True, False, False),
                                                     (False, True, True)])
def test_bn_affine_backward_matches_autograd(has_gs, has_gb, has_gamma):
    """bn_affine_backward's (C,) coefficients against torch autograd of the batch affine, float64:
    dL/dy = alpha*y + beta_c, dL/dgamma, dL/dbeta (odd C, missing grads and gamma=None)."""
    from bionet_fast.kernels.bn_stats import bn_affine_backward
    g = torch.Generator().manual_seed(3)
    y = torch.rand(3, 37, 5, 3, generator=g, dtype=torch.float64).to(DEV).requires_grad_(True)
    gamma = torch.randn(37, generator=g, dtype=torch.float64).to(DEV).requires_grad_(True)
    beta = torch.randn(37, generator=g, dtype=torch.float64).to(DEV).requires_grad_(True)
    gs = torch.randn(37, generator=g, dtype=torch.float64).to(DEV) if has_gs else None
    gb = torch.randn(37, generator=g, dtype=torch.float64).to(DEV) if has_gb else None
    mean = y.mean((0, 2, 3))
    invstd = torch.rsqrt(y.var((0, 2, 3), unbiased=False) + 1e-5)
    scale = (gamma if has_gamma else 1.0) * invstd
    shift = beta - mean * scale
    terms = [(v * w).sum() for v, w in ((scale, gs), (shift, gb)) if w is not None]
    loss = torch.stack(terms).sum()
    want_dy, want_gamma, want_beta = torch.autograd.grad(loss, (y, gamma, beta), allow_unused=True)
    alpha, beta_c, g_gamma, g_beta = bn_affine_backward(gs, gb, mean.detach(), invstd.detach(),
                                                        gamma.detach() if has_gamma else None, 3 * 5 * 3)
    got_dy = alpha.view(1, -1, 1, 1) * y.detach() + beta_c.view(1, -1, 1, 1)
    _close(got_dy, want_dy, 1e-10, "dy")
    if has_gamma:
        _close(g_gamma, want_gamma if want_gamma is not None else torch.zeros_like(g_gamma), 1e-10, "dgamma")
    _close(g_beta, want_beta if want_beta is not None else torch.zeros_like(g_beta), 1e-10, "dbeta")
