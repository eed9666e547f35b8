"""Checkpointing composes with autocast, channels_last, torch.compile (both backends) and (on a GPU)
CUDA-graph capture of a whole train step. The CPU tests are the interpreter-free twins of the CUDA ones."""
from __future__ import annotations

import copy

import pytest
import torch

from bionet_fast import BiONet

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def grads_under_autocast(model, x, y, device_type):
    model.zero_grad(set_to_none=True)
    with torch.autocast(device_type, dtype=torch.bfloat16):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x).float(), y)
    loss.backward()
    # (the last UP's BatchNorm of a non-final iteration feeds nothing without INT: it has no grad)
    return loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def check_autocast_channels_last(device, size):
    torch.manual_seed(0)
    plain = BiONet(iterations=3, multiplier=0.25, depth=2, backend="reference").to(device)
    plain = plain.to(memory_format=torch.channels_last)
    ckpt = copy.deepcopy(plain)
    ckpt.set_grad_checkpointing(True)
    x = torch.randn(2, 3, size, size, device=device).to(memory_format=torch.channels_last)
    y = (torch.rand(2, 1, size, size, device=device) > 0.5).float()
    loss_a, grads_a = grads_under_autocast(plain, x, y, device.type)
    loss_b, grads_b = grads_under_autocast(ckpt, x, y, device.type)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-6, atol=0)
    assert grads_a.keys() == grads_b.keys()
    for k in grads_a:
        torch.testing.assert_close(grads_b[k], grads_a[k], rtol=1e-5, atol=1e-6, msg=k)
    for (k, a), (_, b) in zip(plain.named_buffers(), ckpt.named_buffers()):
        torch.testing.assert_close(b, a, msg=k)


def test_checkpointing_with_bf16_autocast_and_channels_last_cpu():
    check_autocast_channels_last(torch.device("cpu"), 32)


@cuda
def test_checkpointing_with_bf16_autocast_and_channels_last_cuda():
    check_autocast_channels_last(torch.device("cuda"), 128)


def train_losses(model, x, y, steps, graph: bool):
    """Adam steps; with graph=True the whole step (forward, backward, optimizer) is one CUDA graph."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, capturable=graph)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        opt.step()
        return loss.detach()

    if not graph:
        return [step().item() for _ in range(steps)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up outside the graph, as the CUDA-graph docs ask
        losses = [step().item()]
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        static_loss = step()
    for _ in range(steps - 1):
        g.replay()
        losses.append(static_loss.item())
    return losses


@cuda
def test_checkpointed_train_step_captures_in_one_cuda_graph():
    torch.manual_seed(0)
    base = BiONet(iterations=3, multiplier=0.5, depth=3, checkpoint_iters=True, backend="reference").cuda()
    x = torch.randn(2, 3, 128, 128, device="cuda")
    y = (torch.rand(2, 1, 128, 128, device="cuda") > 0.5).float()
    eager = train_losses(copy.deepcopy(base), x, y, 4, graph=False)
    graphed = train_losses(copy.deepcopy(base), x, y, 4, graph=True)
    assert graphed == pytest.approx(eager, rel=1e-3)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_torch_compile_keeps_working(backend):
    """torch.compile (Dynamo + AOTAutograd; "aot_eager" needs no C++ compiler) of a checkpointed
    model: same loss, gradients, running statistics and eval output as eager. The fused blocks are
    opaque to Dynamo (they launch their own kernels), so the compiled model runs them as they are."""
    torch.manual_seed(0)
    eager = BiONet(iterations=2, multiplier=0.25, depth=1, checkpoint_iters=True, backend=backend)
    model = copy.deepcopy(eager)
    compiled = torch.compile(model, backend="aot_eager")
    x = torch.randn(2, 3, 8, 8)
    y = (torch.rand(2, 1, 8, 8) > 0.5).float()
    losses = []
    for m in (compiled, eager):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(m(x), y)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-6, atol=0)
    for (k, a), (_, b) in zip(eager.named_parameters(), model.named_parameters()):
        assert (a.grad is None) == (b.grad is None), k
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-5, atol=1e-7, msg=k)
    for (k, a), (_, b) in zip(eager.named_buffers(), model.named_buffers()):
        torch.testing.assert_close(b, a, msg=k)
    eager.eval(), model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), eager(x), rtol=1e-5, atol=1e-6)
