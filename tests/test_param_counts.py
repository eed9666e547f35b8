"""Parameter counts: equal to the official port's layout at t=1, and the paper's table."""
import pytest
from port_layout import PortNet

from bionet_fast import BiONet


def count(m) -> int:
    return sum(p.numel() for p in m.parameters())


# (BiONet kwargs, paper's count in millions (Keras, Table 2)); the Keras model is slightly larger than
# the PyTorch port (within 0.13M), so the paper is checked to that tolerance and the port exactly.
PAPER = [
    (dict(), 15.0), (dict(multiplier=1.25), 23.5), (dict(multiplier=0.75), 8.5),
    (dict(multiplier=0.5), 3.8), (dict(multiplier=0.25), 0.9), (dict(depth=3), 3.8),
    (dict(depth=2), 0.9), (dict(backward_skips=3), 15.0), (dict(backward_skips=2), 14.9),
]


@pytest.mark.parametrize("kwargs, paper", PAPER, ids=[str(k) for k, _ in PAPER])
def test_parameter_count_matches_paper(kwargs, paper):
    assert abs(count(BiONet(iterations=1, **kwargs)) / 1e6 - paper) < 0.13


@pytest.mark.parametrize("kwargs", [dict(), dict(multiplier=0.5), dict(multiplier=1.25), dict(depth=3)])
def test_parameter_count_equals_port_at_t1(kwargs):
    port = PortNet(iterations=1, multiplier=kwargs.get("multiplier", 1.0), num_layers=kwargs.get("depth", 4))
    assert count(BiONet(iterations=1, **kwargs)) == count(port)


def test_x1_count_is_the_ports_14_97m():
    assert abs(count(BiONet(iterations=1)) / 1e6 - 14.97) < 0.05


def test_backward_skips_remove_encoder_input_channels():
    full, w2 = BiONet(iterations=1), BiONet(iterations=1, backward_skips=2)
    # levels 0 and 1 lose their backward skip: conv1 reads c[l] instead of 2*c[l] channels
    assert count(full) - count(w2) == 9 * (32 * 32 + 64 * 64)


def test_iterations_add_only_batchnorm_parameters():
    c = [32, 64, 128, 256, 512]  # each BatchNorm adds weight and bias: 2 * channels
    enc = sum(2 * c[l] + c[l + 1] for l in range(4))
    dec = sum(3 * c[j] for j in range(4))
    per_iteration = 2 * (enc + 3 * c[4] + dec)
    assert count(BiONet(iterations=2)) - count(BiONet(iterations=1)) == per_iteration
