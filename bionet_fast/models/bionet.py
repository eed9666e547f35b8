"""BiONet: the O-shaped recurrence over shared conv weights, with per-iteration BatchNorms.

The network (paper Sec. 2.2, `official-format.md`): a first stage of three conv blocks and a 2x2
max-pool; `t` iterations of encoder (forward skips kept, backward skips read from the previous
iteration's decoder), middle and decoder, all reusing one set of conv weights; a last stage of two
conv blocks and a 1x1 conv that returns logits. Every BatchNorm belongs to one block of one iteration.

The blocks are computed by an `Ops` backend (reference PyTorch or fused Triton), so this module holds
only the wiring and the parameters; both backends share the same state_dict.
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.inference_cache import InferenceCache
from ..blocks.reference import RefOps
from .backend_choice import choose_backend, forced_backend
from .config import BiONetConfig
from .recurrence import RecurrentModel, ckpt as _ckpt


def _conv(cin: int, cout: int, k: int = 3, padding_mode: str = "zeros") -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, padding=k // 2, padding_mode=padding_mode if k > 1 else "zeros")


class _EdgeUp(nn.ConvTranspose2d):
    """The UP deconv (3, stride 2, padding 1, output_padding 1) whose last output row/column, which
    zero padding computes from a missing input row/column, reads the edge padded by `mode` instead.
    Same parameters and state_dict keys as nn.ConvTranspose2d; the fused backend's UP reads
    `edge_mode` and does the same (blocks/fused_autograd.up_conv)."""

    def __init__(self, c: int, mode: str):
        super().__init__(c, c, 3, stride=2, padding=1, output_padding=0)
        self.edge_mode = mode

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, C, 2H, 2W)."""
        h, w = x.shape[-2:]
        return super().forward(F.pad(x, (0, 1, 0, 1), mode=self.edge_mode))[..., :2 * h, :2 * w]


def _up(c: int, padding_mode: str = "zeros") -> nn.ConvTranspose2d:
    if padding_mode != "zeros":
        return _EdgeUp(c, padding_mode)
    return nn.ConvTranspose2d(c, c, 3, stride=2, padding=1, output_padding=1)


class _Level(nn.Module):
    """The shared weights of one encoder or decoder level: two convs and the DOWN conv / UP deconv."""

    def __init__(self, cin: int, cmid: int, resample: nn.Module, padding_mode: str = "zeros"):
        super().__init__()
        self.conv1 = _conv(cin, cmid, padding_mode=padding_mode)
        self.conv2 = _conv(cmid, cmid, padding_mode=padding_mode)
        self.resample = resample


class _Norms(nn.Module):
    """The BatchNorms of one iteration: three per encoder level, three in the middle, three per
    decoder level, in block order (conv1, conv2, DOWN/UP)."""

    def __init__(self, cfg: BiONetConfig):
        super().__init__()
        c = cfg.channels
        bn = lambda ch: nn.BatchNorm2d(ch, eps=cfg.bn_eps, momentum=cfg.bn_momentum)  # noqa: E731
        self.enc = nn.ModuleList(nn.ModuleList([bn(c[l]), bn(c[l]), bn(c[l + 1])]) for l in range(cfg.depth))
        self.mid = nn.ModuleList([bn(c[-1]), bn(c[-1]), bn(c[-1])])
        self.dec = nn.ModuleList(nn.ModuleList([bn(c[j]), bn(c[j]), bn(c[j])]) for j in range(cfg.depth))


