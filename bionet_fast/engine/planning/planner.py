"""The memory planner: what one training step needs before it runs, and the checkpointing that fits.

`plan_memory(model_or_config, batch_size, image_size, precision, optimizer, budget)` counts the
bytes of a step from the layer shapes: BiONet's own iteration wiring runs on symbolic tensors
(engine/step_model.py), so the count follows what each block of each backend allocates and saves
and what the backward frees. `step_peak_bytes` predicts what `peak_step_memory` measures (one
forward + backward, parameter gradients included, parameters, buffers and input excluded);
`total_bytes` adds parameters, buffers, optimizer state and the batch. With a budget the plan takes
the fastest checkpointing that fits: none, per iteration, then segments from the most groups
(fewest recomputations) down to sqrt(t), then the first and last stages as well.
Not counted: the CUDA context, cuDNN workspaces, allocator rounding and fragmentation; the `auto`
budget (`device_budget`) keeps a margin for them.
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
from dataclasses import dataclass, field
from typing import Optional, Sequence, Union

import torch

from ...models import BiOLinkNet, BiOLinkNetConfig, BiONetConfig
from ...models.recurrence import segment_ranges
from .memory_ops import Platform
from .step_model import ITEMSIZE, Checkpointing, ShapeModel, model_bytes, simulate_step

#: bytes of optimizer state per parameter byte
OPTIMIZER_STATE = {"adam": 2, "adamw": 2, "sgd": 1, "none": 0}
#: the `auto` budget keeps this share of the free memory, and at least AUTO_MARGIN_MIN bytes, back
AUTO_MARGIN_FRACTION = 0.10
AUTO_MARGIN_MIN = 768 << 20

_UNITS = {"": 1, "b": 1, "k": 2**10, "kb": 10**3, "kib": 2**10, "m": 2**20, "mb": 10**6, "mib": 2**20,
          "g": 2**30, "gb": 10**9, "gib": 2**30, "t": 2**40, "tb": 10**12, "tib": 2**40}


def parse_bytes(text: Union[str, int, float]) -> int:
    """'8GiB' (2**30), '8GB' (10**9), '8G' (GiB), '512MiB', '1e9' -> bytes."""
    if isinstance(text, (int, float)):
        return int(text)
    match = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as a memory size; write e.g. 8GiB, 12GB, 500MiB or "
                         "a number of bytes")
    return int(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def device_budget(device: Union[str, torch.device]) -> int:
    """The `auto` budget: the device's free memory less max(10 %, 768 MiB), kept back for what the
    count leaves out (cuDNN workspace, allocator rounding and fragmentation, other processes).
    On the CPU: the available RAM less the same margin."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
    else:
        free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return int(free - max(AUTO_MARGIN_FRACTION * free, AUTO_MARGIN_MIN))


@dataclass
class Alternative:
    """One checkpoint setting the plan weighed."""

    checkpointing: Checkpointing
    label: str
    step_peak_bytes: int
    total_bytes: int
    fits: Optional[bool]


