"""load_official: checkpoints written in the official port's layout import with exact outputs."""
from __future__ import annotations

import pytest
import torch
from port_layout import PortNet, randomise

from bionet_fast import BiONet, load_official
from bionet_fast.models.official import infer_config

CASES = [  # port kwargs; small multipliers keep the CPU run short
    dict(iterations=1, multiplier=0.25, num_layers=4),
    dict(iterations=2, multiplier=0.25, num_layers=4),
    dict(iterations=3, multiplier=0.25, num_layers=3, integrate=True),
    dict(iterations=2, multiplier=0.5, num_layers=3),
    dict(iterations=3, multiplier=0.25, num_layers=2),
]


def port(seed=0, **kw) -> PortNet:
    torch.manual_seed(seed)
    return randomise(PortNet(**kw), seed)


@pytest.mark.parametrize("kw", CASES, ids=lambda kw: "-".join(f"{k}{v}" for k, v in kw.items()))
@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_outputs_equal_the_ports(kw, train, tmp_path):
    ref = port(**kw)
    path = tmp_path / "iter_2_mul_1_best_weights.pt"
    torch.save({"state_dict": ref.state_dict()}, path)
    model = load_official(path)
    ref.train(train), model.train(train)
    x = torch.randn(2, 3, 64, 64)
    expected = ref(x)
    torch.testing.assert_close(torch.sigmoid(model(x)), expected, rtol=1e-5, atol=1e-5)
    if train:  # the next step sees updated running stats in both; eval outputs must still agree
        ref.eval(), model.eval()
        torch.testing.assert_close(torch.sigmoid(model(x)), ref(x), rtol=1e-5, atol=1e-5)


def test_config_is_inferred_and_overrides_win():
    state = port(iterations=3, multiplier=0.5, num_layers=3, integrate=True).state_dict()
    assert infer_config(state) == dict(in_channels=3, classes=1, iterations=3, multiplier=0.5, depth=3,
                                       integrate=True, backward_skips=None)
    model = load_official(state, checkpoint_iters=True, backend="reference")  # unwrapped dict
    assert model.config.checkpoint_iters and model.config.iterations == 3 and model.config.integrate


def test_shared_middle_batchnorm_is_copied_into_every_iteration():
    ref = port(iterations=3, multiplier=0.25, num_layers=2)
    model = load_official({"state_dict": ref.state_dict()})
    for norms in model.norms:
        torch.testing.assert_close(norms.mid[1].running_var, ref.middles[5].running_var)
    # conv weights: stored once; the port's per-iteration duplicates collapsed
    assert sum("encoders.0.conv1.weight" in k for k in model.state_dict()) == 1


def test_int_with_one_iteration_is_the_plain_model():
    state = port(iterations=1, multiplier=0.25, num_layers=2, integrate=True).state_dict()
    assert infer_config(state)["integrate"] is False


def test_missing_and_unexpected_keys_are_named():
    state = port(iterations=2, multiplier=0.25, num_layers=2).state_dict()
    broken = dict(state)
    del broken["iteration1_layer0_encoder_convs.2.running_mean"]
    broken["extra_head.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match=r"missing keys \['iteration1_layer0_encoder_convs\.2\.running_mean'\]"
                                         r".*unexpected keys \['extra_head\.weight'\]"):
        load_official(broken)


def test_not_a_port_checkpoint():
    with pytest.raises(ValueError, match="missing key 'pre_transform_conv_block.0.weight'"):
        load_official(BiONet(multiplier=0.25, depth=2).state_dict())
    with pytest.raises(FileNotFoundError, match="iter_"):
        load_official("/nonexistent/iter_3_mul_1_best_weights.pt")


def test_diverging_shared_copies_are_refused():
    state = dict(port(iterations=2, multiplier=0.25, num_layers=2).state_dict())
    key = "iteration1_layer1_decoder_convs.0.weight"
    state[key] = state[key] + 1
    with pytest.raises(ValueError, match="differs from its copy in iteration 1"):
        load_official(state)


class _Opaque:  # pickled as code: weights_only=True must refuse it
    pass


def test_files_that_need_unpickling_are_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "obj": _Opaque()}, path)
    with pytest.raises(ValueError, match="weights_only=True"):
        load_official(path)
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a torch checkpoint"):
        load_official(tmp_path / "junk.pt")
