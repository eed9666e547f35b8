"""The training step replayed from a CUDA graph (bionet_fast.engine.cuda_graph.GraphedTrainStep, what
`python -m bionet_fast.train --cuda-graph` runs) beside the eager step, both backends, t = 1, 3, 8 at
batch 2 and 8; prints a Markdown table (milliseconds per step, median; CUDA allocator peak).

    PYTHONPATH=. python bench/graph_step.py [--budget S] [--size 256] [--dtype bf16]
    python -m bench.graph_step --quick      # CPU dry run, tiny (the stand-in capture re-runs the step)

A step is what the trainer does: zero_grad, forward under autocast (bf16: the model and batch in
channels_last), BCE loss, backward, Adam step, the Keras LR decay. Eager uses the trainer's plain
Adam; graphed uses the capturable Adam with a tensor lr that --cuda-graph switches to. Cases run in
order of interest (batch 2 first); with --budget no new case starts after S seconds, and each row is
printed as soon as it is measured, so a killed run keeps what it measured.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script: bench/ is a folder of the checkout
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.harness import (environment, ensure_importable, free_memory, is_oom, median, peak_mib,  # noqa: E402
                           reset_peak, sync, time_calls)

QUICK = dict(size=32, multiplier=0.125, depth=2, ts=(1, 2), batches=(2,), backends=("reference",), reps=2,
             warmup=1)


def bce(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.binary_cross_entropy_with_logits(logits.float(), y)


def build(backend: str, t: int, batch: int, size: int, multiplier: float, depth: int, bf16: bool,
          device: torch.device):
    """(model, Adam, LambdaLR, x, y) of one case, seeded."""
    from bionet_fast import BiONet

    torch.manual_seed(0)
    model = BiONet(iterations=t, multiplier=multiplier, depth=depth, backend=backend).to(device).train()
    x = torch.rand(batch, 3, size, size, device=device)
    y = (torch.rand(batch, 1, size, size, device=device) > 0.5).float()
    if bf16:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 3e-5 * s))
    return model, opt, sched, x, y


def eager_ms(case: dict, device: torch.device, reps: int, warmup: int = 3) -> tuple[float, float | None]:
    """(median ms per eager step, CUDA allocator peak MiB or None)."""
    reset_peak(device)
    model, opt, sched, x, y = build(**case, device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=case["bf16"]):
            loss = bce(model(x), y)
        loss.backward()
        opt.step()
        sched.step()

    return median(time_calls(step, device, warmup=warmup, reps=reps, max_seconds=5)), peak_mib(device)


def graphed_ms(case: dict, device: torch.device, reps: int, warmup: int = 3) -> tuple[float, float | None]:
    """(median ms per replayed step, CUDA allocator peak MiB (the graph's pool included) or None)."""
    from bionet_fast.engine.cuda_graph import EagerCapture, GraphedTrainStep, GraphStepOptions

    reset_peak(device)
    model, opt, sched, x, y = build(**case, device=device)
    capture = None if device.type == "cuda" else EagerCapture()
    graphed = GraphedTrainStep(model, opt, bce, device, GraphStepOptions(amp=case["bf16"], warmup=warmup),
                               capture=capture, say=None)

    def step() -> None:
        if graphed.step(x, y) is None:
            raise RuntimeError(f"the step was not graphed: {graphed.obstacle}")
        sched.step()

    for _ in range(graphed.options.warmup + 1):  # warm-ups and the capture
        step()
    sync(device)
    return median(time_calls(step, device, warmup=1, reps=reps, max_seconds=5)), peak_mib(device)


def cases(quick: bool, size: int, dtype: str) -> list[dict]:
    if quick:
        q = QUICK
        return [dict(backend=b, t=t, batch=n, size=q["size"], multiplier=q["multiplier"], depth=q["depth"],
                     bf16=False) for b in q["backends"] for n in q["batches"] for t in q["ts"]]
    order = [(2, 3), (2, 1), (2, 8), (8, 3), (8, 1), (8, 8)]  # batch 2 first: launch-bound
    return [dict(backend=b, t=t, batch=n, size=size, multiplier=1.0, depth=4, bf16=dtype == "bf16")
            for n, t in order for b in ("reference", "triton")]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU dry run: tiny model, reference backend")
    p.add_argument("--budget", type=float, default=None, help="start no new case after this many seconds")
    p.add_argument("--size", type=int, default=256, help="image side (default 256)")
    p.add_argument("--dtype", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--reps", type=int, default=20, help="timed steps per measurement (default 20)")
    args = p.parse_args(argv)
    ensure_importable()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() and not args.quick \
        else torch.device("cpu")
    todo = cases(args.quick, args.size, args.dtype)
    reps = QUICK["reps"] if args.quick else args.reps
    warmup = QUICK["warmup"] if args.quick else 3
    env = environment()
    head = todo[0]
    print(f"## Graphed train step beside eager ({env.get('card')}, torch {env['torch']}, triton {env.get('triton')})\n")
    if device.type != "cuda":
        print("CPU dry run: the stand-in capture re-runs the step eagerly; these are not CUDA-graph times.\n")
    print(f"x{head['multiplier']} depth {head['depth']}, {head['size']}x{head['size']}, "
          f"{'bf16 autocast + channels_last' if head['bf16'] else 'fp32'}, Adam + Keras LR decay, "
          f"BIONET_FAST_AUTOTUNE={os.environ.get('BIONET_FAST_AUTOTUNE', '1')}; ms per step (median, synchronised)\n")
    print("| backend | t | batch | eager ms | graphed ms | speed-up | eager peak MiB | graphed peak MiB |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    start = time.perf_counter()
    for case in todo:
        label = f"| {case['backend']} | {case['t']} | {case['batch']} |"
        if args.budget is not None and time.perf_counter() - start > args.budget:
            print(f"{label} not run (budget) | | | | |", flush=True)
            continue
        row, peaks = [], []
        for measure in (eager_ms, graphed_ms):
            try:
                ms, peak = measure(case, device, reps, warmup)
                row.append(ms)
                peaks.append("-" if peak is None else f"{peak:.0f}")
            except Exception as exc:  # noqa: BLE001 - one failing case must not stop the table
                row.append("OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:80]}")
                peaks.append("")
            free_memory(device)
        speed = f"{row[0] / row[1]:.2f}x" if all(isinstance(v, float) for v in row) else ""
        cells = " | ".join(f"{v:.2f}" if isinstance(v, float) else v for v in row)
        print(f"{label} {cells} | {speed} | {' | '.join(peaks)} |", flush=True)
    print(f"\n{time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
