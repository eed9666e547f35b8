"""Deterministic split-K (kernels/splitk.py) of the fused conv kernels against float64 references.

Split (SPLIT_K > 1) and unsplit launches of conv3x3_fwd (y and the BatchNorm statistics of the fp32
sum), conv3x3_dgrad and conv3x3_wgrad must both match the float64 reference, and two split runs
must give the same bits. CPU tests run the interpreter on tiny odd shapes (a split is forced with
split_k=, since the interpreter's table is unsplit); the prune tests check, without launching,
where the GPU autotune tables offer split configs. Each GPU test (real deep-layer sizes) has such
a CPU twin.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported (via the kernels)

import pytest  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from hypothesis import Phase, given, settings, strategies as st  # noqa: E402

from bionet_fast.kernels import _bwd_utils, conv_fwd, splitk  # noqa: E402
from bionet_fast.kernels.conv_bwd import conv3x3_dgrad  # noqa: E402
from bionet_fast.kernels.conv_fwd import conv3x3_fwd, conv3x3_fwd_reference  # noqa: E402
from test_kernels_bwd import TOL, assert_close, make_case, run_wgrad  # noqa: E402
from test_kernels_fwd import RTOL, _case, _close, _m2_scale, _magnitude  # noqa: E402

CUDA = torch.cuda.is_available() and os.environ["TRITON_INTERPRET"] != "1"
DEV = "cuda" if CUDA else "cpu"
needs_gpu = pytest.mark.skipif(not CUDA, reason="GPU twin: needs CUDA and TRITON_INTERPRET=0")
# A few examples each (every one runs the interpreter 3 times), no shrinking: a failure prints them.
FEW = dict(max_examples=4, deadline=None, phases=[Phase.explicit, Phase.reuse, Phase.generate])


def _same_bits(a, b, what):
    for u, v in zip(a, b):
        assert (u is None and v is None) or torch.equal(u, v), f"{what}: two split runs differ"


def _fwd_split_vs_unsplit(args, dtype, split, rtol=None):
    """Unsplit and split conv3x3_fwd against the float64 reference; the split one twice, bitwise."""
    x1, weight, bias, x2, aff = args
    ref = conv3x3_fwd_reference(x1, weight, bias, x2, **aff)
    runs = {s: conv3x3_fwd(x1, weight, bias, x2, **aff, split_k=s) for s in (1, split)}
    mag = _magnitude(x1, weight, bias, x2, aff)
    for s, out in runs.items():
        for got, want, name in zip(out, ref, ("y", "mean", "m2")):
            bar = _m2_scale(*ref, mag) if name == "m2" else mag
            _close(got, want, rtol or RTOL[dtype], f"split_k={s} {name}", bar)
    _same_bits(runs[split], conv3x3_fwd(x1, weight, bias, x2, **aff, split_k=split), "conv3x3_fwd")


@settings(**FEW)
@given(bsz=st.sampled_from([1, 2]), c1=st.sampled_from([3, 5, 17]), c2=st.sampled_from([0, 4]),
       cout=st.sampled_from([3, 9, 20]), h=st.integers(1, 7), w=st.integers(1, 7),
       dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]), affine=st.booleans(),
       bias=st.booleans(), split=st.sampled_from([2, 3, 5]), seed=st.integers(0, 99))
def test_fwd_split_matches_unsplit_and_float64(bsz, c1, c2, cout, h, w, dtype, affine, bias, split, seed):
    args = _case(bsz, c1, c2, cout, h, w, dtype, affine, bias, True, device=DEV, seed=seed)
    _fwd_split_vs_unsplit(args, dtype, split)


def _dgrad(i, split):
    return conv3x3_dgrad(i["dy"], i["y"], i["weight"], i["c1"], i["x1"], i["x2"], i.get("s1"),
                         i.get("s2"), split_k=split)


def _check_dgrad(inputs, ref, dtype, split):
    """Unsplit and split dgrad against float64 autograd; the split one twice, bitwise."""
    runs = {s: _dgrad(inputs, s) for s in (1, split)}
    keys = ("x1", "x2", "s1", "b1", "s2", "b2")
    for s, out in runs.items():
        for got, key in zip(out, keys):
            if got is not None:
                assert_close(f"split_k={s} d{key}", got, ref[key], TOL[dtype])
    _same_bits(runs[split], _dgrad(inputs, split), "conv3x3_dgrad")


@settings(**FEW)
@given(b=st.sampled_from([1, 2]), h=st.integers(2, 7), w=st.integers(2, 7),
       c1=st.sampled_from([3, 8]), c2=st.sampled_from([0, 5]), c_out=st.sampled_from([4, 17]),
       affine=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       split=st.sampled_from([2, 3, 7]), seed=st.integers(0, 2**16))
def test_dgrad_split_matches_unsplit_and_float64(b, h, w, c1, c2, c_out, affine, dtype, split, seed):
    inputs, ref = make_case(b, c1, c2, c_out, h, w, affine=affine, dtype=dtype, seed=seed)
    _check_dgrad(inputs, ref, dtype, split)


def _check_wgrad(inputs, ref, dtype, split):
    """wgrad over 1 and `split` pixel chunks against float64 autograd; the split one twice, bitwise."""
    runs = {s: run_wgrad(inputs, split_k=s) for s in (1, split)}
    for s, (dw, dbias) in runs.items():
        assert_close(f"split_k={s} dweight", dw, ref["weight"], TOL[dtype])
        assert_close(f"split_k={s} dbias", dbias, ref["bias"], TOL[dtype])
    _same_bits(runs[split], run_wgrad(inputs, split_k=split), "conv3x3_wgrad")


@settings(**dict(FEW, max_examples=3))  # wgrad runs 9x more programs than the others
@given(b=st.sampled_from([2, 3]), h=st.integers(4, 6), w=st.integers(4, 6),
       c1=st.sampled_from([3, 8]), c2=st.sampled_from([0, 5]), c_out=st.sampled_from([4, 9]),
       affine=st.booleans(), dtype=st.sampled_from([torch.float32, torch.float64, torch.bfloat16]),
       split=st.sampled_from([2, 3, 4]), seed=st.integers(0, 2**16))
def test_wgrad_split_matches_unsplit_and_float64(b, h, w, c1, c2, c_out, affine, dtype, split, seed):
    """wgrad's K is the pixels: split_k pixel chunks (at least 32 pixels each in the interpreter)."""
    inputs, ref = make_case(b, c1, c2, c_out, h, w, affine=affine, dtype=dtype, seed=seed)
    _check_wgrad(inputs, ref, dtype, split)


