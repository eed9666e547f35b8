"""Divergence checks of a training run: wherever a blow-up first shows (the loss, the gradients,
the weights, the BatchNorm statistics, the validation outputs), training stops with one error,
:class:`Diverged`, and nothing non-finite is ever saved or called good.

Finite is not enough: an update at a huge learning rate can leave weights that are finite but so
large that the loss is 1e24 and every prediction is one class. A loss or an output magnitude above
:data:`LIMIT` counts as diverged too: a healthy segmentation loss (BCE / cross-entropy) is below
about 10, and logits or super-resolved pixel values of 1e6 mean nothing but a blow-up.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch

LIMIT = 1e6


class Diverged(RuntimeError):
    """Training diverged (a NaN/inf or an absurdly large value appeared): training stops."""


# The former name, kept for callers that catch it.
NonFiniteLoss = Diverged


def check_value(value: float, what: str, where: str) -> None:
    """Raise Diverged if the scalar `value` (a loss) is not finite or exceeds LIMIT."""
    if not math.isfinite(value) or abs(value) > LIMIT:
        raise Diverged(f"the {what} became {value:.4g} {where}")


def bad_tensors(named: Iterable[tuple[str, torch.Tensor]], limit: float = math.inf) -> list[str]:
    """Names of the floating tensors holding a NaN/inf (or a magnitude above `limit`)."""
    bad = []
    for name, t in named:
        if t is None or not t.is_floating_point():
            continue
        if not bool(torch.isfinite(t).all()) or (limit < math.inf and float(t.abs().max()) > limit):
            bad.append(name)
    return bad


def check_tensors(named: Iterable[tuple[str, torch.Tensor]], what: str, where: str) -> None:
    """Raise Diverged naming the (first few) non-finite tensors among `named`."""
    bad = bad_tensors(named)
    if bad:
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise Diverged(f"{len(bad)} {what} became non-finite {where} ({', '.join(bad[:3])}{more})")


def check_model(model: torch.nn.Module, where: str) -> None:
    """Weights and BatchNorm statistics (all parameters and buffers) finite."""
    check_tensors(model.named_parameters(), "weight tensor(s)", where)
    check_tensors(model.named_buffers(), "BatchNorm statistic tensor(s)", where)


def check_grads(model: torch.nn.Module, where: str) -> None:
    check_tensors(((n, p.grad) for n, p in model.named_parameters()), "gradient(s)", where)


def output_guard(model: torch.nn.Module, where: str):
    """A forward hook handle raising Diverged when `model` outputs a NaN/inf or a value above LIMIT
    (validation: the outputs are checked before any metric sees them). Remove it with .remove()."""

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor) and bad_tensors([("output", output.detach())], LIMIT):
            out = output.detach().float()
            value = "NaN" if bool(out.isnan().any()) else f"{float(out.abs().max()):.4g}"
            raise Diverged(f"the model's output became {value} {where}")

    return model.register_forward_hook(hook)
