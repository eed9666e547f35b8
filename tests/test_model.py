"""The reference BiONet: shapes for every knob, the wiring of shared weights and per-iteration
BatchNorms, persistence, and input errors. One shared test class runs over several configurations
(segmentation_models_pytorch style)."""
from __future__ import annotations

import json

import pytest
import torch

from bionet_fast import BiONet, BiONetConfig

CONFIGS = {
    "t1": dict(iterations=1, multiplier=0.25, depth=2),
    "t3": dict(iterations=3, multiplier=0.25, depth=2),
    "int": dict(iterations=3, multiplier=0.25, depth=2, integrate=True),
    "w1": dict(iterations=2, multiplier=0.25, depth=3, backward_skips=1),
    "w0": dict(iterations=2, multiplier=0.25, depth=2, backward_skips=0),
    "depth3_gray_2cls": dict(in_channels=1, classes=2, iterations=2, multiplier=0.25, depth=3),
    "x0.75": dict(iterations=2, multiplier=0.75, depth=2),
}


@pytest.fixture(params=sorted(CONFIGS), scope="class")
def config(request) -> BiONetConfig:
    return BiONetConfig(**CONFIGS[request.param])


class TestBiONet:
    def test_logits_shape_for_odd_batches(self, config):
        model = BiONet.from_config(config)
        m = config.size_multiple
        for batch, (h, w) in ((1, (m, 2 * m)), (3, (2 * m, m))):
            x = torch.randn(batch, config.in_channels, h, w)
            assert model(x).shape == (batch, config.classes, h, w)

    def test_predict_is_probability_and_keeps_mode(self, config):
        model = BiONet.from_config(config).train()
        p = model.predict(torch.randn(2, config.in_channels, 32, 32))
        assert model.training
        assert p.min() >= 0 and p.max() <= 1
        if config.classes > 1:
            torch.testing.assert_close(p.sum(1), torch.ones_like(p[:, 0]))

    def test_every_iteration_sends_gradient_to_shared_weights(self, config):
        model = BiONet.from_config(config)
        arrivals = []
        conv = model.encoders[config.depth - 1].conv1  # the deepest level always has its weights reused

        def watch(module, inputs, out):  # returns None: the output is left as it is
            out.register_hook(lambda g: arrivals.append(g.abs().sum()))

        conv.register_forward_hook(watch)
        model(torch.randn(2, config.in_channels, 32, 32)).square().mean().backward()
        # with w=0 no iteration feeds the next, so only the last one reaches the output
        assert len(arrivals) == (config.iterations if config.skips else 1)
        assert all(a > 0 for a in arrivals)
        assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0

    def test_batchnorms_belong_to_one_iteration(self, config):
        model = BiONet.from_config(config).train()
        assert len({id(n) for n in model.norms}) == config.iterations
        model(torch.randn(2, config.in_channels, 32, 32))
        means = [n.enc[-1][0].running_mean for n in model.norms]
        ran = [n.enc[-1][0].num_batches_tracked.item() for n in model.norms]
        # with w=0 no iteration feeds the next: only the last one runs
        assert ran == ([1] * config.iterations if config.skips else [0] * (config.iterations - 1) + [1])
        if config.iterations > 1 and config.skips:  # iterations saw different features: different stats
            assert not torch.allclose(means[0], means[1])

    def test_save_and_load_pretrained(self, config, tmp_path):
        model = BiONet.from_config(config).eval()
        model(torch.randn(2, config.in_channels, 32, 32))
        model.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "config.json").read_text())["iterations"] == config.iterations
        loaded = BiONet.from_pretrained(tmp_path).eval()
        x = torch.randn(1, config.in_channels, 32, 32)
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)

    def test_config_json_round_trip(self, config, tmp_path):
        assert BiONetConfig.from_json(config.to_json()) == config
        config.to_json(tmp_path / "c.json")
        assert BiONetConfig.from_json(tmp_path / "c.json") == config
        assert BiONet.from_config(config).config == config


def test_checkpoint_of_another_configuration_is_refused(tmp_path):
    BiONet(iterations=2, multiplier=0.25, depth=2).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"missing keys.*norms\.2.*from its config\.json|does not match"):
        BiONet.from_pretrained(tmp_path, iterations=3)
    with pytest.raises(FileNotFoundError, match="config.json"):
        BiONet.from_pretrained(tmp_path / "nowhere")


def test_wrong_channel_count_names_the_fix():
    model = BiONet(in_channels=3, multiplier=0.25, depth=2)
    with pytest.raises(ValueError, match=r"in_channels=3 but the input has 1 channels.*in_channels=1"):
        model(torch.randn(1, 1, 32, 32))
    with pytest.raises(ValueError, match="4-D"):
        model(torch.randn(3, 32, 32))


def test_size_not_divisible_names_nearest_sizes():
    model = BiONet(multiplier=0.25, depth=4)  # multiple of 32
    with pytest.raises(ValueError, match=r"height 100 is not divisible by 2\*\*\(depth\+1\) = 32.*96 or 128"):
        model(torch.randn(1, 3, 100, 64))
    with pytest.raises(ValueError, match=r"width 20 .* 32"):
        model(torch.randn(1, 3, 64, 20))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(iterations=0), "iterations=0"),
    (dict(depth=2, backward_skips=3), r"backward_skips=3 with depth=2; use 0\.\.2"),
    (dict(multiplier=0.0), "multiplier"),
    (dict(multiplier=0.01), "multiplier >= 0.03125"),
    (dict(backend="cuda"), "choose one of auto, reference, triton"),
    (dict(bn_momentum=1.5), "bn_momentum"),
    (dict(checkpoint_segments=0), "checkpoint_segments"),
])
def test_invalid_config_raises(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        BiONet(**kwargs)
    with pytest.raises(ValueError, match="unknown BiONetConfig field"):
        BiONetConfig.from_dict({"iterations": 2, "iters": 3})


def test_backend_env_override(monkeypatch):
    model = BiONet(multiplier=0.25, depth=2, backend="triton")
    monkeypatch.setenv("BIONET_FAST_BACKEND", "reference")
    assert model.resolved_backend(torch.device("cpu")) == "reference"
    monkeypatch.setenv("BIONET_FAST_BACKEND", "bogus")
    with pytest.raises(ValueError, match="BIONET_FAST_BACKEND"):
        model.resolved_backend(torch.device("cpu"))
    monkeypatch.delenv("BIONET_FAST_BACKEND")
    assert BiONet(multiplier=0.25, depth=2).resolved_backend(torch.device("cpu")) == "reference"


def test_he_normal_initialisation():
    model = BiONet(multiplier=1.0, depth=2, iterations=1)
    w = model.encoders[1].conv2.weight  # 64 -> 64 channels: fan_in 576
    assert w.abs().max() <= 2 * (2 / 576) ** 0.5 / 0.8796 + 1e-6
    assert abs(w.std().item() - (2 / 576) ** 0.5) < 0.1 * (2 / 576) ** 0.5
    assert torch.count_nonzero(model.encoders[1].conv2.bias) == 0
