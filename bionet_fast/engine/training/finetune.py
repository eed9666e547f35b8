"""Fine-tuning options of a training run: start from earlier weights (--initial-checkpoint),
accumulate gradients (--grad-accum-steps), clip them (--clip-grad), keep an EMA of the weights
(--model-ema, see `ema`), and the inference block the trainer writes into config.json.

The Trainer holds one `FineTuning` and calls it at fixed points (start of an accumulation cycle,
before the optimizer step, after it), so its own step stays one code path.
"""
from __future__ import annotations

import sys
from typing import Any, Optional

import torch
from torch import nn

from ...models.config import EXECUTION_FIELDS, InferenceInfo
from .ema import ModelEma
from ..prediction.inference import inference_window, load_model

# Fields that may differ between the checkpoint and the run: they do not change the tensors.
# padding_mode is one (the same state dict): an official, zero-padded checkpoint fine-tuned by the
# synthetic recipe pads by reflection (load_initial_weights says so).
_FREE = set(EXECUTION_FIELDS) | {"bn_momentum", "bn_eps", "padding_mode"}


def load_source(path: str) -> nn.Module:
    """The model of --initial-checkpoint: a run folder or save_pretrained folder (any architecture),
    a Hub repo id, or an official port checkpoint (.pt / .pth, through load_official)."""
    model = load_model(path, backend="reference")
    if model is not None:
        return model
    raise FileNotFoundError(f"--initial-checkpoint {path}: not found; pass a training run's --out folder, a "
                            "save_pretrained folder, a Hub repo id (org/name) or an official .pt file")


def architecture_mismatch(source: nn.Module, target: nn.Module) -> list[str]:
    """'field: checkpoint X, run Y' for every architecture field that differs (empty: compatible)."""
    diffs = []
    a, b = getattr(source, "architecture", "bionet"), getattr(target, "architecture", "bionet")
    if a != b:
        return [f"architecture: checkpoint {a}, run {b}"]
    src, dst = source.config.to_dict(), target.config.to_dict()
    for key in sorted(set(src) | set(dst)):
        if key not in _FREE and src.get(key) != dst.get(key):
            diffs.append(f"{key}: checkpoint {src.get(key)!r}, run {dst.get(key)!r}")
    return diffs


def load_initial_weights(model: nn.Module, path: str) -> nn.Module:
    """Copy the weights (and BatchNorm statistics) of `path` into `model`; ValueError naming every
    architecture difference, before any training. Returns the source model (for its info)."""
    source = load_source(path)
    diffs = architecture_mismatch(source, model)
    if diffs:
        flags = {"iterations": "--t", "multiplier": "--multiplier", "depth": "--depth",
                 "backward_skips": "--backward-skips", "integrate": "--integrate",
                 "in_channels": "--in-channels", "classes": "--classes", "architecture": "--arch"}
        fix = ", ".join(sorted({flags.get(d.split(":")[0], "--" + d.split(":")[0].replace("_", "-"))
                                for d in diffs}))
        raise ValueError(f"--initial-checkpoint {path} holds another architecture than this run: "
                         f"{'; '.join(diffs)}. Pass the checkpoint's values ({fix}) to fine-tune it")
    pads = [getattr(m.config, "padding_mode", None) for m in (source, model)]
    if pads[0] != pads[1]:
        print(f"note: --initial-checkpoint {path} pads with {pads[0]}; this run pads with {pads[1]} "
              f"(--padding-mode {pads[0]} keeps the checkpoint's)", file=sys.stderr)
    device = next(model.parameters()).device
    with torch.no_grad():
        model.load_state_dict({k: v.to(device) for k, v in source.state_dict().items()})
    return source


class FineTuning:
    """Gradient accumulation, clipping and the weight EMA of one run (all off by default).

    `cfg` needs: initial_checkpoint, grad_accum_steps, clip_grad, model_ema, model_ema_decay."""

    def __init__(self, cfg: Any, model: nn.Module):
        self.accum = int(getattr(cfg, "grad_accum_steps", 1) or 1)
        self.clip = getattr(cfg, "clip_grad", None)
        if self.accum < 1 or (self.clip is not None and self.clip <= 0):
            raise ValueError(f"--grad-accum-steps {self.accum} must be >= 1 and --clip-grad {self.clip} > 0")
        self.source: Optional[nn.Module] = None
        if getattr(cfg, "initial_checkpoint", None):
            self.source = load_initial_weights(model, cfg.initial_checkpoint)
        self.ema = ModelEma(model, cfg.model_ema_decay) if getattr(cfg, "model_ema", False) else None

    def starts_cycle(self, global_step: int) -> bool:
        """Whether batch `global_step` opens an accumulation cycle (zero the gradients first)."""
        return global_step % self.accum == 0

    def ends_cycle(self, global_step: int) -> bool:
        """Whether the optimizer steps after batch `global_step`."""
        return (global_step + 1) % self.accum == 0

    def loss_scale(self) -> float:
        """The loss of each batch is divided by this: the gradient is the mean over the cycle."""
        return float(self.accum)

    def clip_gradients(self, model: nn.Module, optimizer: torch.optim.Optimizer, scaler) -> Optional[float]:
        """Clip the global gradient norm to --clip-grad (unscaling float16 gradients first);
        returns the norm before clipping, or None when clipping is off."""
        if self.clip is None:
            return None
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(optimizer)
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), self.clip))

    def after_step(self, model: nn.Module) -> None:
        """After an optimizer step: update the EMA of the weights."""
        if self.ema is not None:
            self.ema.update(model)

    def eval_model(self, model: nn.Module) -> nn.Module:
        """The model to validate and save as the best: the EMA's when on."""
        return self.ema.module if self.ema is not None else model


def run_inference_info(cfg: Any, record: Optional[dict] = None, training_data: Optional[str] = None) -> InferenceInfo:
    """The "inference" block of a run's config.json: task, scale, tile size and the validation
    scores of `record` (one metrics.jsonl line)."""
    keep = ("dice", "iou", "dice_per_image", "iou_per_image", "rand_f", "psnr", "psnr_bicubic",
            "val_loss", "epoch")
    metrics = {k: record[k] for k in keep if record and k in record}
    task = getattr(cfg, "task", "segmentation")
    return InferenceInfo(task=task, sr_scale=cfg.sr_scale if task == "super-resolution" else None,
                         tile_size=inference_window(cfg),
                         metrics=metrics, training_data=training_data,
                         mpp=getattr(cfg, "train_mpp", None),
                         target=getattr(cfg, "target", "mask") if task == "segmentation" else "mask")
