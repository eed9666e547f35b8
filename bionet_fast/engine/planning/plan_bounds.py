"""What `python -m bionet_fast.plan` agrees to compute (issue 24): the planner simulates the step
iteration by iteration and, under --budget, tries every checkpoint setting at several batch
sizes, so its time grows with t (and the search with t squared). Beyond these bounds it would run
for minutes or exhaust memory; they are refused up front, naming the bound and a way out.

The model's own bounds (iterations, depth, channels: models.config_checks) are checked when the
config is built, also before any work.
"""
from __future__ import annotations

from ...models.config_checks import MAX_ITERATIONS, MAX_TILE

MAX_BUDGET_T = 64  # --budget searches O(t) checkpoint settings x batch sizes: seconds up to t=64
MAX_BATCH = 4096


def check_plan_bounds(iterations: int, image_size: int, batch_size: int, budget: bool) -> None:
    """ValueError naming the flag when the plan cannot be computed in seconds."""
    if iterations > MAX_ITERATIONS:
        raise ValueError(f"--t {iterations}: at most {MAX_ITERATIONS} (the largest t a model config takes; the "
                         "step's memory grows linearly in t beyond a few iterations: extrapolate from --t 1024)")
    if budget and iterations > MAX_BUDGET_T:
        raise ValueError(f"--t {iterations} with --budget: the search over checkpoint settings takes minutes "
                         f"beyond t={MAX_BUDGET_T}; plan without --budget (one setting, --checkpoint-iters), or "
                         "read the largest t per GPU from --table")
    if image_size > MAX_TILE:
        raise ValueError(f"--image-size {image_size}: at most {MAX_TILE} (a training crop; one fp32 feature map "
                         "of the first level is already 34 GB there)")
    if batch_size > MAX_BATCH:
        raise ValueError(f"--batch-size {batch_size}: at most {MAX_BATCH}")
