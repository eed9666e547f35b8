"""Sliding-window inference: exact on pointwise predictors, exact away from window borders for
convolutions, padding for odd sizes, batching independence."""
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from bionet_fast.engine.prediction.tiling import importance_map, pad_to, pad_to_multiple, sliding_window_inference, window_starts


def test_window_starts_cover_and_end_flush():
    assert window_starts(64, 64, 0.25) == [0]
    assert window_starts(100, 32, 0.25) == [0, 24, 48, 68]
    assert window_starts(100, 32, 0.0) == [0, 32, 64, 68]
    for size, roi, ov in [(37, 16, 0.5), (1000, 512, 0.25), (17, 16, 0.9)]:
        starts = window_starts(size, roi, ov)
        covered = torch.zeros(size, dtype=torch.bool)
        for s in starts:
            covered[s:s + roi] = True
        assert covered.all() and starts[-1] == size - roi
    with pytest.raises(ValueError):
        window_starts(10, 16, 0.25)


@settings(max_examples=25, deadline=None)
@given(h=st.integers(1, 70), w=st.integers(1, 70), roi=st.sampled_from([8, 16, 32]),
       overlap=st.sampled_from([0.0, 0.25, 0.5]), mode=st.sampled_from(["gaussian", "constant"]),
       multiple=st.sampled_from([1, 4, 8]), sw=st.integers(1, 5))
def test_identity_predictor_returns_input(h, w, roi, overlap, mode, multiple, sw):
    x = torch.rand(2, 3, h, w)
    seen = []

    def predictor(t):
        seen.append(tuple(t.shape))
        return t

    out = sliding_window_inference(x, roi, sw, predictor, overlap, mode, size_multiple=multiple)
    assert out.shape == x.shape
    torch.testing.assert_close(out, x, rtol=1e-6, atol=1e-6)
    for shape in seen:  # every window is a valid model input
        assert shape[0] <= sw and shape[2] % multiple == 0 and shape[3] % multiple == 0


def test_pointwise_predictor_changes_channels_exactly():
    x = torch.randn(1, 3, 50, 77, dtype=torch.float64)
    conv = torch.nn.Conv2d(3, 2, 1).double()
    with torch.no_grad():
        want = torch.sigmoid(conv(x))
        out = sliding_window_inference(x, 32, 4, lambda t: torch.sigmoid(conv(t)), 0.25, size_multiple=16)
    torch.testing.assert_close(out.double(), want, rtol=1e-6, atol=1e-6)


def test_conv_predictor_equals_full_image_away_from_window_borders():
    torch.manual_seed(0)
    x = torch.randn(1, 2, 45, 61, dtype=torch.float64)
    conv = torch.nn.Conv2d(2, 1, 5, padding=2).double()  # each output reads +-2 pixels
    roi, overlap = 16, 0.5
    with torch.no_grad():
        full = conv(x)
        out = sliding_window_inference(x, roi, 4, conv, overlap, "gaussian", size_multiple=1).double()
    # Pixels that are >= 2 pixels inside EVERY window covering them see the same neighbourhood.
    ys, xs = window_starts(45, roi, overlap), window_starts(61, roi, overlap)
    good = torch.ones(45, 61, dtype=torch.bool)
    for y in ys:
        for x0 in xs:
            inside = torch.zeros(45, 61, dtype=torch.bool)
            inside[y:y + roi, x0:x0 + roi] = True
            interior = torch.zeros(45, 61, dtype=torch.bool)
            interior[max(y + 2, 0):y + roi - 2, x0 + 2:x0 + roi - 2] = True
            # window edges that are also image edges see the same zero padding as the full image
            if y == 0:
                interior[0:2, x0 + 2:x0 + roi - 2] = True
            if y + roi == 45:
                interior[45 - 2:, x0 + 2:x0 + roi - 2] = True
            if x0 == 0:
                interior[y + 2:y + roi - 2, 0:2] = True
            if x0 + roi == 61:
                interior[y + 2:y + roi - 2, 61 - 2:] = True
            good &= ~inside | interior
    assert good.sum() > 0.3 * good.numel()
    torch.testing.assert_close(out[0, 0][good], full[0, 0][good], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out[0, 0][~good], full[0, 0][~good], atol=1e-5)  # the test can fail