class BiONet(RecurrentModel):
    """Bi-directional O-shape network (Xiang et al., MICCAI 2020).

    Args mirror `BiONetConfig`. `forward(x)` maps (B, in_channels, H, W) to logits
    (B, classes, H, W); H and W must be multiples of 2**(depth+1).
    """

    architecture = "bionet"
    config_class = BiONetConfig

    def __init__(self, in_channels: int = 3, classes: int = 1, iterations: int = 3,
                 multiplier: float = 1.0, depth: int = 4, backward_skips: Optional[int] = None,
                 integrate: bool = False, bn_momentum: float = 0.01, *, bn_eps: float = 1e-5,
                 checkpoint_iters: bool = False, checkpoint_segments: Optional[int] = None,
                 checkpoint_stages: bool = False, backend: str = "auto", padding_mode: str = "zeros"):
        super().__init__()
        cfg = BiONetConfig(in_channels, classes, iterations, multiplier, depth, backward_skips, integrate,
                           bn_momentum, bn_eps, checkpoint_iters, checkpoint_segments, checkpoint_stages,
                           backend, padding_mode)
        self.config = cfg
        c, pm = cfg.channels, cfg.padding_mode
        bn = lambda ch: nn.BatchNorm2d(ch, eps=cfg.bn_eps, momentum=cfg.bn_momentum)  # noqa: E731
        conv = lambda cin, cout: _conv(cin, cout, padding_mode=pm)  # noqa: E731
        self.stem = nn.ModuleList([conv(in_channels, c[0]), conv(c[0], c[0]), conv(c[0], c[0])])
        self.stem_norms = nn.ModuleList([bn(c[0]) for _ in range(3)])
        self.encoders = nn.ModuleList(
            _Level(c[l] * (2 if cfg.has_backward_skip(l) else 1), c[l], conv(c[l], c[l + 1]), pm)
            for l in range(depth))
        self.middle = _Level(c[-1], c[-1], _up(c[-1], pm), pm)
        self.decoders = nn.ModuleList(_Level(c[j + 1] + c[j], c[j], _up(c[j], pm), pm) for j in range(depth))
        self.norms = nn.ModuleList(_Norms(cfg) for _ in range(iterations))
        self.head = nn.ModuleList([conv(c[0] * (iterations if integrate else 1), c[0]),
                                   conv(c[0], c[0]), _conv(c[0], classes, k=1)])
        self.head_norms = nn.ModuleList([bn(c[0]), bn(c[0])])
        # fused backend, eval without grad: BatchNorm affines and folded weights kept across calls
        self.inference_cache = InferenceCache()
        self.reset_parameters()

    # --- construction helpers ---------------------------------------------------------------
    @classmethod
    def from_config(cls, config: BiONetConfig) -> "BiONet":
        kw = config.to_dict()
        return cls(**kw)

    def reset_parameters(self) -> None:
        """Keras' he_normal for conv kernels (truncated normal, std sqrt(2 / fan_in)), zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                # Keras computes fan_in from its kernel layout: for a transposed conv that is
                # 9 * filters (out channels); for a conv 9 * in channels.
                fan_in = m.weight[0].numel() if isinstance(m, nn.Conv2d) else m.weight.shape[1] * 9
                std = math.sqrt(2.0 / fan_in) / 0.87962566103423978  # truncation at 2 std shrinks the std
                nn.init.trunc_normal_(m.weight, 0.0, std, -2 * std, 2 * std)
                nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> int:
        return self.config.size_multiple

    # --- backend ----------------------------------------------------------------------------
    def resolved_backend(self, device: torch.device, x: Optional[torch.Tensor] = None) -> str:
        """The backend a forward on `device` runs: env BIONET_FAST_BACKEND, else the config;
        "auto" means the reference off CUDA and on CUDA (when triton imports) the faster of the two,
        measured once per setting for input x (models/backend_choice.py; triton without x)."""
        forced = forced_backend()  # a running measurement of backend_choice
        if forced is not None:
            return forced
        choice = os.environ.get("BIONET_FAST_BACKEND", "").strip().lower() or self.config.backend
        if choice not in ("auto", "reference", "triton"):
            raise ValueError(f"BIONET_FAST_BACKEND={choice!r}; use auto, reference or triton")
        if choice == "auto":
            if device.type != "cuda" or not _triton_available():
                return "reference"
            choice = "triton" if x is None else choose_backend(self, x)
        return choice

    def _ops(self, device: torch.device, x: Optional[torch.Tensor] = None):
        if self.resolved_backend(device, x) == "triton":
            from ..blocks.fused import FusedOps  # imported lazily: it needs triton

            inference = not self.training and not torch.is_grad_enabled()
            return FusedOps(self.inference_cache if inference else None)
        return RefOps()

    def train(self, mode: bool = True) -> "BiONet":
        self.inference_cache.clear()
        return super().train(mode)

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .half(): new tensors, drop the old
        self.inference_cache.clear()
        return super()._apply(fn, *args, **kwargs)

    # --- input checks -----------------------------------------------------------------------
    def _size_rule(self) -> str:
        m = self.config.size_multiple
        return f"not divisible by 2**(depth+1) = {m} (depth={self.config.depth})"

    def check_input(self, x: torch.Tensor) -> None:
        """RecurrentModel's checks, and for reflect padding deepest maps of at least 2x2: torch's
        reflect pad (and the fused kernels) refuse to mirror a 1-pixel side, so an input side of
        2**(depth+1) would fail deep inside the forward."""
        super().check_input(x)
        m = self.config.size_multiple
        if self.config.padding_mode == "reflect" and min(x.shape[2:]) < 2 * m:
            raise ValueError(f"input {tuple(x.shape[2:])} is too small for padding_mode='reflect': the deepest "
                             f"map would be 1 pixel wide (side / 2**(depth+1) = side / {m}), and a 1-pixel "
                             f"side has no reflection. Use sides of at least {2 * m} (pad the image, or use "
                             "bionet_fast.sliding_window_inference), or padding_mode='replicate'.")

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> logits (B, classes, H, W). Reflect-padded inputs below
        config.min_side (whose deepest map would be 1 pixel: no reflection) are padded up with
        replicated edges and the output cropped back; `check_input` itself refuses them (an
        exported graph has no such branch)."""
        super().check_input(x)
        h, w = x.shape[-2:]
        side = self.config.min_side
        if h < side or w < side:  # reflect padding: too small to reflect at the deepest level
            ph, pw = max(side - h, 0), max(side - w, 0)  # replicated edges, as tiling pads images
            return self.forward(F.pad(x, (0, pw, 0, ph), mode="replicate"))[..., :h, :w]
        if self.training:  # the kernels update running statistics without bumping _version
            self.inference_cache.clear()
        ops = self._ops(x.device, x)
        stages = self._checkpointing() and self.config.checkpoint_stages
        x0 = _ckpt(ops, self._stem, ops, x) if stages else self._stem(ops, x)
        outs = self._recurrence(ops, x0)
        return _ckpt(ops, self._head, ops, *outs) if stages else self._head(ops, *outs)

    def _stem(self, ops, x: torch.Tensor):
        """First stage: three conv blocks and a 2x2 max-pool: (B, Cin, H, W) -> (B, c0, H/2, W/2)."""
        h = ops.from_dense(x)
        h = ops.block([h], self.stem[0], self.stem_norms[0])
        h = ops.block([h], self.stem[1], self.stem_norms[1])
        return ops.down(h, self.stem[2], self.stem_norms[2])

    def _head(self, ops, *outs) -> torch.Tensor:
        """Last stage: conv block(s) on the last iteration's output (or all of them with INT), 1x1 conv."""
        if len(outs) > 1:  # INT: the iterations' outputs concatenated in iteration order
            outs = (ops.from_dense(torch.cat([ops.dense(o) for o in outs], dim=1)),)
        h = ops.block(list(outs), self.head[0], self.head_norms[0])
        h = ops.block([h], self.head[1], self.head_norms[1])
        return self.head[2](ops.dense(h))

    def _iteration(self, ops, i: int, x0, backs: Optional[list]):
        """One O-shaped pass. x0: first-stage output (B, c0, H/2, W/2); backs: the previous
        iteration's decoder features, level j at (B, c[j], H/2^(j+1), W/2^(j+1)) (None in iteration 0:
        the encoders concatenate their input with itself). Returns (output or None, decoder features
        of the levels with a backward skip, None elsewhere).

        Outputs are unchanged by skipping dead work; the BatchNorms of skipped blocks simply keep
        their initial state and get no gradient (DDP needs find_unused_parameters for them)."""
        cfg, norms = self.config, self.norms[i]
        need_out = cfg.integrate or i == cfg.iterations - 1
        # Without INT a non-final iteration feeds only the backward skips of the next one: decoder
        # levels above the shallowest skip, and its final UP, are dead; with w=0 all of it is.
        lowest = 0 if need_out else cfg.depth - cfg.skips
        if lowest == cfg.depth:
            return None, [None] * cfg.depth
        h, encs = x0, []
        for l, enc in enumerate(self.encoders):
            xs = [h, h if backs is None else backs[l]] if cfg.has_backward_skip(l) else [h]
            e = ops.block(xs, enc.conv1, norms.enc[l][0])
            e = ops.block([e], enc.conv2, norms.enc[l][1])
            encs.append(e)
            h = ops.down(e, enc.resample, norms.enc[l][2])
        h = ops.block([h], self.middle.conv1, norms.mid[0])
        h = ops.block([h], self.middle.conv2, norms.mid[1])
        up = ops.up(h, self.middle.resample, norms.mid[2])
        decs: list = [None] * cfg.depth
        for j in range(cfg.depth - 1, lowest - 1, -1):
            dec, bn = self.decoders[j], norms.dec[j]
            d = ops.block([up, encs[j]], dec.conv1, bn[0])
            d = ops.block([d], dec.conv2, bn[1])
            decs[j] = d if cfg.has_backward_skip(j) else None  # keep alive only what is read
            up = ops.up(d, dec.resample, bn[2]) if j > lowest or need_out else None
        return up, decs


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
