"""Import checkpoints of the official BiO-Net PyTorch port.

The port saves `{'state_dict': model.state_dict()}` with one `Sequential` per block and per iteration
(`official-format.md`); its shared convs appear under every iteration's names, and its middle block's
three BatchNorms are shared by all iterations. bionet_fast keeps each conv once and gives every
iteration its own BatchNorms, so the middle BatchNorms are copied into every iteration.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Mapping

import torch

from .config import BiONetConfig
from .pretrained import load_state
from .bionet import BiONet

_BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
_CONV = ("weight", "bias")
_ITER_KEY = re.compile(r"^iteration(\d+)_layer(\d+)_(encoder_convs|encoder_down|decoder_convs|decoder_up)\.")


def _read(source: str | Path | Mapping[str, Any]) -> dict[str, torch.Tensor]:
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"official checkpoint {path} not found; pass the path of the port's "
                                    "'iter_{t}_mul_{n}[_int]_best_weights.pt' file or its loaded dict")
        try:
            source = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # not a torch file, or one that needs unpickling code
            raise ValueError(f"{path} is not a torch checkpoint loadable with weights_only=True: {err}") from err
    if not isinstance(source, Mapping):
        raise ValueError(f"expected a state_dict mapping, got {type(source).__name__}")
    state = source.get("state_dict", source)
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError("the checkpoint holds no state_dict of tensors (expected {'state_dict': {...}})")
    return {k.removeprefix("module."): v for k, v in state.items()}  # DataParallel prefixes


def infer_config(state: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Iterations, multiplier, depth, integrate, classes, backward_skips read off the tensor shapes."""
    try:
        stem = state["pre_transform_conv_block.0.weight"]
        post = state["post_transform_conv_block.0.weight"]
        out = state["post_transform_conv_block.6.weight"]
    except KeyError as err:
        raise ValueError(f"not a checkpoint of the official BiO-Net port: missing key {err.args[0]!r} "
                         f"(found keys such as {sorted(state)[:5]})") from None
    found = [_ITER_KEY.match(k) for k in state]
    pairs = {(int(m.group(1)), int(m.group(2))) for m in found if m}
    if not pairs:
        raise ValueError("not a checkpoint of the official BiO-Net port: no "
                         "'iteration{i}_layer{l}_encoder_convs' keys")
    t = 1 + max(i for i, _ in pairs)
    depth = 1 + max(l for _, l in pairs)
    c0 = stem.shape[0]
    cfg = BiONetConfig(in_channels=stem.shape[1], classes=out.shape[0], iterations=t,
                       multiplier=c0 / 32, depth=depth, integrate=t > 1 and post.shape[1] == t * c0)
    skips = sum(state[f"iteration0_layer{l}_encoder_convs.0.weight"].shape[1] == 2 * cfg.channels[l]
                for l in range(depth) if f"iteration0_layer{l}_encoder_convs.0.weight" in state)
    cfg.backward_skips = None if skips == depth else skips
    return {k: getattr(cfg, k) for k in ("in_channels", "classes", "iterations", "multiplier", "depth",
                                         "integrate", "backward_skips")}


