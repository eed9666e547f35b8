"""What fits in my GPU? Predict a training step's memory without training (or a GPU).

    python -m bionet_fast.plan --t 64 --batch-size 8 --image-size 512 --precision bf16 --budget 8GiB
    python -m bionet_fast.plan --table            # the largest t for 8..80 GiB GPUs

Prints the plan of bionet_fast.plan_memory: bytes by part, the checkpointing chosen for the budget
and the alternatives weighed; when nothing fits, the largest t at this batch and the largest batch
at this t. The count is analytic (see bionet_fast/engine/planner.py for what it leaves out).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Optional

from ._cli import AT_LEAST_1, POSITIVE, check_numbers
from .engine.planning.planner import DoesNotFit, Planner, candidates, fit_or_explain, parse_bytes
from .engine.planning.plan_bounds import check_plan_bounds
from .engine.planning.step_model import Checkpointing
from .models import BiOLinkNetConfig, BiONetConfig

TABLE_GPUS = (8, 12, 16, 24, 40, 80)
TABLE_BATCHES = (1, 2, 4, 8)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bionet_fast.plan", description=__doc__.split("\n")[0])
    a = p.add_argument
    a("--arch", choices=("bionet", "biolinknet"), default="bionet",
      help="biolinknet: ResNet-18 LinkNet with BiO-Net's recurrence (width and depth options ignored)")
    a("--t", "--iterations", "--iter", dest="iterations", type=int, default=3, help="recurrent iterations t")
    a("--multiplier", type=float, default=1.0, help="channel multiplier (x1.0: 32..512 channels)")
    a("--depth", type=int, default=4, help="encoder levels L")
    a("--backward-skips", type=int, default=None, help="w: backward skips (default every level)")
    a("--integrate", action="store_true", help="INT: the head reads every iteration's output")
    a("--in-channels", type=int, default=3)
    a("--classes", type=int, default=1)
    a("--batch-size", type=int, default=2)
    a("--image-size", type=int, default=512, help="square training crop side")
    a("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    a("--optimizer", choices=("adam", "adamw", "sgd", "none"), default="adam")
    a("--backend", choices=("auto", "reference", "triton"), default="auto",
      help="auto plans for the larger of the two counts")
    a("--budget", help="memory budget for the whole step, e.g. 8GiB, 12GB, 500MiB")
    a("--checkpoint-iters", action="store_true", help="without --budget: plan per-iteration checkpointing")
    a("--table", action="store_true", help="print the largest t for 8/12/16/24/40/80 GiB GPUs instead")
    return p


def _config(args: argparse.Namespace, iterations: Optional[int] = None):
    if args.arch == "biolinknet":
        return BiOLinkNetConfig(in_channels=args.in_channels, classes=args.classes,
                                iterations=iterations or args.iterations,
                                checkpoint_iters=args.checkpoint_iters)
    return BiONetConfig(in_channels=args.in_channels, classes=args.classes,
                        iterations=iterations or args.iterations, multiplier=args.multiplier,
                        depth=args.depth, backward_skips=args.backward_skips, integrate=args.integrate,
                        checkpoint_iters=args.checkpoint_iters, backend=args.backend)


#: the t the table tries (exact below 64, where the grid steps are cheap to bisect)
T_GRID = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 64, 80, 96, 128, 160, 192, 256, 320,
          384, 512, 640, 768, 1024)


def _largest_t(total, budget: int) -> int:
    """The largest t of T_GRID whose total fits (bisection on the grid: the total grows with t),
    refined by bisection where the grid steps are at most 16; negative (-t) where it is not."""
    if total(T_GRID[-1]) <= budget:
        return T_GRID[-1]
    if total(T_GRID[0]) > budget:
        return 0
    lo, hi = 0, len(T_GRID) - 1  # T_GRID[lo] fits, T_GRID[hi] does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(T_GRID[mid]) <= budget else (lo, mid)
    lo, hi = T_GRID[lo], T_GRID[hi]
    if hi - lo > 16:
        return -lo  # a lower bound: the next grid point does not fit, the t between are not tried
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if total(mid) <= budget else (lo, mid)
    return lo


def table(args: argparse.Namespace, out=sys.stdout) -> None:
    """Markdown table: the largest t per GPU size, batch and precision, without and with
    checkpointing (its least-memory setting: sqrt(t) segments and the stages), x{multiplier} at
    image-size; t is searched on T_GRID (exact up to 64)."""
    start, s = time.time(), args.image_size
    print(f"Largest t whose whole step fits (x{args.multiplier}, depth {args.depth}, {s}x{s}, Adam, "
          f"backend {args.backend}); each cell: without / with checkpointing, "
          f"'-' nothing fits, '>=t' at least t (t to the next point tried not searched), "
          f"'{T_GRID[-1]}+' the largest t tried:", file=out)
    heads = [f"{g} GiB" for g in TABLE_GPUS]
    print("| precision | batch | " + " | ".join(heads) + " |", file=out)
    print("|---|---|" + "---|" * len(heads), file=out)
    for precision in ("fp32", "bf16"):
        for batch in TABLE_BATCHES:
            cols = []
            for ck in (False, True):
                cache: dict[int, int] = {}

                def total(t: int, ck=ck, cache=cache) -> int:
                    if t not in cache:
                        planner = Planner(_config(args, t), s, precision, args.optimizer, args.backend)
                        cache[t] = planner.total(batch, candidates(t)[-1] if ck else Checkpointing())
                    return cache[t]

                cols.append([_largest_t(total, g << 30) for g in TABLE_GPUS])
            cells = [f"{_t(a)} / {_t(b)}" for a, b in zip(*cols)]
            print(f"| {precision} | {batch} | " + " | ".join(cells) + " |", file=out, flush=True)
    print(f"(computed in {time.time() - start:.0f} s)", file=out)


def _t(v: int) -> str:
    if v < 0:
        return f">={-v}"
    return f"{v}+" if v >= T_GRID[-1] else ("-" if v == 0 else str(v))


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        check_numbers(args, dict(iterations=AT_LEAST_1, depth=AT_LEAST_1, batch_size=AT_LEAST_1,
                                 image_size=AT_LEAST_1, multiplier=POSITIVE))
        check_plan_bounds(args.iterations, args.image_size, args.batch_size, args.budget is not None)
        budget = None if args.budget is None else parse_bytes(args.budget)
        if args.table:
            table(args)
            return 0
        planner = Planner(_config(args), args.image_size, args.precision, args.optimizer, args.backend)
        plan = (planner.plan(args.batch_size) if budget is None
                else fit_or_explain(planner, args.batch_size, budget))
    except DoesNotFit as err:
        print(f"nothing fits: {err}", file=sys.stderr)
        return 2
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(plan.describe())
    if budget is not None:
        best = candidates(args.iterations)[-1]
        print(f"largest batch at t={args.iterations} in {args.budget}: "
              f"{planner.largest_batch(budget, plan.checkpointing)} with {plan.choice}, "
              f"{planner.largest_batch(budget, best)} with {best.label(args.iterations)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
