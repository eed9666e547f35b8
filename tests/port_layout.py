"""A stand-in for the official PyTorch port, written from `official-format.md`: the same module
names, the same Sequential indices, conv weights shared across iterations by reusing the modules,
one middle block (so its BatchNorms are shared), and the trailing sigmoid.

Tests use it to write checkpoints in the port's layout and to compute the port's outputs.
"""
from __future__ import annotations

import torch
from torch import nn


def _conv(cin, cout, k=3):
    return nn.Conv2d(cin, cout, k, padding=k // 2)


def _deconv(c):
    return nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1)


def _bn(c):
    return nn.BatchNorm2d(c, momentum=0.01)


class PortNet(nn.Module):
    def __init__(self, classes=1, iterations=2, multiplier=1.0, num_layers=4, integrate=False):
        super().__init__()
        self.t, self.L, self.integrate = iterations, num_layers, integrate
        f = [int(32 * 2**i * multiplier) for i in range(num_layers + 1)]
        self.pre_transform_conv_block = nn.Sequential(
            _conv(3, f[0]), nn.ReLU(), _bn(f[0]), _conv(f[0], f[0]), nn.ReLU(), _bn(f[0]),
            _conv(f[0], f[0]), nn.ReLU(), _bn(f[0]), nn.MaxPool2d(2))
        enc = [(_conv(2 * f[l], f[l]), _conv(f[l], f[l]), _conv(f[l], f[l + 1])) for l in range(num_layers)]
        dec = [(_conv(f[num_layers - k] + f[num_layers - 1 - k], f[num_layers - 1 - k]),
                _conv(f[num_layers - 1 - k], f[num_layers - 1 - k]), _deconv(f[num_layers - 1 - k]))
               for k in range(num_layers)]
        for i in range(iterations):
            for l in range(num_layers):
                a, b, c = enc[l]
                setattr(self, f"iteration{i}_layer{l}_encoder_convs",
                        nn.Sequential(a, nn.ReLU(), _bn(f[l]), b, nn.ReLU(), _bn(f[l])))
                setattr(self, f"iteration{i}_layer{l}_encoder_down",
                        nn.Sequential(c, nn.ReLU(), _bn(f[l + 1]), nn.MaxPool2d(2)))
                a, b, c = dec[l]
                ch = f[num_layers - 1 - l]
                setattr(self, f"iteration{i}_layer{l}_decoder_convs",
                        nn.Sequential(a, nn.ReLU(), _bn(ch), b, nn.ReLU(), _bn(ch)))
                setattr(self, f"iteration{i}_layer{l}_decoder_up", nn.Sequential(c, nn.ReLU(), _bn(ch)))
        self.middles = nn.Sequential(
            _conv(f[-1], f[-1]), nn.ReLU(), _bn(f[-1]), _conv(f[-1], f[-1]), nn.ReLU(), _bn(f[-1]),
            _deconv(f[-1]), nn.ReLU(), _bn(f[-1]))
        self.post_transform_conv_block = nn.Sequential(
            _conv(f[0] * (iterations if integrate else 1), f[0]), nn.ReLU(), _bn(f[0]),
            _conv(f[0], f[0]), nn.ReLU(), _bn(f[0]), _conv(f[0], classes, 1), nn.Sigmoid())

    def forward(self, x):
        L = self.L
        dec = [None] * L
        outs = []
        x = self.pre_transform_conv_block(x)
        for i in range(self.t):
            h, enc = x, [None] * L
            for l in range(L):
                back = h if dec[L - 1 - l] is None else dec[L - 1 - l]
                h = getattr(self, f"iteration{i}_layer{l}_encoder_convs")(torch.cat([h, back], 1))
                enc[l] = h
                h = getattr(self, f"iteration{i}_layer{l}_encoder_down")(h)
            h = self.middles(h)
            for k in range(L):
                h = getattr(self, f"iteration{i}_layer{k}_decoder_convs")(torch.cat([h, enc[L - 1 - k]], 1))
                dec[k] = h
                h = getattr(self, f"iteration{i}_layer{k}_decoder_up")(h)
            outs.append(h)
        return self.post_transform_conv_block(torch.cat(outs, 1) if self.integrate else outs[-1])


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm parameters and running statistics, so a wrong mapping shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.weight.copy_(torch.rand(n, generator=g) * 1.5 + 0.25)
                m.bias.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(n, generator=g) * 0.2)
                m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
    return model
