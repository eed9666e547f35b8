"""Reflect (and replicate) padding on the fused path (issue 21, item 1): kernels and whole models
against float64 torch, in Triton's interpreter (tiny sizes; conftest sets TRITON_INTERPRET).

Ground truth of a block: A = pad(cat(x1 * s1 + b1, x2 * s2 + b2), mode), y = relu(conv2d(A, W, b)),
differentiated by autograd (torch's F.pad gives the adjoint of the reflection). Degenerate maps:
torch's reflect pad refuses a side of 1 (RuntimeError); the kernels refuse it with a ValueError
naming the fix, and a reflect BiONet refuses inputs whose deepest map would be 1 pixel wide before
any work. 2x2 and 3x3 maps reflect normally (2x2: index -1 reads 1 and index 2 reads 0).
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import example, given, settings, strategies as st

from bionet_fast import BiONet
from bionet_fast.kernels.conv_bwd import conv3x3_dgrad, conv3x3_wgrad
from bionet_fast.kernels.conv_fwd import conv3x3_fwd
from bionet_fast.models import bionet as bionet_module


def rel(got, want) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def block_case(b, c1, c2, cout, h, w, mode, dtype=torch.float64, seed=0):
    """Random block inputs in `dtype` and the float64 autograd truth: y and every gradient."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype)  # noqa: E731
    t = {"x1": rnd(b, c1, h, w), "s1": rnd(c1) * 1.5, "b1": rnd(c1, scale=0.5),
         "weight": rnd(cout, c1 + c2, 3, 3, scale=(9 * (c1 + c2)) ** -0.5), "bias": rnd(cout)}
    if c2:
        t.update(x2=rnd(b, c2, h, w), s2=rnd(c2) * 1.5, b2=rnd(c2, scale=0.5))
    leaf = {k: v.double().requires_grad_(True) for k, v in t.items()}
    parts = [leaf["x1"] * leaf["s1"][:, None, None] + leaf["b1"][:, None, None]]
    if c2:
        parts.append(leaf["x2"] * leaf["s2"][:, None, None] + leaf["b2"][:, None, None])
    y = F.relu(F.conv2d(F.pad(torch.cat(parts, 1), (1, 1, 1, 1), mode=mode), leaf["weight"], leaf["bias"]))
    dy = torch.randn(y.shape, generator=g).to(dtype)
    y.backward(dy.double())
    return t, dy, y.detach(), {k: v.grad for k, v in leaf.items()}


@settings(max_examples=8)
@given(h=st.integers(2, 7), w=st.integers(2, 7), c2=st.sampled_from([0, 3]), mode=st.sampled_from(["reflect", "replicate"]),
       seed=st.integers(0, 99))