def key_map(config: BiONetConfig) -> dict[str, str]:
    """bionet_fast state_dict key -> the port's key (for the port's first occurrence of shared convs)."""
    L, m = config.depth, {}

    def conv(ours: str, theirs: str, fields=_CONV) -> None:
        m.update({f"{ours}.{f}": f"{theirs}.{f}" for f in fields})

    bn = lambda ours, theirs: conv(ours, theirs, _BN)  # noqa: E731
    for k, idx in enumerate((0, 3, 6)):
        conv(f"stem.{k}", f"pre_transform_conv_block.{idx}")
        bn(f"stem_norms.{k}", f"pre_transform_conv_block.{idx + 2}")
    for l in range(L):
        conv(f"encoders.{l}.conv1", f"iteration0_layer{l}_encoder_convs.0")
        conv(f"encoders.{l}.conv2", f"iteration0_layer{l}_encoder_convs.3")
        conv(f"encoders.{l}.resample", f"iteration0_layer{l}_encoder_down.0")
        k = L - 1 - l  # the port numbers decoder steps from the deepest
        conv(f"decoders.{l}.conv1", f"iteration0_layer{k}_decoder_convs.0")
        conv(f"decoders.{l}.conv2", f"iteration0_layer{k}_decoder_convs.3")
        conv(f"decoders.{l}.resample", f"iteration0_layer{k}_decoder_up.0")
    for ours, idx in (("conv1", 0), ("conv2", 3), ("resample", 6)):
        conv(f"middle.{ours}", f"middles.{idx}")
    for i in range(config.iterations):
        for l in range(L):
            k = L - 1 - l
            for b, (blk, idx) in enumerate((("encoder_convs", 2), ("encoder_convs", 5), ("encoder_down", 2))):
                bn(f"norms.{i}.enc.{l}.{b}", f"iteration{i}_layer{l}_{blk}.{idx}")
            for b, (blk, idx) in enumerate((("decoder_convs", 2), ("decoder_convs", 5), ("decoder_up", 2))):
                bn(f"norms.{i}.dec.{l}.{b}", f"iteration{i}_layer{k}_{blk}.{idx}")
        for b, idx in enumerate((2, 5, 8)):
            bn(f"norms.{i}.mid.{b}", f"middles.{idx}")  # shared in the port: copied to every iteration
    for k, idx in enumerate((0, 3, 6)):
        conv(f"head.{k}", f"post_transform_conv_block.{idx}")
    for k, idx in enumerate((2, 5)):
        bn(f"head_norms.{k}", f"post_transform_conv_block.{idx}")
    return m


_SHARED = re.compile(r"^iteration0_layer\d+_\w+\.[03]\.(weight|bias)$")


def _check_shared(state: Mapping[str, torch.Tensor], t: int) -> None:
    """The port's shared convs must hold the same values under every iteration's name."""
    for key in filter(_SHARED.match, state):
        for i in range(1, t):
            other = state.get(key.replace("iteration0_", f"iteration{i}_", 1))
            if other is not None and not torch.equal(other, state[key]):
                raise ValueError(f"{key} differs from its copy in iteration {i}: the port shares conv "
                                 "weights across iterations, so this is not a port checkpoint")


def load_official(source: str | Path | Mapping[str, Any], **overrides: Any) -> BiONet:
    """Build a BiONet from a checkpoint of the official PyTorch port.

    source: a path to the port's `.pt` file, or the loaded dict (with or without 'state_dict').
    overrides: BiONet constructor arguments that win over the inferred ones (e.g. backend=...).
    `torch.sigmoid(model(x))` then equals the port's output, in train and in eval mode.
    """
    state = _read(source)
    kwargs = {**infer_config(state), "bn_momentum": 0.01, **overrides}
    model = BiONet(**kwargs)
    mapping = key_map(model.config)
    missing = sorted({theirs for theirs in mapping.values() if theirs not in state})
    known = set(mapping.values()) | {k.replace("iteration0_", f"iteration{i}_", 1)
                                     for k in mapping.values() if k.startswith("iteration0_")
                                     for i in range(model.config.iterations)}
    unexpected = sorted(k for k in state if k not in known and not k.endswith("num_batches_tracked"))
    if missing or unexpected:
        raise ValueError(f"not a checkpoint of the official port for {kwargs}: "
                         f"missing keys {missing[:10]}{' ...' if len(missing) > 10 else ''}; "
                         f"unexpected keys {unexpected[:10]}{' ...' if len(unexpected) > 10 else ''}")
    _check_shared(state, model.config.iterations)
    converted = {k: state[theirs] for k, theirs in mapping.items()}
    load_state(model, converted, source="official checkpoint")
    return model
