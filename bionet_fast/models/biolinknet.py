"""BiO-LinkNet: LinkNet (Chaurasia & Culurciello 2017) with BiO-Net's bi-directional recurrence.

The definition (`shared/reference/biolinknet.md`): the ResNet-18 stem runs once; then, t times over
one set of conv weights, the encoder E1..E4 (ResNet-18 layer1..layer4) reads its level input plus
the previous iteration's decoder feature of that level (added element-wise: the backward skip) and
the decoder D4..D1 adds each level's encoder input back (LinkNet's forward skip); the final block runs
once on the last iteration's output. Every BatchNorm of E1..E4 and D1..D4 belongs to one iteration;
the stem's and the final block's exist once. t=1 is exactly LinkNet (11,533,377 parameters with one
class; 11,456 more per extra iteration).

The blocks are conv -> BN -> ReLU with residual adds, not BiONet's fused concat + conv + ReLU + BN
block, so this model runs on the plain PyTorch path only. The iteration loop and the checkpointing
across iterations are `RecurrentModel`'s, shared with BiONet.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..blocks.reference import batch_norm
from .config import BACKENDS, JsonConfig
from .config_checks import is_number, linknet_resources_error
from .recurrence import RecurrentModel, ckpt

ENCODER = (64, 128, 256, 512)  # channels of E1..E4 (ResNet-18 layer1..layer4)


@dataclass
class BiOLinkNetConfig(JsonConfig):
    """Architecture (``iterations`` = t) and execution options (``checkpoint_*``, ``backend``) of a
    BiO-LinkNet. The encoder is ResNet-18, so there is no width or depth to choose."""

    in_channels: int = 3
    classes: int = 1
    iterations: int = 3
    bn_momentum: float = 0.1
    bn_eps: float = 1e-5
    checkpoint_iters: bool = False
    checkpoint_segments: Optional[int] = None
    checkpoint_stages: bool = False
    backend: str = "auto"

    size_multiple = 32  # stem /4, E2..E4 /8: input sides must be multiples of 32

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the bad field and a valid choice."""
        def bad(msg: str) -> None:
            raise ValueError(f"invalid BiOLinkNetConfig: {msg}")

        for name in ("in_channels", "classes", "iterations"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                bad(f"{name}={value!r}; it must be an integer >= 1")
        msg = linknet_resources_error(self.in_channels, self.classes, self.iterations)
        if msg:
            bad(msg)
        if self.bn_momentum is not None and not (is_number(self.bn_momentum) and 0.0 <= self.bn_momentum <= 1.0):
            bad(f"bn_momentum={self.bn_momentum}; it must lie in [0, 1] (PyTorch convention; 0.1 as torchvision)")
        if not (isinstance(self.bn_eps, (int, float)) and self.bn_eps > 0):
            bad(f"bn_eps={self.bn_eps!r}; use a small positive number such as 1e-5")
        if self.checkpoint_segments is not None and not (
                isinstance(self.checkpoint_segments, int) and self.checkpoint_segments >= 1):
            bad(f"checkpoint_segments={self.checkpoint_segments!r}; use an integer >= 1 or None (automatic)")
        if self.backend not in BACKENDS:
            bad(f"backend={self.backend!r}; choose one of {', '.join(BACKENDS)}")
        if self.backend == "triton":
            bad("backend='triton': the fused Triton kernels implement BiONet's concat + conv + ReLU + BN "
                "block only; BiO-LinkNet (conv -> BN -> ReLU with residual adds) runs on the PyTorch "
                "path: use backend='auto' or 'reference'")

    _UNKNOWN_HINT = " (multiplier, depth, backward_skips and integrate are BiONet options)"


def _conv(cin: int, cout: int, k: int, stride: int = 1, bias: bool = False) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2, bias=bias)


def _deconv(cin: int, cout: int, k: int, stride: int, bias: bool = False) -> nn.ConvTranspose2d:
    """Transposed conv that multiplies the size by exactly `stride` (k=3: padding 1, output_padding
    stride-1; k=2: stride 2, no padding)."""
    pad, extra = (1, stride - 1) if k == 3 else (0, 0)
    return nn.ConvTranspose2d(cin, cout, k, stride=stride, padding=pad, output_padding=extra, bias=bias)


