"""The planner's model of one training step: BiONet's forward (stem, the recurrence with its
checkpointing, head, loss) on symbolic tensors, then its backward (engine/memory_sim.py).

The iterations run the models' own loop (`models.recurrence.run_iterations`) and `_iteration`
wiring with the symbolic blocks of engine/memory_ops.py and the tape's checkpoint.
"""
from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from ...models.recurrence import run_iterations, segment_ranges
from .memory_ops import F32, FusedSim, Platform, RefSim
from .memory_sim import Sym, Tape

ITEMSIZE = {"fp32": 4, "bf16": 2, "fp16": 2}


def _ckpt(tape: Tape, fn, *args):
    leaves, spec = tree_flatten(args)
    return tape.checkpoint(lambda *xs: fn(*tree_unflatten(list(xs), spec)), *leaves)


def _head(model, ops, *outs):
    if isinstance(model, LinkNetWiring):
        return model.head(ops, *outs)
    if len(outs) > 1:  # INT
        outs = (ops.from_dense(RefSim.cat(ops, [ops.dense(o) for o in outs])),)
    h = ops.block(list(outs), model.head[0], model.head_norms[0])
    h = ops.block([h], model.head[1], model.head_norms[1])
    return ops.conv(ops.dense(h), model.head[2])


def _forward(model, ops, tape: Tape, x: Sym, cfg, ck: "Checkpointing") -> Sym:
    run_ckpt, segments = ck.iters, ck.segments
    stages = run_ckpt and ck.stages
    x0 = _ckpt(tape, lambda x: model._stem(ops, x), x) if stages else model._stem(ops, x)
    # the models' own loop (models/recurrence.py), with the tape's checkpoint
    outs = run_iterations(lambda i, x, b: model._iteration(ops, i, x, b), x0, cfg.iterations, segments,
                          run_ckpt, lambda fn, *args: _ckpt(tape, fn, *args))
    del x0
    logits = _ckpt(tape, lambda *o: _head(model, ops, *o), *outs) if stages else _head(model, ops, *outs)
    del outs
    loss = ops.loss(logits)
    ops.end_forward(run_ckpt)
    return loss


@dataclass(frozen=True)
class Checkpointing:
    """A checkpoint setting: off, per iteration (segments = t), k segments, stages on top."""

    iters: bool = False
    segments: Optional[int] = None
    stages: bool = False

    def label(self, t: int) -> str:
        if not self.iters:
            return "none"
        groups = len(segment_ranges(t, self.segments))
        text = "per-iteration" if groups == t else f"segments={groups}"
        return text + ("+stages" if self.stages else "")

    @classmethod
    def of(cls, config) -> "Checkpointing":
        return cls(bool(config.checkpoint_iters), config.checkpoint_segments,
                   bool(getattr(config, "checkpoint_stages", False)))


@dataclass
class StepCount:
    """One simulated step: its peak and what was live at the end of the forward."""

    peak: int
    activations: int
    gradients: int


def simulate_step(model, batch_size: int, image_size: tuple[int, int], precision: str = "fp32",
                  backend: str = "reference", checkpointing: Optional[Checkpointing] = None,
                  platform: Optional[Platform] = None) -> StepCount:
    """Predicted peak_step_memory of `model` on a (B, Cin, H, W) batch, without running it.

    checkpointing: None = the model's own settings. backend: "reference" or "triton".
    """
    if hasattr(model, "final") and hasattr(model, "stem_norm"):  # BiOLinkNet
        model = LinkNetWiring(model)
    elif not hasattr(model, "_iteration") or not hasattr(model, "_stem"):
        raise ValueError(f"the planner models BiO-Net and BiO-LinkNet; not {type(model).__name__}: "
                         "measure it with bionet_fast.peak_step_memory instead")
    cfg = model.config
    ck = checkpointing or Checkpointing.of(cfg)
    tape = Tape()
    cs = ITEMSIZE[precision]
    ops = RefSim(tape, cs) if backend == "reference" else FusedSim(tape, cs, platform or Platform())
    x = Sym((batch_size, cfg.in_channels, *image_size), F32, None)
    gc_was_enabled = gc.isenabled()
    gc.disable()  # the tape makes no reference cycles; the collector would only slow it down
    try:
        loss = _forward(model, ops, tape, x, cfg, ck)
        activations = tape.current
        tape.backward(loss)
        del loss
    finally:
        if gc_was_enabled:
            gc.enable()
    return StepCount(tape.peak, activations, tape.grad_at_peak)