@example(h=2, w=2, c2=3, mode="reflect", seed=0)
@example(h=3, w=3, c2=0, mode="reflect", seed=1)
@example(h=2, w=5, c2=3, mode="replicate", seed=2)
def test_block_forward_dgrad_wgrad_equal_float64_autograd(h, w, c2, mode, seed):
    """Forward (y, BatchNorm statistics), dgrad (dx, ds, db of both halves: the adjoint of the
    padding, mirrored gradients added up) and wgrad of one fused block, float64, odd sizes."""
    t, dy, y_true, g = block_case(2, 4, c2, 5, h, w, mode, seed=seed)
    x2, s2, b2 = t.get("x2"), t.get("s2"), t.get("b2")
    y, mean, m2 = conv3x3_fwd(t["x1"], t["weight"], t["bias"], x2, t["s1"], t["b1"], s2, b2, pad=mode)
    torch.testing.assert_close(y, y_true, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mean, y_true.mean((0, 2, 3)), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(m2, ((y_true - y_true.mean((0, 2, 3), keepdim=True)) ** 2).sum((0, 2, 3)),
                               rtol=1e-10, atol=1e-10)
    dx1, dx2, ds1, db1, ds2, db2 = conv3x3_dgrad(dy, y, t["weight"], 4, t["x1"], x2, t["s1"], s2, pad=mode)
    dw, dbias = conv3x3_wgrad(dy, y, t["x1"], x2, t["s1"], t["b1"], s2, b2, pad=mode)
    got = {"x1": dx1, "s1": ds1, "b1": db1, "weight": dw, "bias": dbias}
    if c2:
        got.update(x2=dx2, s2=ds2, b2=db2)
    for k, want in g.items():
        torch.testing.assert_close(got[k], want, rtol=1e-10, atol=1e-10, msg=k)


@pytest.mark.parametrize("split", [2, 3])
def test_split_k_reflect(split):
    """Forced split-K (fixed-order sum of K slices, then the shared epilogue) with reflection."""
    t, dy, y_true, g = block_case(1, 20, 12, 6, 3, 5, "reflect", seed=3)
    args = (t["x2"], t["s1"], t["b1"], t["s2"], t["b2"])
    y, _, _ = conv3x3_fwd(t["x1"], t["weight"], t["bias"], *args, pad="reflect", split_k=split)
    torch.testing.assert_close(y, y_true, rtol=1e-10, atol=1e-10)
    dx1, dx2, ds1, *_ = conv3x3_dgrad(dy, y, t["weight"], 20, t["x1"], t["x2"], t["s1"], t["s2"],
                                      pad="reflect", split_k=split)
    for k, v in (("x1", dx1), ("x2", dx2), ("s1", ds1)):
        torch.testing.assert_close(v, g[k], rtol=1e-10, atol=1e-10, msg=k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_in_low_precision(dtype):
    """fp32 (IEEE in the interpreter) and bf16 operands: within their rounding of the float64 truth."""
    t, dy, y_true, g = block_case(2, 6, 5, 7, 4, 3, "reflect", dtype=dtype, seed=4)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    y, _, _ = conv3x3_fwd(t["x1"], t["weight"], t["bias"], t["x2"], t["s1"], t["b1"], t["s2"], t["b2"],
                          pad="reflect")
    assert rel(y, y_true) <= tol
    # the backward from the kernel's own y (the ReLU mask is the forward's)
    dx1, dx2, ds1, db1, ds2, db2 = conv3x3_dgrad(dy, y, t["weight"], 6, t["x1"], t["x2"], t["s1"], t["s2"],
                                                 pad="reflect")
    dw, dbias = conv3x3_wgrad(dy, y, t["x1"], t["x2"], t["s1"], t["b1"], t["s2"], t["b2"], pad="reflect")
    for k, v in (("x1", dx1), ("x2", dx2), ("s1", ds1), ("b1", db1), ("weight", dw), ("bias", dbias)):
        assert rel(v, g[k]) <= 3 * tol, k


def test_one_pixel_side_is_refused_like_torch_and_replicate_works():
    x, w = torch.randn(1, 2, 1, 4, dtype=torch.float64), torch.randn(3, 2, 3, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError):  # torch's own reflect pad: pad must be smaller than the side
        F.pad(x, (1, 1, 1, 1), mode="reflect")
    with pytest.raises(ValueError, match="at least 2x2"):
        conv3x3_fwd(x, w, None, pad="reflect")
    y, _, _ = conv3x3_fwd(x, w, None, pad="replicate")
    torch.testing.assert_close(y, F.relu(F.conv2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), w)))


# --- whole models ---------------------------------------------------------------------------------
def pair(dtype=torch.float64, mode="reflect", **kw):
    torch.manual_seed(0)
    cfg = dict(iterations=2, multiplier=0.125, depth=1, padding_mode=mode) | kw
    ref = BiONet(backend="reference", **cfg).to(dtype)
    fused = copy.deepcopy(ref)
    fused.config.backend = "triton"
    return ref, fused


def run(model, x, y, autocast=None):
    """One training forward + backward -> (output, {name: grad} with the input's)."""
    x = x.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
        out = model(x)
    F.binary_cross_entropy_with_logits(out.double(), y.double()).backward()
    grads = {"input": x.grad} | {k: p.grad for k, p in model.named_parameters()}
    return out.detach(), grads


@pytest.mark.parametrize("ckpt, split", [(False, None), (True, "2")], ids=["plain", "checkpoint_iters-splitK2"])
def test_float64_reflect_model_equals_reference(ckpt, split, monkeypatch):
    """Outputs, every gradient (input's included) and every BatchNorm buffer, float64, deepest map
    2x3 (depth 1: side / 4); with checkpoint_iters and BIONET_FAST_SPLIT_K=2 (split-K forced in
    every forward and dgrad) in the second case."""
    if split:
        monkeypatch.setenv("BIONET_FAST_SPLIT_K", split)
    ref, fused = pair(checkpoint_iters=ckpt)
    x = torch.rand(2, 3, 8, 12, dtype=torch.float64)
    y = (torch.rand(2, 1, 8, 12) > 0.5).double()
    (o_ref, g_ref), (o_fused, g_fused) = run(ref, x, y), run(fused, x, y)
    assert rel(o_fused, o_ref) <= 1e-9
    scale = max(g.abs().max().item() for g in g_ref.values() if g is not None)
    for k, want in g_ref.items():
        assert (want is None) == (g_fused[k] is None), k
        if want is not None:  # absolute to the largest gradient: some are sums near zero
            assert (g_fused[k] - want).abs().max().item() <= 1e-9 * scale, k
    for (k, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=k)
    assert fused.norms[0].mid[0].num_batches_tracked.item() == 1


@pytest.mark.parametrize("dtype, ckpt", [(torch.float32, False), (torch.bfloat16, True)],
                         ids=["fp32-plain", "bf16-checkpoint_iters"])
