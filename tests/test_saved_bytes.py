"""What the fused backend keeps for backward, per recurrent iteration, against the reference
(issue 6: at most 40 %). Counted by bionet_fast.saved_activation_bytes on the CPU (the kernels run in
the interpreter); the ratio does not depend on the image size, so it holds at 512x512."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/ is a folder of the checkout

from bench.saved_bytes import per_iteration  # noqa: E402
from bionet_fast import BiONet, saved_activation_bytes  # noqa: E402


def test_fused_keeps_at_most_40_percent_of_the_reference_per_iteration():
    ref = per_iteration("reference", "fp32", 32, 2, 0.25)
    fused = per_iteration("triton", "fp32", 32, 2, 0.25)
    ratio = (fused[1] - fused[0]) / (ref[1] - ref[0])
    assert ratio <= 0.40, f"fused saves {ratio:.0%} of the reference per iteration ({fused} vs {ref} B)"
    assert fused[1] < 0.5 * ref[1]


def test_saved_activation_bytes_counts_what_autograd_keeps():
    """A conv's backward keeps its input; a second use of the same tensor is not counted twice."""
    conv = torch.nn.Conv2d(2, 3, 3, padding=1)
    x = torch.randn(1, 2, 8, 8)

    class Two(torch.nn.Module):
        def forward(self, x):
            h = torch.relu(x * 2)  # new tensor, kept by the conv (relu keeps it too: one storage)
            return conv(h) + conv(h)

    model = Two()
    model.conv = conv
    assert saved_activation_bytes(model, x) == 2 * 8 * 8 * 4
    m = BiONet(iterations=1, multiplier=0.125, depth=1, backend="reference")
    assert saved_activation_bytes(m, torch.randn(1, 3, 8, 8)) > 0