class _Repeat:
    """norms[i] for every i: the iterations' BatchNorms all have the shapes of iteration 0."""

    def __init__(self, item):
        self.item = item

    def __getitem__(self, i: int):
        return self.item


class ShapeModel:
    """BiONet's wiring over the modules of a t=1 model on the meta device, for any t: what the
    planner needs of a config without building t iterations of BatchNorms. Parameter and buffer
    bytes are exact (affine in t, taken from t=1 and t=2 builds)."""

    def __init__(self, config):
        from ...models import BiONet

        self.config = config
        with torch.device("meta"):
            one, two = (BiONet.from_config(dataclasses.replace(config, iterations=t)) for t in (1, 2))
        self.base = one
        self.norms = _Repeat(one.norms[0])
        self.encoders, self.middle, self.decoders = one.encoders, one.middle, one.decoders
        self.stem, self.stem_norms, self.head_norms = one.stem, one.stem_norms, one.head_norms
        c0, t = config.channels[0], config.iterations
        with torch.device("meta"):
            first = nn.Conv2d(c0 * (t if config.integrate else 1), c0, 3, padding=1)
        self.head = [first, one.head[1], one.head[2]]
        sizes = [_bytes(m) for m in (one, two)]
        self.param_bytes = sizes[0][0] + (t - 1) * (sizes[1][0] - sizes[0][0])
        self.buffer_bytes = sizes[0][1] + (t - 1) * (sizes[1][1] - sizes[0][1])

    def _iteration(self, ops, i, x0, backs):
        return type(self.base)._iteration(self, ops, i, x0, backs)

    def _stem(self, ops, x):
        return type(self.base)._stem(self, ops, x)


def _bytes(model) -> tuple[int, int]:
    return (sum(p.numel() * p.element_size() for p in model.parameters()),
            sum(b.numel() * b.element_size() for b in model.buffers()))


def model_bytes(model) -> tuple[int, int]:
    """(parameter bytes, buffer bytes) of a model or a ShapeModel."""
    if isinstance(model, ShapeModel):
        return model.param_bytes, model.buffer_bytes
    return _bytes(model)


class LinkNetWiring:
    """BiOLinkNet's stem, iteration and final block (models/biolinknet.py) on the symbolic ops:
    it calls torch on its modules directly, so the planner mirrors it here."""

    def __init__(self, model):
        self.m, self.config = model, model.config

    def _cbr(self, ops, x, conv, bn, relu: bool = True):
        h = ops.batch_norm(ops.conv(x, conv), bn)
        return ops.relu(h) if relu else h

    def _stem(self, ops, x):
        return ops.max_pool(self._cbr(ops, x, self.m.stem, self.m.stem_norm), stem=True)

    def head(self, ops, s):
        f, n = self.m.final, self.m.final_norms
        return ops.conv(self._cbr(ops, self._cbr(ops, s, f[0], n[0]), f[1], n[1]), f[2])

    def _iteration(self, ops, i: int, x0, backs):
        norms, last = self.m.norms[i], i == self.config.iterations - 1
        h, inputs = x0, []
        for k, blocks in enumerate(self.m.encoders):
            u = h if backs is None else ops.add(h, backs[k])
            inputs.append(u)
            h = u
            for b, convs in enumerate(blocks):
                bn = norms.encoders[k][b]
                y = self._cbr(ops, self._cbr(ops, h, convs.conv1, bn[0]), convs.conv2, bn[1], relu=False)
                identity = h if convs.downsample is None else self._cbr(ops, h, convs.downsample, bn[2], False)
                h = ops.relu(ops.add(y, identity))
        new_backs: list = [None] * len(self.m.decoders)
        for k in range(len(self.m.decoders) - 1, -1, -1):
            dec, bn = self.m.decoders[k], norms.decoders[k]
            d = self._cbr(ops, self._cbr(ops, self._cbr(ops, h, dec.conv1, bn[0]), dec.deconv, bn[1]),
                          dec.conv2, bn[2])
            new_backs[k] = d
            h = ops.add(d, inputs[k])
        return (h if last else None), (None if last else new_backs)