@dataclass
class MemoryPlan:
    """The predicted memory of one training step and the checkpointing it assumes.

    Bytes by part: `parameters`, `buffers`, `optimizer_state`, `input` (image + target batch),
    `gradients` (parameter gradients live at the step's peak), `activations` (kept for backward
    at the end of the forward) and `transient` (the rest of the step's peak: the largest block's
    backward scratch, gradients of activations in flight, recomputed segments).
    """

    backend: str
    precision: str
    batch_size: int
    image_size: tuple[int, int]
    iterations: int
    checkpointing: Checkpointing
    choice: str
    step_peak_bytes: int
    total_bytes: int
    parts: dict[str, int]
    budget: Optional[int] = None
    fits: Optional[bool] = None
    alternatives: list[Alternative] = field(default_factory=list)

    def apply(self, model: torch.nn.Module) -> torch.nn.Module:
        """Set the plan's checkpointing on `model` (config.checkpoint_iters / _segments / _stages)."""
        cfg = model.config
        cfg.checkpoint_iters = self.checkpointing.iters
        cfg.checkpoint_segments = self.checkpointing.segments
        if hasattr(cfg, "checkpoint_stages"):
            cfg.checkpoint_stages = self.checkpointing.stages
        return model

    def describe(self) -> str:
        """A human-readable report: bytes by part, the choice, the alternatives."""
        h, w = self.image_size
        lines = [f"memory plan: t={self.iterations} batch {self.batch_size} {h}x{w} {self.precision} "
                 f"backend {self.backend}, checkpointing {self.choice}"]
        for name, n in self.parts.items():
            lines.append(f"  {name:<16} {format_bytes(n):>12}")
        lines.append(f"  {'step peak':<16} {format_bytes(self.step_peak_bytes):>12}  (what peak_step_memory measures)")
        lines.append(f"  {'total':<16} {format_bytes(self.total_bytes):>12}")
        if self.budget is not None:
            lines.append(f"  budget {format_bytes(self.budget)}: {'fits' if self.fits else 'does NOT fit'}")
        if self.alternatives:
            lines.append("  alternatives (fastest first):")
            for a in self.alternatives:
                mark = "" if a.fits is None else ("  fits" if a.fits else "  too big")
                lines.append(f"    {a.label:<22} total {format_bytes(a.total_bytes):>12}{mark}")
        return "\n".join(lines)


def _as_model(model_or_config):
    if isinstance(model_or_config, torch.nn.Module):
        return model_or_config
    if isinstance(model_or_config, BiONetConfig):
        return ShapeModel(model_or_config)
    if isinstance(model_or_config, BiOLinkNetConfig):
        with torch.device("meta"):  # shapes only
            return BiOLinkNet.from_config(model_or_config)
    raise TypeError(f"plan_memory takes a BiONet or BiOLinkNet or their config; got "
                    f"{type(model_or_config).__name__} (others: measure with bionet_fast.peak_step_memory)")


def _size(image_size: Union[int, Sequence[int]], multiple: int) -> tuple[int, int]:
    h, w = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    for name, s in (("height", h), ("width", w)):
        if s <= 0 or s % multiple:
            raise ValueError(f"image {name} {s} is not a positive multiple of 2**(depth+1) = {multiple}; "
                             f"plan for the crop size you train on (e.g. {max(multiple, s // multiple * multiple)})")
    return int(h), int(w)


def _backends(model, backend: Optional[str]) -> list[str]:
    if isinstance(model.config, BiOLinkNetConfig):
        return ["reference"]  # BiO-LinkNet has no fused path
    choice = (backend or os.environ.get("BIONET_FAST_BACKEND", "").strip().lower()
              or model.config.backend)
    if choice not in ("auto", "reference", "triton"):
        raise ValueError(f"backend={choice!r}; use auto, reference or triton")
    return ["reference", "triton"] if choice == "auto" else [choice]  # auto: plan for the larger


def candidates(t: int) -> list[Checkpointing]:
    """Checkpoint settings, fastest first: none, per iteration, k segments for k = t-1 down to
    ceil(sqrt(t)) (one per distinct group size), then sqrt(t) segments with the stages too."""
    out = [Checkpointing(), Checkpointing(True, t)]
    low = math.ceil(math.sqrt(t))
    seen = {t}
    for size in range(2, t + 1):
        k = math.ceil(t / size)
        if k < low:
            break
        groups = len(segment_ranges(t, k))
        if groups not in seen:
            seen.add(groups)
            out.append(Checkpointing(True, k))
    out.append(Checkpointing(True, low, True))
    return out