def test_conv_model_on_padded_small_image_matches_reflect_padded_full():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 13, 21)
    conv = torch.nn.Conv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        out = sliding_window_inference(x, 64, 4, conv, size_multiple=8)  # one padded 16x24 window
        want = conv(pad_to(x, 16, 24))[..., :13, :21]
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_pad_to_reflects_and_repeats():
    x = torch.arange(3.0).view(1, 1, 1, 3)
    assert pad_to(x, 1, 5).flatten().tolist() == [0, 1, 2, 1, 0]
    long = pad_to(x, 2, 9)  # pad longer than the side: reflection repeated; 1-pixel side replicated
    assert long.shape == (1, 1, 2, 9)
    assert long[0, 0, 0].tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0] and torch.equal(long[0, 0, 0], long[0, 0, 1])
    padded, (h, w) = pad_to_multiple(torch.rand(1, 2, 33, 16), 16)
    assert padded.shape[-2:] == (48, 16) and (h, w) == (33, 16)


def test_batching_is_invisible_and_gaussian_weights():
    torch.manual_seed(2)
    x = torch.rand(3, 1, 40, 40)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    with torch.no_grad():
        a = sliding_window_inference(x, 16, 1, conv, 0.25)
        b = sliding_window_inference(x, 16, 7, conv, 0.25)
        c = torch.cat([sliding_window_inference(x[i:i + 1], 16, 4, conv, 0.25) for i in range(3)])
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    g = importance_map((16, 16))
    assert g.max() == 1 and g.min() > 0 and g[8, 8] > g[0, 0]
    assert torch.equal(importance_map((4, 4), "constant"), torch.ones(4, 4))


def test_bad_arguments():
    x = torch.rand(1, 1, 8, 8)
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(x, 8, 4, lambda t: t, overlap=1.0)
    with pytest.raises(ValueError, match="B, C, H, W"):
        sliding_window_inference(x[0], 8, 4, lambda t: t)
    with pytest.raises(ValueError, match="size_multiple"):
        sliding_window_inference(x, 8, 4, lambda t: t, size_multiple=16)
    with pytest.raises(ValueError, match="mode"):
        sliding_window_inference(x, 8, 4, lambda t: t, mode="median")
    with pytest.raises(ValueError, match="MONAI's argument order"):
        sliding_window_inference(x, 8, lambda t: t, 4)  # the old (inputs, roi, predictor, ...) order
    with pytest.raises(ValueError, match="padding_mode"):
        sliding_window_inference(x, 8, 4, lambda t: t, padding_mode="wrap")


def test_monai_keywords_device_split_and_constant_padding():
    torch.manual_seed(3)
    x = torch.rand(1, 2, 13, 30)
    seen = []

    def predictor(t):
        seen.append(t.device)
        return t * 2

    out = sliding_window_inference(inputs=x, roi_size=(16, 16), sw_batch_size=2, predictor=predictor, overlap=0.5,
                                   mode="constant", sigma_scale=0.125, padding_mode="constant", cval=7.0,
                                   sw_device="cpu", device="cpu")
    torch.testing.assert_close(out, x * 2)
    assert out.device.type == "cpu" and all(d.type == "cpu" for d in seen)
    # constant padding reaches the predictor (a reflect pad would not contain 7s)
    padded_seen = []
    sliding_window_inference(x, 16, 4, lambda t: padded_seen.append(t.clone()) or t, padding_mode="constant", cval=7.0)
    assert (padded_seen[0][..., 13:, :] == 7).all()
