"""A trained model gives the same answer whatever the inference window (issue 16, case 14).

Causes (README.md, "Window size"; bench/window_size.py): with zero padding, the deepest maps of a
64-pixel training crop are all border, so a larger window feeds the deep layers statistics the
BatchNorms never saw; and precise BN averaged the statistics of several batches, which eval mode
cannot reproduce. The recurrence amplifies either mismatch every iteration. The synthetic recipe
pads by reflection (convs pad by reflection, the UP deconvs read a replicated edge: borders look
like image) and sets the statistics from one batch; the model's own default stays "zeros" so that
official checkpoints import exactly."""
import pytest
import torch

from bionet_fast import BiONet
from bionet_fast.data.synthetic import SyntheticNucleiDataset
from bionet_fast.engine.prediction.inference import infer
from bionet_fast.metrics import SegmentationMeter
from bionet_fast.models.bionet import _EdgeUp, _up
from bionet_fast.models.config import BiONetConfig
from bionet_fast.train import SYNTHETIC
from bionet_fast.train import main as train


def _dice(model: BiONet, images: SyntheticNucleiDataset, window: int) -> float:
    meter = SegmentationMeter(1)
    for i in range(len(images)):
        x, y = images[i]
        meter.update(infer(model, x[None], "segmentation", window), y[None])
    return meter.compute()["dice"]


def _eval_model(padding_mode: str) -> BiONet:
    """A t=3 depth-2 model with random weights and random BatchNorm statistics, in eval mode."""
    torch.manual_seed(0)
    model = BiONet(iterations=3, multiplier=0.25, depth=2, padding_mode=padding_mode).double().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(0.0, 0.5), m.running_var.uniform_(0.5, 2.0)
    return model


def test_default_padding_is_the_official_zeros_and_weights_are_shared():
    assert BiONetConfig().padding_mode == "zeros" and BiONet().config.padding_mode == "zeros"
    zeros, reflect = _eval_model("zeros"), _eval_model("reflect")
    assert zeros.state_dict().keys() == reflect.state_dict().keys()
    reflect.load_state_dict(zeros.state_dict())  # same parameters; only the padding differs
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    assert not torch.allclose(zeros(x), reflect(x))
    with pytest.raises(ValueError, match="padding_mode='circular'"):
        BiONetConfig(padding_mode="circular")
    # the fused kernels pad by reflection too (issue 21): triton is no longer refused
    assert BiONet(depth=2, multiplier=0.25, padding_mode="reflect",
                  backend="triton").resolved_backend(torch.device("cpu")) == "triton"


def test_edge_up_is_the_official_up_but_for_its_last_row_and_column():
    torch.manual_seed(0)
    official, edge = _up(4), _EdgeUp(4, "constant")  # constant (zero) edge: the official deconv exactly
    edge.load_state_dict(official.state_dict())
    x = torch.randn(2, 4, 5, 6, dtype=torch.float64)
    official, edge = official.double(), edge.double()
    torch.testing.assert_close(edge(x), official(x))
    edge.edge_mode = "replicate"
    y, ref = edge(x), official(x)
    torch.testing.assert_close(y[..., :-1, :-1], ref[..., :-1, :-1])
    assert not torch.allclose(y[..., -1, :], ref[..., -1, :])


def test_a_featureless_window_looks_nearly_the_same_at_every_size():
    """A uniform image, a 16-pixel window vs the same corner of a 64-pixel one (random eval-mode
    model, float64): reflect padding makes the answer depend far less on the window than zeros."""
    x = torch.full((1, 3, 64, 64), 0.6, dtype=torch.float64)
    gap = {}
    for mode in ("zeros", "reflect"):
        model = _eval_model(mode)
        with torch.no_grad():
            gap[mode] = (model(x[..., :16, :16]) - model(x)[..., :16, :16]).abs().mean().item()
    assert gap["reflect"] < gap["zeros"] / 5, gap  # measured: 0.011 vs 0.107