def test_low_precision_reflect_model_within_the_references_own_error(dtype, ckpt):
    """fp32 and bf16 autocast training steps: outputs, gradients and running statistics of the fused
    model no further from the float64 model than twice the reference backend's error in the same
    precision (train-mode BatchNorm on a tiny batch amplifies rounding), or within a floor."""
    ref, fused = pair(torch.float32, checkpoint_iters=ckpt)
    exact = copy.deepcopy(ref).double()
    x = torch.rand(2, 3, 8, 8)
    y = (torch.rand(2, 1, 8, 8) > 0.5).float()
    auto = dtype if dtype != torch.float32 else None
    o_true, g_true = run(exact, x.double(), y)
    (o_ref, g_ref), (o_fused, g_fused) = run(ref, x, y, auto), run(fused, x, y, auto)
    floor = 1e-4 if dtype == torch.float32 else 3e-2
    errs = {"out": (rel(o_fused, o_true), rel(o_ref, o_true))}
    total = sum(v.norm() ** 2 for v in g_true.values() if v is not None) ** 0.5

    def err(g):
        return (sum((g[k].double() - v).norm() ** 2 for k, v in g_true.items() if v is not None) ** 0.5
                / total).item()

    errs["grads"] = (err(g_fused), err(g_ref))
    for (k, a), (_, b), (_, r) in zip(exact.named_buffers(), fused.named_buffers(), ref.named_buffers()):
        if a.dtype.is_floating_point:
            errs[k] = (rel(b, a), rel(r, a))
        else:
            assert torch.equal(a, b), k
    bad = {k: v for k, v in errs.items() if v[0] > max(floor, 2 * v[1])}
    assert not bad, bad  # (fused error, reference error)


def test_eval_and_inference_cache_reflect():
    """Eval mode without grad (the inference cache: folded weights, cached affines, the padded UP)."""
    ref, fused = pair(bn_momentum=1.0)
    batch = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    for m in (ref, fused):
        with torch.no_grad():
            m.train()(batch)  # non-trivial running statistics (momentum 1: the batch's own)
        m.eval()
    x = torch.rand(1, 3, 12, 8, dtype=torch.float64)
    with torch.no_grad():
        want = ref(x)
        assert rel(fused(x), want) <= 1e-9 and rel(fused(x), want) <= 1e-9  # second call: cached


def test_reflect_input_with_a_one_pixel_deepest_map_is_refused_by_check_input_and_padded_by_forward():
    """check_input (what exporters and the CLIs check) refuses a side whose deepest map would be 1
    pixel; forward pads such an input up with replicated edges (issue 24: tiny images) and crops the
    output back, on both backends, equal to doing that by hand."""
    x = torch.rand(1, 3, 4, 8)
    outs = []
    for backend in ("reference", "triton"):
        torch.manual_seed(0)
        model = BiONet(iterations=1, multiplier=0.125, depth=1, padding_mode="reflect", backend=backend).eval()
        with pytest.raises(ValueError, match="too small for padding_mode='reflect'"):
            model.check_input(x)
        with torch.no_grad():
            y = model(x)
            by_hand = model(F.pad(x, (0, 0, 0, 4), mode="replicate"))[..., :4, :8]
        assert y.shape == (1, 1, 4, 8)
        torch.testing.assert_close(y, by_hand)
        outs.append(y)
    torch.testing.assert_close(outs[0], outs[1], atol=1e-4, rtol=1e-4)
    BiONet(iterations=1, multiplier=0.125, depth=1, padding_mode="replicate").eval()(torch.rand(1, 3, 4, 4))


# --- backend choice -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["zeros", "reflect", "replicate"])
def test_auto_treats_padded_models_like_zero_padded_on_cuda(monkeypatch, mode):
    """On a (stubbed) CUDA device "auto" measures and keeps the fused path for every padding mode;
    backend="triton" no longer refuses a padded model."""
    monkeypatch.delenv("BIONET_FAST_BACKEND", raising=False)
    asked = []
    monkeypatch.setattr(bionet_module, "choose_backend", lambda model, x: asked.append(model) or "triton")
    monkeypatch.setattr(bionet_module, "_triton_available", lambda: True)
    model = BiONet(iterations=1, multiplier=0.125, depth=1, padding_mode=mode, backend="auto")
    cuda = torch.device("cuda")
    assert model.resolved_backend(cuda, torch.zeros(1, 3, 8, 8)) == "triton" and asked == [model]
    assert model.resolved_backend(cuda) == "triton"  # without an input (compiling, capture)
    assert model.resolved_backend(torch.device("cpu"), torch.zeros(1, 3, 8, 8)) == "reference"
    forced = BiONet(iterations=1, multiplier=0.125, depth=1, padding_mode=mode, backend="triton")
    assert forced.resolved_backend(torch.device("cpu")) == "triton"
