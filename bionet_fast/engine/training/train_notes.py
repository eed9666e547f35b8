"""Training's otherwise silent cases, said out loud (issue 24, item 10): a --grad-accum-steps that
the whole run never completes (no optimizer step at all, as --lr 0 but without its warning), and a
resume with another --grad-accum-steps while the saved state holds an unfinished cycle."""
from __future__ import annotations

from typing import Optional


def accumulation_warning(accum: int, steps: int, epochs: int) -> Optional[str]:
    """The warning for cycles the run never finishes (None when every batch is applied)."""
    total = steps * epochs
    if accum <= 1:
        return None
    if accum > total:
        return (f"warning: --grad-accum-steps {accum} is more than the {total} batches of the whole run "
                f"(--steps {steps} x --epochs {epochs}): no optimizer step is taken and the weights will not "
                f"change (only the BatchNorm statistics will); use --grad-accum-steps {total} or less")
    if total % accum:
        return (f"note: the run's {total} batches end {total % accum} batch(es) into an accumulation cycle of "
                f"{accum}: those gradients are never applied (a --resume with more --epochs continues the cycle)")
    return None


def changed_accumulation_note(old: int, new: int, global_step: int) -> Optional[str]:
    """The note when a resume changes --grad-accum-steps with an unfinished cycle in the state
    (its gradients are dropped: they were scaled for cycles of `old` batches)."""
    held = global_step % old
    if old == new or held == 0:
        return None
    return (f"note: --grad-accum-steps {old} -> {new} on resume: the state held the gradients of {held} batch(es) "
            f"of an unfinished cycle of {old}; they are dropped (scaled for {old} batches); cycles of {new} "
            f"restart from global step {global_step}" + ("" if global_step % new == 0 else
            f" (the first ends at the next multiple of {new}, so it is shorter)"))