class _BasicConvs(nn.Module):
    """The shared conv weights of one ResNet BasicBlock (its BatchNorms are per iteration)."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = _conv(cin, cout, 3, stride)
        self.conv2 = _conv(cout, cout, 3)
        self.downsample = _conv(cin, cout, 1, stride) if stride != 1 or cin != cout else None


class _DecoderConvs(nn.Module):
    """LinkNet decoder D(m -> n): 1x1 conv m -> m/4, 3x3 transposed conv (stride 2; 1 for D1), 1x1 m/4 -> n."""

    def __init__(self, m: int, n: int, stride: int):
        super().__init__()
        self.conv1 = _conv(m, m // 4, 1)
        self.deconv = _deconv(m // 4, m // 4, 3, stride)
        self.conv2 = _conv(m // 4, n, 1)


class _Norms(nn.Module):
    """The BatchNorms of one iteration: encoders[k][b] = [bn1, bn2(, downsample)] for E(k+1)'s block b,
    decoders[k] = [bn1, bn2, bn3] for D(k+1)."""

    def __init__(self, cfg: BiOLinkNetConfig):
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)  # noqa: E731
        cins = (64,) + ENCODER[:-1]
        self.encoders = nn.ModuleList(
            nn.ModuleList([nn.ModuleList([bn(c), bn(c)] + ([bn(c)] if k and b == 0 else [])) for b in range(2)])
            for k, c in enumerate(ENCODER))
        self.decoders = nn.ModuleList(nn.ModuleList([bn(c // 4), bn(c // 4), bn(n)])
                                      for c, n in zip(ENCODER, cins))


class BiOLinkNet(RecurrentModel):
    """BiO-LinkNet. `forward(x)` maps (B, in_channels, H, W) to logits (B, classes, H, W); H and W must
    be multiples of 32. `encoder_weights`: a local ResNet-18 state_dict file (.pth/.pt or .safetensors,
    torchvision / timm key names) copied into the stem and E1..E4 (each BatchNorm into every iteration)."""

    architecture = "biolinknet"
    config_class = BiOLinkNetConfig

    def __init__(self, in_channels: int = 3, classes: int = 1, iterations: int = 3, bn_momentum: float = 0.1,
                 encoder_weights: Optional[str | Path] = None, checkpoint_iters: bool = False,
                 checkpoint_segments: Optional[int] = None, *, bn_eps: float = 1e-5,
                 checkpoint_stages: bool = False, backend: str = "auto"):
        super().__init__()
        cfg = BiOLinkNetConfig(in_channels, classes, iterations, bn_momentum, bn_eps, checkpoint_iters,
                               checkpoint_segments, checkpoint_stages, backend)
        self.config = cfg
        bn = lambda c: nn.BatchNorm2d(c, eps=cfg.bn_eps, momentum=cfg.bn_momentum)  # noqa: E731
        self.stem = _conv(in_channels, 64, 7, stride=2)
        self.stem_norm = bn(64)
        cins = (64,) + ENCODER[:-1]
        self.encoders = nn.ModuleList(
            nn.ModuleList([_BasicConvs(cin, c, 2 if k else 1), _BasicConvs(c, c, 1)])
            for k, (cin, c) in enumerate(zip(cins, ENCODER)))
        self.decoders = nn.ModuleList(_DecoderConvs(c, n, 2 if k else 1)
                                      for k, (c, n) in enumerate(zip(ENCODER, cins)))
        self.norms = nn.ModuleList(_Norms(cfg) for _ in range(iterations))
        self.final = nn.ModuleList([_deconv(64, 32, 3, 2, bias=True), _conv(32, 32, 3, bias=True),
                                    _deconv(32, classes, 2, 2, bias=True)])
        self.final_norms = nn.ModuleList([bn(32), bn(32)])
        self.reset_parameters()
        if encoder_weights is not None:
            load_resnet18_encoder(self, encoder_weights)

    @classmethod
    def from_config(cls, config: BiOLinkNetConfig) -> "BiOLinkNet":
        return cls(**config.to_dict())

    def reset_parameters(self) -> None:
        """torchvision's ResNet init: He normal (fan_out) conv kernels, BatchNorm 1 / 0, zero biases."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    @property
    def size_multiple(self) -> int:
        return self.config.size_multiple

    def resolved_backend(self, device: torch.device) -> str:
        """Always "reference": no fused kernels exist for LinkNet's blocks. BIONET_FAST_BACKEND=triton
        is BiONet's switch and is ignored here; backend="triton" is refused by the config."""
        return "reference"

    # --- input checks -----------------------------------------------------------------------
    def _size_rule(self) -> str:
        return f"not a multiple of {self.config.size_multiple} (BiO-LinkNet downsamples 5 times)"

    # --- forward ----------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, in_channels, H, W) -> logits (B, classes, H, W)."""
        self.check_input(x)
        stages = self._checkpointing() and self.config.checkpoint_stages
        x0 = ckpt(None, self._stem, x) if stages else self._stem(x)
        (s,) = self._recurrence(None, x0)
        return ckpt(None, self._final, s) if stages else self._final(s)

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        """ResNet-18 stem: 7x7 conv stride 2, BN, ReLU, 3x3 max-pool stride 2: -> (B, 64, H/4, W/4)."""
        h = F.relu(batch_norm(self.stem(x), self.stem_norm))
        return F.max_pool2d(h, 3, stride=2, padding=1)

    def _final(self, s: torch.Tensor) -> torch.Tensor:
        """Final block: (B, 64, H/4, W/4) -> deconv x2 -> conv -> 2x2 deconv x2 -> (B, classes, H, W)."""
        h = F.relu(batch_norm(self.final[0](s), self.final_norms[0]))
        h = F.relu(batch_norm(self.final[1](h), self.final_norms[1]))
        return self.final[2](h)

    def _basic_block(self, convs: _BasicConvs, norms: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(batch_norm(convs.conv1(x), norms[0]))
        h = batch_norm(convs.conv2(h), norms[1])
        identity = x if convs.downsample is None else batch_norm(convs.downsample(x), norms[2])
        return F.relu(h + identity)

    def _decoder(self, convs: _DecoderConvs, norms: nn.ModuleList, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(batch_norm(convs.conv1(x), norms[0]))
        h = F.relu(batch_norm(convs.deconv(h), norms[1]))
        return F.relu(batch_norm(convs.conv2(h), norms[2]))

    def _iteration(self, ops, i: int, x0: torch.Tensor, backs: Optional[list]):
        """One pass of encoder and decoder. x0: stem output (B, 64, H/4, W/4); backs: the previous
        iteration's decoder outputs b_1..b_4, b_k shaped like E_k's input (None in iteration 0).
        Returns (the decoder's output d_1 + u_1 (B, 64, H/4, W/4), or None before the last
        iteration; the new b_1..b_4, or None after the last iteration, where nothing reads them)."""
        norms, last = self.norms[i], i == self.config.iterations - 1
        h, inputs = x0, []
        for k, blocks in enumerate(self.encoders):
            u = h if backs is None else h + backs[k]  # backward skip, added
            inputs.append(u)
            h = u
            for b, convs in enumerate(blocks):
                h = self._basic_block(convs, norms.encoders[k][b], h)
        new_backs: list = [None] * len(self.decoders)
        for k in range(len(self.decoders) - 1, -1, -1):
            d = self._decoder(self.decoders[k], norms.decoders[k], h)
            new_backs[k] = d
            h = d + inputs[k]  # forward skip (LinkNet's rule)
        return (h if last else None), (None if last else new_backs)


# --- ImageNet ResNet-18 encoder weights from a local file --------------------------------------
_BN_FIELDS = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def resnet18_key_map(iterations: int) -> dict[str, list[str]]:
    """torchvision / timm resnet18 state_dict key -> the BiOLinkNet keys it fills (a BatchNorm of
    E1..E4 fills one key per iteration). fc.* has no counterpart."""
    out = {"conv1.weight": ["stem.weight"], **{f"bn1.{f}": [f"stem_norm.{f}"] for f in _BN_FIELDS}}
    for k in range(4):
        for b in range(2):
            src = f"layer{k + 1}.{b}"
            for conv in ("conv1", "conv2"):
                out[f"{src}.{conv}.weight"] = [f"encoders.{k}.{b}.{conv}.weight"]
            norms = [("bn1", 0), ("bn2", 1)]
            if k and b == 0:
                out[f"{src}.downsample.0.weight"] = [f"encoders.{k}.0.downsample.weight"]
                norms.append(("downsample.1", 2))
            for name, j in norms:
                for f in _BN_FIELDS:
                    out[f"{src}.{name}.{f}"] = [f"norms.{i}.encoders.{k}.{b}.{j}.{f}" for i in range(iterations)]
    return out


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .safetensors file or a .pth/.pt/.bin state_dict (torch.load(weights_only=True):
    nothing is unpickled but tensors and containers)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder_weights={str(path)!r}: no such file; pass a local ResNet-18 "
                                "state_dict (.pth/.pt or .safetensors; nothing is downloaded)")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise ValueError(f"encoder_weights={str(path)!r}: unknown file type {path.suffix!r}; use a "
                         ".pth/.pt state_dict or a .safetensors file")
    data = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):  # training checkpoints
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ValueError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    return data