def test_padding_mode_survives_save_and_load(tmp_path):
    model = _eval_model("reflect")
    model.save_pretrained(tmp_path)
    loaded = BiONet.from_pretrained(tmp_path).double().eval()
    assert loaded.config.padding_mode == "reflect"
    x = torch.rand(1, 3, 32, 32, dtype=torch.float64)
    torch.testing.assert_close(loaded(x), model(x))


def test_dice_does_not_depend_on_the_window(tmp_path):
    """The default synthetic recipe (t=5, reflect padding, precise BN in one batch), shortened to
    2 epochs of 30 steps: the same Dice at its training crop, twice it and the whole image
    (held-out images three times the crop's side, pooled), and 512-pixel windows saved as the
    default for predict and evaluate. The full default run: 0.899 / 0.900 at 64 / 128 on the 48
    validation images, 0.915 at 64, 128, 256 and 512 on six 512x512 ones (docs/evaluation.md, Window size)."""
    crop, out = SYNTHETIC["image_size"], tmp_path / "run"
    assert SYNTHETIC["padding_mode"] == "reflect"
    assert train(["--t", "5", "--epochs", "2", "--steps", "30", "--n-train", "128", "--n-val", "4",
                  "--precise-bn", "128", "--threads", "1", "--quiet", "--device", "cpu", "--out", str(out)]) == 0
    model = BiONet.from_pretrained(out).eval()
    assert model.config.padding_mode == "reflect" and model.inference_info.tile_size == 512
    held = SyntheticNucleiDataset(2, 3 * crop, seed=777)
    scores = {w: _dice(model, held, w) for w in (crop, 2 * crop, 3 * crop)}  # 3 * crop: the whole image
    assert scores[crop] > 0.7, scores  # a model worth comparing
    for window, score in scores.items():
        assert abs(score - scores[crop]) <= 0.02, scores


def test_precise_bn_in_one_batch_makes_eval_mode_reproduce_that_batch(monkeypatch):
    """The statistics --precise-bn sets (engine.trainer.set_batch_statistics): eval mode then gives
    the train-mode output of that batch exactly (float64, t=4: four chances for the recurrence to
    amplify a mismatch), once the stored unbiased variances are taken back to the biased ones the
    batch was normalised with. Averaging the statistics of two half-batches, as precise BN did
    before, does not: each half normalised its upstream layers with its own statistics."""
    from bionet_fast.blocks import reference
    from bionet_fast.engine.training.trainer import set_batch_statistics

    torch.manual_seed(0)
    model = BiONet(iterations=4, multiplier=0.25, depth=2, padding_mode="reflect").double()
    x = torch.rand(8, 3, 32, 32, dtype=torch.float64) * torch.rand(8, 3, 1, 1, dtype=torch.float64)
    counts, plain = {}, reference.batch_norm

    def spy(h, bn):  # elements per channel of every BatchNorm's input
        counts[bn] = h.numel() // h.shape[1]
        return plain(h, bn)

    monkeypatch.setattr(reference, "batch_norm", spy)
    with torch.no_grad():
        want = model.train()(x)
        set_batch_statistics(model, x)
        for bn, n in counts.items():
            bn.running_var.mul_((n - 1) / n)  # unbiased (stored) -> biased (used in train mode)
        one_batch = model.eval()(x)
        for bn, n in counts.items():
            bn.reset_running_stats()
            bn.momentum = None  # cumulative average of the two halves' statistics
        model.train()(x[:4]), model(x[4:])
        for bn, n in counts.items():
            bn.running_var.mul_((n // 2 - 1) / (n // 2))
        halves = model.eval()(x)
    assert len(counts) == 62  # the BatchNorms that feed the output (3 of the 65 feed nothing)
    torch.testing.assert_close(one_batch, want, rtol=1e-9, atol=1e-9)
    assert (halves - want).abs().max() > 0.05 * want.abs().max()