class Planner:
    """Plans for one model (or config) at a batch size, image size, precision and optimizer."""

    def __init__(self, model_or_config, image_size, precision: str = "fp32", optimizer: str = "adam",
                 backend: Optional[str] = None, platform: Optional[Platform] = None):
        if precision not in ITEMSIZE:
            raise ValueError(f"precision={precision!r}; use one of {', '.join(ITEMSIZE)}")
        if optimizer not in OPTIMIZER_STATE:
            raise ValueError(f"optimizer={optimizer!r}; use one of {', '.join(OPTIMIZER_STATE)}")
        self.model = _as_model(model_or_config)
        cfg = self.model.config
        self.size = _size(image_size, cfg.size_multiple)
        self.precision, self.optimizer, self.platform = precision, optimizer, platform
        self.backends = _backends(self.model, backend)
        self.param_bytes, self.buffer_bytes = model_bytes(self.model)

    def _fixed(self, batch: int) -> dict[str, int]:
        cfg, (h, w) = self.model.config, self.size
        return {"parameters": self.param_bytes, "buffers": self.buffer_bytes,
                "optimizer state": OPTIMIZER_STATE[self.optimizer] * self.param_bytes,
                "input": batch * (cfg.in_channels + cfg.classes) * h * w * 4}

    def count(self, batch: int, ck: Checkpointing):
        """(backend, StepCount) of the backend that needs the most."""
        runs = [(b, simulate_step(self.model, batch, self.size, self.precision, b, ck, self.platform))
                for b in self.backends]
        return max(runs, key=lambda r: r[1].peak)

    def total(self, batch: int, ck: Checkpointing) -> int:
        return self.count(batch, ck)[1].peak + sum(self._fixed(batch).values())

    def plan(self, batch: int, budget: Optional[int] = None) -> MemoryPlan:
        """The plan at the model's own checkpointing, or with a budget the fastest that fits
        (the least memory when none does, with fits=False)."""
        t = self.model.config.iterations
        fixed = sum(self._fixed(batch).values())
        if budget is None:
            return self._plan(batch, Checkpointing.of(self.model.config), None, [])
        alts: list[Alternative] = []
        for ck in candidates(t):
            peak = self.count(batch, ck)[1].peak
            alts.append(Alternative(ck, ck.label(t), peak, peak + fixed, peak + fixed <= budget))
            if alts[-1].fits:
                break
        best = next((a for a in alts if a.fits), min(alts, key=lambda a: a.total_bytes))
        return self._plan(batch, best.checkpointing, budget, alts)

    def _plan(self, batch: int, ck: Checkpointing, budget: Optional[int], alts) -> MemoryPlan:
        backend, step = self.count(batch, ck)
        parts = self._fixed(batch)
        parts["gradients"] = step.gradients
        parts["activations"] = min(step.activations, step.peak - step.gradients)
        parts["transient"] = step.peak - parts["gradients"] - parts["activations"]
        total = sum(parts.values())
        return MemoryPlan(backend, self.precision, batch, self.size, self.model.config.iterations, ck,
                          ck.label(self.model.config.iterations), step.peak, total, parts, budget,
                          None if budget is None else total <= budget, alts)

    def largest_batch(self, budget: int, ck: Checkpointing, limit: int = 1024) -> int:
        """The largest batch whose total fits `budget` with checkpointing `ck` (0: none)."""
        return _largest(lambda b: self.total(b, ck) <= budget, limit)


def _largest(fits, limit: int) -> int:
    """The largest n in 1..limit with fits(n), assuming fits is monotone (0 when fits(1) fails)."""
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def largest_iterations(config, batch: int, image_size, budget: int, precision: str = "fp32",
                       optimizer: str = "adam", checkpoint: bool = True, backend: Optional[str] = None,
                       limit: int = 1024) -> int:
    """The largest t whose step fits `budget` (with the least-memory checkpointing when
    `checkpoint`, none otherwise); 0 when even t=1 does not."""
    def fits(t: int) -> bool:
        cfg = dataclasses.replace(config, iterations=t)
        planner = Planner(cfg, image_size, precision, optimizer, backend)
        ck = candidates(t)[-1] if checkpoint else Checkpointing()
        return planner.total(batch, ck) <= budget

    return _largest(fits, limit)


