"""Fused 3x3-conv backward kernels (kernels/conv_bwd.py) against float64 torch autograd.

Ground truth: the block's forward math rebuilt in float64 with autograd,
    A = cat([x1 * s1 + b1, x2 * s2 + b2]); y = relu(conv2d(A, weight, bias, padding=1)),
backpropagating a random dy. CPU tests run the kernels in the Triton interpreter on tiny odd
shapes; each GPU test (real sizes) has such a CPU twin.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (via the kernels)

import pytest
import torch
import torch.nn.functional as F
from hypothesis import Phase, example, given, settings, strategies as st

from bionet_fast.kernels.conv_bwd import (conv3x3_dgrad, conv3x3_dgrad_reference,
                                          conv3x3_wgrad, conv3x3_wgrad_reference)

# GPU twins need compiled kernels: run them with TRITON_INTERPRET=0 on a CUDA machine (the
# interpreter would take hours at their sizes).
CUDA = torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1"
DEV = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="GPU twin: needs CUDA and TRITON_INTERPRET=0")
# Error relative to the reference's largest magnitude. fp32 is IEEE in the interpreter but
# TF32 on the GPU; bf16/fp16 round their inputs, the rebuilt A and dx.
TOL = {torch.float32: 1e-2 if CUDA else 2e-5, torch.bfloat16: 3e-2, torch.float16: 1e-2,
       torch.float64: 1e-10}


def make_case(b, c1, c2, c_out, h, w, *, affine=True, dtype=torch.float32, seed=0,
              channels_last=True, device=DEV):
    """Random block inputs (rounded to dtype) and float64 autograd gradients of them.

    Returns (inputs: dict of dtype tensors for the kernels, ref: dict of float64 gradients).
    Identity affines are still differentiated (s = 1, b = 0) since the kernels return ds, db.
    """
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(dtype)
    x1, x2 = rnd(b, c1, h, w), (rnd(b, c2, h, w) if c2 else None)
    weight = rnd(c_out, c1 + c2, 3, 3, scale=(9 * (c1 + c2)) ** -0.5)
    bias, dy = rnd(c_out), rnd(b, c_out, h, w)
    aff = {}
    for k, c in ((1, c1), (2, c2)):
        if affine and c:  # scales of both signs, some near zero
            aff[f"s{k}"], aff[f"b{k}"] = rnd(c) * 1.5, rnd(c, scale=0.5)
    # float64 leaves on the device, identity affine where none is given
    leaf = lambda t: t.to(device, torch.float64).requires_grad_(True)
    L = {"x1": leaf(x1), "weight": leaf(weight), "bias": leaf(bias)}
    L["s1"], L["b1"] = leaf(aff.get("s1", torch.ones(c1))), leaf(aff.get("b1", torch.zeros(c1)))
    parts = [L["x1"] * L["s1"][:, None, None] + L["b1"][:, None, None]]
    if c2:
        L["x2"] = leaf(x2)
        L["s2"], L["b2"] = leaf(aff.get("s2", torch.ones(c2))), leaf(aff.get("b2", torch.zeros(c2)))
        parts.append(L["x2"] * L["s2"][:, None, None] + L["b2"][:, None, None])
    y = F.relu(F.conv2d(torch.cat(parts, 1), L["weight"], L["bias"], padding=1))
    y.backward(dy.to(device, torch.float64))
    ref = {k: v.grad for k, v in L.items()}

    fmt = torch.channels_last if channels_last else torch.contiguous_format
    dev = lambda t: None if t is None else t.to(device).contiguous(memory_format=fmt)
    inputs = dict(dy=dev(dy), y=dev(y.detach().to(dtype)), weight=dev(weight), x1=dev(x1),
                  x2=dev(x2), c1=c1, **{k: v.to(device) for k, v in aff.items()})
    return inputs, ref


def run_dgrad(i):
    return conv3x3_dgrad(i["dy"], i["y"], i["weight"], i["c1"], i["x1"], i["x2"],
                         i.get("s1"), i.get("s2"))


def run_wgrad(i, **kw):
    return conv3x3_wgrad(i["dy"], i["y"], i["x1"], i["x2"], i.get("s1"), i.get("b1"),
                         i.get("s2"), i.get("b2"), **kw)


def assert_close(name, got, ref, tol):
    assert got.shape == ref.shape, f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    err = (got.double() - ref).abs().max().item()
    scale = max(ref.abs().max().item(), 1e-6)
    assert err <= tol * scale, f"{name}: max error {err:.3g} > {tol} * {scale:.3g}"


def check_case(inputs, ref, dtype, **wgrad_kw):
    tol = TOL[dtype]
    dx1, dx2, ds1, db1, ds2, db2 = run_dgrad(inputs)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert dx1.dtype == inputs["x1"].dtype and ds1.dtype == db1.dtype == acc
    for name, got in (("dx1", dx1), ("ds1", ds1), ("db1", db1)):
        assert_close(name, got, ref[{"dx1": "x1", "ds1": "s1", "db1": "b1"}[name]], tol)
    if inputs["x2"] is None:
        assert dx2 is None and ds2 is None and db2 is None
    else:
        assert dx2.stride() == inputs["x2"].stride(), "dx2 must keep x2's memory format"
        for name, got, key in (("dx2", dx2, "x2"), ("ds2", ds2, "s2"), ("db2", db2, "b2")):
            assert_close(name, got, ref[key], tol)
    dw, dbias = run_wgrad(inputs, **wgrad_kw)
    assert dw.dtype == dbias.dtype == acc
    assert_close("dweight", dw, ref["weight"], tol)
    assert_close("dbias", dbias, ref["bias"], tol)


# ---------------------------------------------------------------- CPU (interpreter) tests
# No shrinking: at ~0.4 s an example it would spend minutes; a failure prints its arguments.
@settings(max_examples=30, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])
@example(b=1, h=3, w=3, c1=3, c2=0, c_out=4, affine=False, channels_last=True, split_k=None, seed=0)
@example(b=3, h=9, w=7, c1=8, c2=7, c_out=16, affine=True, channels_last=False, split_k=5, seed=1)
@given(b=st.sampled_from([1, 3]), h=st.integers(3, 9), w=st.integers(3, 9),
       c1=st.sampled_from([3, 5, 8]), c2=st.sampled_from([0, 4, 7]),
       c_out=st.sampled_from([4, 6, 16]), affine=st.booleans(), channels_last=st.booleans(),
       split_k=st.sampled_from([None, 1, 2, 5]), seed=st.integers(0, 2**16))
def test_matches_float64_autograd(b, h, w, c1, c2, c_out, affine, channels_last, split_k, seed):
    inputs, ref = make_case(b, c1, c2, c_out, h, w, affine=affine, seed=seed,
                            channels_last=channels_last)
    check_case(inputs, ref, torch.float32, split_k=split_k)


def test_relu_mask_matters():
    """Many zeros in y: kernels that ignored the mask would be far off the reference."""
    inputs, ref = make_case(3, 5, 4, 6, 7, 5, seed=1)
    frac = (inputs["y"] == 0).float().mean().item()
    assert 0.2 < frac < 0.8, f"test case should mix active and inactive units, {frac=}"
    check_case(inputs, ref, torch.float32, split_k=2)
    unmasked = dict(inputs, y=torch.ones_like(inputs["y"]))
    dw, _ = run_wgrad(unmasked)
    assert (dw.double() - ref["weight"]).abs().max() > 1e-2 * ref["weight"].abs().max()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
def test_other_dtypes(dtype):
    """bf16/fp16 (fp32 accumulation, looser tolerance); fp64 (fp64 accumulation, for gradcheck)."""
    inputs, ref = make_case(3, 8, 7, 16, 9, 7, dtype=dtype, seed=2)
    check_case(inputs, ref, dtype, split_k=2)
    dx1, dx2, *_ = run_dgrad(inputs)
    assert dx1.dtype == dx2.dtype == dtype


def test_deterministic():
    inputs, _ = make_case(3, 5, 7, 6, 9, 8, seed=3)
    for fn in (run_dgrad, lambda i: run_wgrad(i, split_k=3)):
        first, second = fn(inputs), fn(inputs)
        for a, b in zip(first, second):
            assert (a is None and b is None) or torch.equal(a, b)


def test_strided_views_and_nchw():
    """Channel slices of bigger tensors (not dense): any strides work, dx keeps a valid layout."""
    inputs, ref = make_case(1, 5, 4, 4, 6, 9, seed=4, channels_last=False)
    big = torch.randn(1, 9, 6, 9).to(DEV)
    big[:, 2:7] = inputs["x1"]
    inputs["x1"] = big[:, 2:7]
    check_case(inputs, ref, torch.float32)


def test_references_match_autograd():
    inputs, ref = make_case(3, 5, 7, 6, 5, 7, seed=5)
    d = {k: (v.double() if torch.is_tensor(v) else v) for k, v in inputs.items()}
    dx1, dx2, ds1, db1, ds2, db2 = conv3x3_dgrad_reference(
        d["dy"], d["y"], d["weight"], d["c1"], d["x1"], d["x2"], d["s1"], d["s2"])
    dw, dbias = conv3x3_wgrad_reference(d["dy"], d["y"], d["x1"], d["x2"], d["s1"], d["b1"],
                                        d["s2"], d["b2"])
    for got, key in ((dx1, "x1"), (dx2, "x2"), (ds1, "s1"), (db1, "b1"), (ds2, "s2"),
                     (db2, "b2"), (dw, "weight"), (dbias, "bias")):
        torch.testing.assert_close(got, ref[key], rtol=1e-10, atol=1e-10)


def test_bad_inputs_raise_clear_errors():
    inputs, _ = make_case(1, 3, 4, 4, 5, 5, seed=6)
    i = inputs
    with pytest.raises(ValueError, match="x2"):
        conv3x3_dgrad(i["dy"], i["y"], i["weight"], 3, i["x1"], i["x2"][:, :2])
    with pytest.raises(ValueError, match="c1"):
        conv3x3_dgrad(i["dy"], i["y"], i["weight"], 3, i["x1"])
    with pytest.raises(ValueError, match="dy and y"):
        conv3x3_wgrad(i["dy"], i["y"][:, :2], i["x1"], i["x2"])
    with pytest.raises(ValueError, match="s1"):
        conv3x3_wgrad(i["dy"], i["y"], i["x1"], i["x2"], s1=torch.ones(5, device=DEV))
    with pytest.raises(ValueError, match="weight"):
        conv3x3_dgrad(i["dy"], i["y"], i["weight"][..., :1], 3, i["x1"], i["x2"])


# ---------------------------------------------------------------- GPU twins (real sizes)
GPU_SHAPES = [(32, 32, 32), (64, 0, 128), (128, 64, 64), (256, 0, 256), (96, 160, 32)]


@needs_gpu
@pytest.mark.parametrize("c1,c2,c_out", GPU_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_matches_float64_autograd(c1, c2, c_out, dtype):
    inputs, ref = make_case(2, c1, c2, c_out, 128, 128, dtype=dtype, seed=c1 + c_out)
    check_case(inputs, ref, dtype)


@needs_gpu
def test_gpu_deterministic():
    inputs, _ = make_case(2, 64, 64, 64, 128, 128, dtype=torch.bfloat16, seed=7)
    for fn in (run_dgrad, run_wgrad):
        first, second = fn(inputs), fn(inputs)
        for a, b in zip(first, second):
            assert (a is None and b is None) or torch.equal(a, b)
