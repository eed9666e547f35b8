"""The whole BiONet on the fused Triton backend against the reference backend.

On a machine without a GPU the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET),
so the models are tiny; the CUDA twins at the bottom repeat the checks at real sizes."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bionet_fast import BiONet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def rel(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    return ((got - want).norm() / want.norm().clamp_min(1e-30)).item()


def pair(device="cpu", dtype=torch.float32, **kw):
    torch.manual_seed(0)
    ref = BiONet(backend="reference", **kw).to(device, dtype)
    fused = copy.deepcopy(ref)
    fused.config.backend = "triton"
    return ref, fused


def assert_same_state(ref, fused, tol):
    for (k, a), (_, b) in zip(ref.named_buffers(), fused.named_buffers()):
        assert rel(b, a) <= tol or (a - b).abs().max() <= tol, k


def test_float64_forward_and_running_stats_equal_reference():
    ref, fused = pair(dtype=torch.float64, iterations=2, multiplier=0.25, depth=2)
    x = torch.randn(2, 3, 16, 24, dtype=torch.float64)
    for train in (True, False):
        ref.train(train), fused.train(train)
        assert rel(fused(x), ref(x)) <= 1e-9
    assert_same_state(ref, fused, 1e-9)
    assert fused.norms[1].enc[0][0].num_batches_tracked.item() == 1


def test_float32_forward_matches_reference_to_its_own_rounding():
    """fp32: eval within 1e-4; train within 1e-4 of the float64 reference, or no further from it than
    the fp32 reference itself is (batch statistics of a tiny input amplify rounding)."""
    ref, fused = pair(iterations=2, multiplier=0.25, depth=2, integrate=True)
    exact = copy.deepcopy(ref).double()
    x = torch.randn(3, 3, 16, 24)
    got, want, ideal = fused(x), ref(x), exact(x.double())
    assert rel(got, ideal) <= max(1e-4, 2 * rel(want, ideal))
    assert_same_state(ref, fused, 1e-4)
    for m in (ref, fused):
        m.eval()
    assert rel(fused(x), ref(x)) <= 1e-4


def test_bfloat16_autocast_forward():
    """bf16 autocast against the fp32 reference: within the issue's 2e-2, and no more than 1.5x the
    bf16 reference's own error (measured: fused 1.4e-2, reference 1.1e-2). The interpreter's
    fp32 -> bf16 cast truncates; the kernels round to nearest even as the GPU does (round_to)."""
    ref, fused = pair(iterations=2, multiplier=0.25, depth=2, in_channels=1, classes=2)
    x = torch.randn(1, 1, 16, 16)
    ref.eval(), fused.eval()
    want = ref(x)  # fp32 ground truth
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref_bf16 = fused(x), ref(x)
    assert got.dtype == torch.bfloat16
    assert rel(got.float(), want) <= 2e-2
    assert rel(got.float(), want) <= 1.5 * rel(ref_bf16.float(), want)


def test_bfloat16_train_forward_and_running_stats():
    """Train mode in bf16: batch statistics from the fp32 accumulator, running stats in fp32."""
    ref, fused = pair(iterations=2, multiplier=0.25, depth=2, integrate=True)
    exact = copy.deepcopy(ref).double()
    x = torch.randn(2, 3, 16, 24)
    want = exact(x.double())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, ref_bf16 = fused(x), ref(x)
    assert rel(got.float(), want) <= max(2e-2, 1.5 * rel(ref_bf16.float(), want))
    worst = {"fused": 0.0, "reference": 0.0}
    for (k, a), (_, b), (_, r) in zip(exact.named_buffers(), fused.named_buffers(), ref.named_buffers()):
        if a.dtype.is_floating_point:
            worst["fused"] = max(worst["fused"], rel(b, a))
            worst["reference"] = max(worst["reference"], rel(r, a))
        else:
            assert torch.equal(a, b), k
    assert worst["fused"] <= max(2e-2, 1.5 * worst["reference"]), worst


@pytest.mark.parametrize("kw", [dict(integrate=True), dict(backward_skips=1)], ids=["INT", "w1"])
def test_float64_gradients_equal_reference(kw):
    ref, fused = pair(dtype=torch.float64, iterations=2, multiplier=0.25, depth=2, **kw)
    x = torch.randn(2, 3, 8, 24, dtype=torch.float64)
    y = (torch.rand(2, 1, 8, 24) > 0.5).double()
    grads = []
    for m in (ref, fused):
        xi = x.clone().requires_grad_(True)
        F.binary_cross_entropy_with_logits(m(xi), y).backward()
        grads.append([xi.grad] + [p.grad for p in m.parameters()])
    names = ["input"] + [k for k, _ in ref.named_parameters()]
    for name, a, b in zip(names, *grads):
        assert (a is None) == (b is None), name
        if a is not None:
            assert rel(b, a) <= 1e-8, name


def test_twenty_training_steps_follow_the_reference():
    """float64 on both sides: in fp32, Adam turns the rounding noise of near-zero gradients into
    full-size steps (m / sqrt(v)), and the two runs would drift apart for reasons of its own."""
    ref, fused = pair(dtype=torch.float64, iterations=2, multiplier=0.25, depth=1)
    g = torch.Generator().manual_seed(1)
    data = [(torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64),
             (torch.rand(2, 1, 8, 8, generator=g) > 0.5).double()) for _ in range(4)]
    losses = []
    for model in (ref, fused):
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        run = []
        for step in range(20):
            x, y = data[step % len(data)]
            opt.zero_grad()
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            loss.backward()
            opt.step()
            run.append(loss.item())
        losses.append(run)
    assert losses[1] == pytest.approx(losses[0], rel=1e-3)
    assert losses[0][-1] < losses[0][0]


def test_fused_with_checkpointing_updates_running_stats_once():
    ref, fused = pair(dtype=torch.float64, iterations=2, multiplier=0.25, depth=1, checkpoint_iters=True)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    y = (torch.rand(2, 1, 8, 8) > 0.5).double()
    for m in (ref, fused):
        F.binary_cross_entropy_with_logits(m(x), y).backward()
    assert_same_state(ref, fused, 1e-9)
    assert fused.norms[0].mid[0].num_batches_tracked.item() == 1
    for (k, a), b in zip(ref.named_parameters(), fused.parameters()):
        if a.grad is not None:
            assert rel(b.grad, a.grad) <= 1e-8, k


# --- CUDA twins at real sizes ---------------------------------------------------------------------
@cuda
@pytest.mark.parametrize("padding_mode", ["zeros", "reflect"])
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-2), (torch.bfloat16, 5e-2)])
def test_cuda_forward_and_gradients_match_reference(dtype, tol, padding_mode):
    ref, fused = pair("cuda", iterations=3, multiplier=0.5, depth=4, padding_mode=padding_mode)
    x = torch.randn(2, 3, 256, 256, device="cuda").to(memory_format=torch.channels_last)
    y = (torch.rand(2, 1, 256, 256, device="cuda") > 0.5).float()
    outs = []
    for m in (ref, fused):
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            out = m(x)
        F.binary_cross_entropy_with_logits(out.float(), y).backward()
        outs.append(out.float())
    assert rel(outs[1], outs[0]) <= tol  # TF32 / bf16 dot products on both sides
    for (k, a), b in zip(ref.named_parameters(), fused.parameters()):
        if a.grad is not None:
            assert rel(b.grad, a.grad) <= 5 * tol, k


@cuda
def test_cuda_eval_forward_in_a_cuda_graph():
    ref, fused = pair("cuda", iterations=3, multiplier=1.0, depth=4)
    ref.eval(), fused.eval()
    x = torch.randn(2, 3, 512, 512, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        fused(x)  # autotune outside the capture
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            out = fused(x)
        g.replay()
        want = ref(x)
    assert rel(out.float(), want.float()) <= 5e-2