def load_resnet18_encoder(model: BiOLinkNet, path: str | Path) -> None:
    """Copy a ResNet-18 state_dict into the stem and E1..E4 of `model` (every BatchNorm into every
    iteration's copy; fc.* ignored). ValueError naming missing, unknown and misshapen keys."""
    state = read_state_dict(path)
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel / DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    mapping = resnet18_key_map(model.config.iterations)
    own = model.state_dict()
    optional = {k for k in mapping if k.endswith("num_batches_tracked")}  # older files lack them
    missing = sorted(set(mapping) - set(state) - optional)
    unknown = sorted(k for k in state if k not in mapping and not k.startswith("fc."))
    shapes = [f"{k}: file {tuple(v.shape)} vs model {tuple(own[mapping[k][0]].shape)}"
              for k, v in state.items() if k in mapping and v.shape != own[mapping[k][0]].shape]
    if missing or unknown or shapes:
        hint = (f" (the stem takes 3-channel images; this model has in_channels={model.config.in_channels})"
                if any(s.startswith("conv1.weight") for s in shapes) else "")
        raise ValueError(f"{path} is not a ResNet-18 state_dict this BiOLinkNet can take{hint}: "
                         + "; ".join(f"{title} ({len(items)}): {', '.join(items[:8])}"
                                     + (" ..." if len(items) > 8 else "")
                                     for title, items in (("missing keys", missing), ("unknown keys", unknown),
                                                          ("shape mismatches", shapes)) if items)
                         + ". Pass torchvision's or timm's resnet18 weights (keys conv1.*, bn1.*, layer1..4.*).")
    with torch.no_grad():
        for key, value in state.items():
            for target in mapping.get(key, ()):
                own[target].copy_(value)
