"""Pure-Python helpers of the device run: the time budget, predictions from earlier points of a
series, and the bisection for the largest t that fits under a memory cap. No torch here, so the
logic is unit-tested in milliseconds."""
from __future__ import annotations

import time
from typing import Callable, Optional


class Budget:
    """A wall-clock deadline (time.time() seconds) and the question "is there time for this?"."""

    def __init__(self, deadline: float):
        self.deadline = deadline

    def left(self) -> float:
        return self.deadline - time.time()

    def allows(self, predicted_s: Optional[float], margin: float = 1.0) -> bool:
        """True when a job predicted to take `predicted_s` seconds (None: unknown, assumed short)
        ends before the deadline with `margin` seconds to spare."""
        return self.left() > (predicted_s or 0.0) + margin


def share(deadline: float, weights: list[float], now: Optional[float] = None) -> float:
    """The deadline of the first of `weights` sections when the time left until `deadline` is split
    in proportion to the weights (a section that ends early leaves its time to the next ones)."""
    now = time.time() if now is None else now
    total = sum(weights)
    if total <= 0 or not weights or weights[0] <= 0:
        return now
    return now + max(0.0, deadline - now) * weights[0] / total


def predict(points: list[tuple[float, float]], x: float) -> Optional[float]:
    """Extrapolate y at x from (x, y) points of one series: the line through the last two points
    (slope clamped at >= 0), proportional scaling from a single point, None without points."""
    pts = sorted(points)
    if not pts:
        return None
    if len(pts) == 1 or pts[-1][0] == pts[-2][0]:
        x0, y0 = pts[-1]
        return y0 * max(x, 1e-9) / max(x0, 1e-9) if x > x0 else y0
    (xa, ya), (xb, yb) = pts[-2], pts[-1]
    slope = max(0.0, (yb - ya) / (xb - xa))
    return yb + slope * (x - xb)


def step_cost(step_s: Optional[float], warmup: int, reps: int, max_timed_s: float,
              fixed_s: float = 1.0, min_reps: int = 3) -> Optional[float]:
    """Predicted seconds of one timed configuration: model build, warm-up, then reps calls that
    time_calls cuts short after max_timed_s (but never below min_reps calls)."""
    if step_s is None:
        return None
    timed = min(reps * step_s, max(max_timed_s + step_s, min_reps * step_s))
    return fixed_s + warmup * step_s + timed


def largest_fitting(fits: Callable[[int], bool], max_t: int, hint: Optional[int] = None,
                    can_probe: Callable[[int], bool] = lambda t: True, neighbour: bool = True) -> dict:
    """The largest t in 1..max_t with fits(t), for fits monotone (True up to some t, then False).

    Bisection; a `hint` (a predicted answer) is probed first, then (with `neighbour`) t+1 if it
    fit or t-1 if not, so that a good prediction settles the search in two probes.
    `can_probe(t)` False stops the search (budget).
    Returns {"best": largest t known to fit (0: not even t=1), "first_fail": smallest t known to fail
    (max_t + 1: none), "complete": whether best is the answer, "probes": [(t, fits), ...]}."""
    best, first_fail, probes = 0, max_t + 1, []
    queue = [] if hint is None else [min(max(int(hint), 1), max_t)]
    while first_fail - best > 1:
        t = queue.pop(0) if queue else (best + first_fail) // 2
        if not best < t < first_fail:
            continue
        if not can_probe(t):
            return {"best": best, "first_fail": first_fail, "complete": False, "probes": probes}
        ok = bool(fits(t))
        probes.append((t, ok))
        if ok:
            best = t
        else:
            first_fail = t
        if len(probes) == 1 and hint is not None and neighbour:
            queue.append(t + 1 if ok else t - 1)
    return {"best": best, "first_fail": first_fail, "complete": True, "probes": probes}


def describe_fit(result: dict, max_t: int) -> str:
    """'>= 64', '9', '0 (t=1 does not fit)' or '>= 16 (< 32; stopped: budget)'."""
    best, fail = result["best"], result["first_fail"]
    if not result["complete"]:
        upper = f"< {fail}; " if fail <= max_t else ""
        return f">= {best} ({upper}stopped: budget)"
    if best >= max_t:
        return f">= {max_t}"
    if best == 0:
        return "0 (t=1 does not fit)"
    return str(best)