def test_env_var_forces_the_split(monkeypatch):
    """BIONET_FAST_SPLIT_K=S is split_k=S for every call (same config: same bits)."""
    args = _case(2, 5, 4, 9, 3, 5, torch.float32, True, True, True, device=DEV, seed=1)
    x1, weight, bias, x2, aff = args
    want = conv3x3_fwd(x1, weight, bias, x2, **aff, split_k=3)
    monkeypatch.setenv("BIONET_FAST_SPLIT_K", "3")
    _same_bits(want, conv3x3_fwd(x1, weight, bias, x2, **aff), "env var")
    with pytest.raises(ValueError, match="split_k"):
        conv3x3_fwd(x1, weight, bias, x2, **aff, split_k=0)


# ---------------------------------------------------------------- where the GPU tables split
def _meta(n):  # a stand-in for a pointer argument: only numel / element size / device are read
    return torch.empty(n, device="meta")


def _fwd_prune(c1, c2, cout, m, workspace=True, elem=2):
    table = splitk.configs(conv_fwd._GPU_CONFIGS, conv_fwd._SPLIT_TILES)
    args = dict(x1_ptr=torch.empty(0, dtype=torch.bfloat16 if elem == 2 else torch.float32),
                M=m, C1=c1, C2=c2, COUT=cout,
                part_ptr=_meta(max(splitk.SPLITS) * m * cout if workspace else 1))
    return conv_fwd._prune(table, args)


def _splits(cfgs):
    return sorted({c.kwargs["SPLIT_K"] for c in cfgs})


def test_fwd_prune_offers_splits_only_where_tiles_are_few():
    assert _splits(_fwd_prune(512, 256, 256, 2 * 32 * 32)) == [1, 2, 4]  # 16-128 tiles, K=6912
    assert _splits(_fwd_prune(512, 0, 512, 2 * 16 * 16)) == [1, 2, 4]
    assert _splits(_fwd_prune(32, 0, 32, 2 * 256 * 256)) == [1]  # thousands of tiles
    assert _splits(_fwd_prune(512, 256, 256, 2 * 32 * 32, workspace=False)) == [1]
    assert _splits(_fwd_prune(3, 0, 32, 2 * 8 * 8)) == [1]  # K loop of 9 iterations: too short
    for c in _fwd_prune(512, 256, 256, 2048):
        tiles = triton.cdiv(2048, c.kwargs["BLOCK_M"]) * triton.cdiv(256, c.kwargs["BLOCK_N"])
        assert c.kwargs["SPLIT_K"] == 1 or tiles < splitk.DEFAULT_SMS


def test_dgrad_prune_offers_splits_only_where_tiles_are_few():
    table = splitk.configs([(128, 64, 32, 4, 4), (64, 64, 64, 4, 4)], _bwd_utils._DGRAD_SPLIT_TILES)

    def prune(c_in, c_out, m):
        return _bwd_utils.prune_dgrad(table, dict(dy_ptr=torch.empty(0, dtype=torch.bfloat16), M=m,
                                                  C_IN=c_in, C_OUT=c_out,
                                                  part_ptr=_meta(max(splitk.SPLITS) * m * c_in)))

    assert _splits(prune(512, 512, 2 * 16 * 16)) == [1, 2, 4]
    assert _splits(prune(64, 64, 2 * 128 * 128)) == [1]


def test_pinned_and_interpreter_tables_do_not_split():
    """BIONET_FAST_AUTOTUNE=0 keeps its configs (SPLIT_K=1), and no workspace is allocated."""
    for table in (splitk.configs([conv_fwd._GPU_CONFIGS[1]]), conv_fwd._configs(), _bwd_utils.dgrad_configs()):
        if len(table) == 1:
            assert table[0].kwargs["SPLIT_K"] == 1
            ws = splitk.workspace(2048, 2048, 256, torch.empty(0), torch.float32, table, None)
            assert ws.numel() == 1


# ---------------------------------------------------------------- GPU twins (real sizes)
@needs_gpu
@pytest.mark.parametrize("split", [2, 4])
@pytest.mark.parametrize("dims", [(2, 512, 256, 256, 32, 32), (2, 512, 0, 512, 16, 16)])
def test_fwd_split_gpu(dims, split):
    args = _case(*dims, torch.bfloat16, True, True, True, device="cuda", seed=5)
    _fwd_split_vs_unsplit(args, torch.bfloat16, split)


@needs_gpu
@pytest.mark.parametrize("split", [2, 4])
def test_dgrad_split_gpu(split):
    inputs, ref = make_case(2, 256, 256, 256, 32, 32, dtype=torch.bfloat16, seed=6)
    _check_dgrad(inputs, ref, torch.bfloat16, split)


@needs_gpu
def test_wgrad_split_gpu():
    inputs, ref = make_case(2, 256, 0, 512, 32, 32, dtype=torch.bfloat16, seed=7)
    _check_wgrad(inputs, ref, torch.bfloat16, 4)