def plan_memory(model_or_config, batch_size: int, image_size: Union[int, Sequence[int]],
                precision: str = "fp32", optimizer: str = "adam", budget: Union[None, int, str] = None,
                backend: Optional[str] = None) -> MemoryPlan:
    """Predict one training step's memory without running the model.

    model_or_config: a BiONet or BiOLinkNet (its checkpoint settings are planned) or their config.
    batch_size, image_size: the training crops, (B, C, H, W) with H = W = image_size or (H, W).
    precision: "fp32", "bf16" or "fp16" (autocast). optimizer: "adam"/"adamw" (2 states per
    parameter), "sgd" (momentum: 1) or "none". budget: bytes (or "8GiB") for total_bytes; the plan
    then holds the fastest checkpointing that fits (`fits`), and `plan.apply(model)` sets it.
    backend: None = the model's (with "auto" the larger of the reference and fused counts).
    """
    planner = Planner(model_or_config, image_size, precision, optimizer, backend)
    return planner.plan(batch_size, None if budget is None else parse_bytes(budget))


class DoesNotFit(ValueError):
    """No checkpointing fits the budget; the message names the largest t and batch that do."""


def fit_or_explain(planner: Planner, batch: int, budget: int) -> MemoryPlan:
    """The plan for `budget`, or DoesNotFit naming the largest t at this batch and the largest
    batch at this t (both with the least-memory checkpointing)."""
    plan = planner.plan(batch, budget)
    if plan.fits:
        return plan
    cfg = planner.model.config
    t_max = largest_iterations(cfg, batch, planner.size, budget, planner.precision, planner.optimizer,
                               True, planner.backends[0] if len(planner.backends) == 1 else "auto")
    b_max = planner.largest_batch(budget, candidates(cfg.iterations)[-1])
    h, w = planner.size
    raise DoesNotFit(
        f"t={cfg.iterations} at batch {batch} on {h}x{w} ({planner.precision}) needs at least "
        f"{format_bytes(min(a.total_bytes for a in plan.alternatives))} with the most checkpointing, "
        f"over the budget of {format_bytes(budget)}. What fits: "
        f"{f't <= {t_max}' if t_max else 'no t'} at batch {batch}; "
        f"{f'batch <= {b_max}' if b_max else 'no batch'} at t={cfg.iterations}. Lower the iterations, "
        "the batch size or the crop, use mixed precision (bf16), or raise the budget.")


def plan_training(model_config: Union[BiONetConfig, BiOLinkNetConfig], batch_size: Union[int, str], image_size: Optional[int],
                  precision: str, budget: str, device: Union[str, torch.device],
                  optimizer: str = "adam") -> MemoryPlan:
    """The plan `python -m bionet_fast.train --memory-budget` applies: the fastest checkpointing
    that fits `budget` ("8GiB", or "auto": `device_budget(device)`) at `batch_size`, or with
    batch_size="auto" at the largest batch that fits. Raises DoesNotFit (naming what fits) when
    nothing does, ValueError for a size the planner cannot plan."""
    if image_size is None:
        raise ValueError("--memory-budget plans fixed training crops: give --image-size (e.g. 256)")
    limit = device_budget(device) if str(budget).strip().lower() == "auto" else parse_bytes(budget)
    device = torch.device(device)
    platform = (Platform(sms=torch.cuda.get_device_properties(device).multi_processor_count)
                if device.type == "cuda" else None)  # the fused kernels' split plans follow the SMs
    planner = Planner(model_config, image_size, precision, optimizer, platform=platform)
    if batch_size == "auto":
        least = candidates(model_config.iterations)[-1]
        batch_size = max(1, planner.largest_batch(limit, least))  # 0: explained below at batch 1
    return fit_or_explain(planner, int(batch_size), limit)
