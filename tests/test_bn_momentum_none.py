"""BatchNorm momentum=None (cumulative moving average, as nn.BatchNorm2d) on both backends, and
torch.optim.swa_utils.update_bn / AveragedModel on a BiONet."""
import pytest
import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn

from bionet_fast import BiONet, BiONetConfig
from bionet_fast.blocks.reference import RefOps

BATCHES = [torch.rand(2, 3, 16, 16, dtype=torch.float64) * (1 + k) for k in range(3)]


def test_config_accepts_none_and_still_refuses_bad_momentum():
    assert BiONetConfig(bn_momentum=None).bn_momentum is None
    with pytest.raises(ValueError, match="bn_momentum"):
        BiONetConfig(bn_momentum=1.5)


def _block_stats(ops, device="cpu", dtype=torch.float64):
    """Running statistics of one conv block's BatchNorm (momentum=None) after three batches, beside
    nn.BatchNorm2d's on the same conv -> ReLU outputs."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3, padding=1).to(device, dtype)
    bn = nn.BatchNorm2d(4, momentum=None).to(device, dtype)
    ref = nn.BatchNorm2d(4, momentum=None).to(device, dtype)
    for x in BATCHES:
        x = x.to(device, dtype)
        ops.block([ops.from_dense(x)], conv, bn)
        with torch.no_grad():
            ref(torch.relu(conv(x)))
    return bn, ref


def test_reference_block_cumulative_average_equals_nn_batchnorm():
    bn, ref = _block_stats(RefOps())
    assert int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-12, atol=1e-12)


def test_fused_block_cumulative_average_equals_nn_batchnorm():
    """The GPU test's CPU twin: the Triton kernels run in the interpreter (fp32 there)."""
    pytest.importorskip("triton")
    from bionet_fast.blocks.fused import FusedOps

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bn, ref = _block_stats(FusedOps(), device, torch.float32)
    assert int(bn.num_batches_tracked) == 3
    torch.testing.assert_close(bn.running_mean, ref.running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(bn.running_var, ref.running_var, rtol=1e-4, atol=1e-5)


def _direct_average(model, batches):
    """Each BatchNorm's statistics per batch (momentum 1 after a reset: running = that batch's), then
    their plain mean: the cumulative average update_bn must reach."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    per_batch = []
    for x in batches:
        for m in bns:
            m.reset_running_stats()
            m.momentum = 1.0
        model.train()
        with torch.no_grad():
            model(x)
        per_batch.append([(m.running_mean.clone(), m.running_var.clone()) for m in bns])
    return [(torch.stack([b[i][0] for b in per_batch]).mean(0), torch.stack([b[i][1] for b in per_batch]).mean(0))
            for i in range(len(bns))]


@pytest.mark.parametrize("backend", ["reference"])  # the fused twin is the block test above: a whole
def test_update_bn_sets_the_cumulative_average(backend):  # model in the interpreter takes minutes
    dtype = torch.float64
    model = BiONet(iterations=2, multiplier=0.125, depth=2, backend=backend).to(dtype)
    batches = [x.to(dtype) for x in BATCHES]
    update_bn(batches, model)  # resets, sets momentum=None, one pass, restores momentum
    got = [(m.running_mean.clone(), m.running_var.clone(), m.momentum)
           for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    want = _direct_average(model, batches)
    assert all(momentum == 0.01 for _, _, momentum in got)
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-5)
    ran = 0
    for (mean, var, _), (wmean, wvar) in zip(got, want):
        torch.testing.assert_close(mean, wmean, **tol)
        torch.testing.assert_close(var, wvar, **tol)
        ran += bool(wmean.abs().sum() > 0)
    assert ran > 10  # most BatchNorms saw data (the dead ones of iteration 0 keep their reset state)


def test_averaged_model_ema_of_a_bionet():
    model = BiONet(iterations=2, multiplier=0.125, depth=2, bn_momentum=None)
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5), use_buffers=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ema.update_parameters(model)  # the first update copies the weights
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update_parameters(model)
    for (k, v), p in zip(before.items(), ema.module.state_dict().values()):
        if v.is_floating_point() and k.endswith(("weight", "bias")):
            torch.testing.assert_close(p, v + 0.5)  # 0.5 * old + 0.5 * (old + 1)
    ema.eval()
    assert ema(torch.rand(1, 3, 16, 16)).shape == (1, 1, 16, 16)
