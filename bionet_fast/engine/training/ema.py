"""An exponential moving average of the weights (--model-ema), on torch's AveragedModel.

ema = decay * ema + (1 - decay) * weights after every optimizer step (the first update copies the
weights). Buffers (BatchNorm running statistics) are averaged too; the trainer's precise-BN pass
then re-estimates the EMA model's statistics under its own weights before each validation.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from ...utils.files import atomic_write
from ..checkpoint_io import EMA_WEIGHTS


class ModelEma:
    """The EMA copy of `model` (same device); `module` is a model of the same class."""

    def __init__(self, model: nn.Module, decay: float = 0.999):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"--model-ema-decay {decay}: it must lie in (0, 1), e.g. 0.999")
        self.decay = decay
        self.averaged = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)

    @property
    def module(self) -> nn.Module:
        return self.averaged.module

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.averaged.update_parameters(model)

    def save(self, folder: str | Path) -> Path:
        """folder/ema.safetensors (the averaged weights and n_averaged), atomically (resume)."""
        from safetensors.torch import save_file

        state = {k: v.detach().contiguous().cpu() for k, v in self.averaged.state_dict().items()}
        return atomic_write(Path(folder) / EMA_WEIGHTS, lambda tmp: save_file(state, tmp))

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The averaged weights and n_averaged as CPU tensors (saved inside the training state)."""
        return {k: v.detach().contiguous().cpu() for k, v in self.averaged.state_dict().items()}

    def load_tensors(self, state: dict[str, torch.Tensor]) -> None:
        device = next(self.averaged.parameters()).device
        self.averaged.load_state_dict({k: v.to(device) for k, v in state.items()})

    def load(self, folder: str | Path) -> bool:
        """Restore folder/ema.safetensors if present; returns whether it was."""
        path = Path(folder) / EMA_WEIGHTS
        if not path.is_file():
            return False
        device = next(self.averaged.parameters()).device
        self.averaged.load_state_dict({k: v.to(device) for k, v in load_file(str(path)).items()})
        return True
