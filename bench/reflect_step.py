"""The default recipe's training step, fused vs reference, reflect vs zero padding (issue 21, item 1).

`python -m bionet_fast.train --t 5 --checkpoint-iters` trains the synthetic recipe (train.SYNTHETIC:
x0.25, depth 3, 64x64 crops, batch 8, padding_mode="reflect", fp32 unless --amp). This times that
step (zero_grad, forward, BCE, backward, Adam step) on both backends, reflect beside zeros, fp32 and
bf16 autocast, and prints a Markdown table: ms per step (median, synchronised), fused / reference.

    PYTHONPATH=. python bench/reflect_step.py [--budget S] [--reps 20]
    PYTHONPATH=. python bench/reflect_step.py --quick    # CPU dry run: t=2, 32 px, reference only
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
from bench.harness import environment, ensure_importable, free_memory, is_oom, median, time_calls  # noqa: E402


def recipe(quick: bool) -> dict:
    """The model and batch of the default run (train.SYNTHETIC, --t 5 --checkpoint-iters)."""
    from bionet_fast.train import SYNTHETIC

    r = dict(multiplier=SYNTHETIC["multiplier"], depth=SYNTHETIC["depth"], size=SYNTHETIC["image_size"],
             batch=SYNTHETIC["batch_size"], t=5)
    return r | dict(t=2, size=32, batch=2) if quick else r


def step_ms(backend: str, padding: str, bf16: bool, r: dict, device: torch.device, reps: int) -> float:
    """Median ms of one training step of the recipe's model with this backend / padding / precision."""
    from bionet_fast import BiONet

    torch.manual_seed(0)
    model = BiONet(iterations=r["t"], multiplier=r["multiplier"], depth=r["depth"], padding_mode=padding,
                   checkpoint_iters=True, backend=backend).to(device).train()
    x = torch.rand(r["batch"], 3, r["size"], r["size"], device=device)
    y = (torch.rand(r["batch"], 1, r["size"], r["size"], device=device) > 0.5).float()
    if bf16:
        model, x = model.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.binary_cross_entropy_with_logits(model(x).float(), y)
        loss.backward()
        opt.step()

    return median(time_calls(step, device, warmup=3, reps=reps, max_seconds=10))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="CPU dry run: tiny recipe, reference backend")
    p.add_argument("--budget", type=float, default=None, help="start no new row after this many seconds")
    p.add_argument("--reps", type=int, default=20, help="timed steps per measurement (default 20)")
    args = p.parse_args(argv)
    ensure_importable()
    cuda = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    r, reps = recipe(args.quick), (2 if args.quick else args.reps)
    backends = ("reference", "triton") if cuda else ("reference",)
    env = environment()
    print(f"## Default recipe train step: fused vs reference ({env.get('card')}, torch {env['torch']}, "
          f"triton {env.get('triton')})\n")
    print(f"BiONet x{r['multiplier']} depth {r['depth']}, t={r['t']}, checkpoint_iters, batch {r['batch']}, "
          f"{r['size']}x{r['size']}, Adam; BIONET_FAST_AUTOTUNE={os.environ.get('BIONET_FAST_AUTOTUNE', '1')}; "
          "ms per step (median, synchronised)\n")
    print("| padding | precision | " + " | ".join(f"{b} ms" for b in backends) + " | fused / reference |\n"
          "|---|---|" + "---|" * len(backends) + "---|", flush=True)
    start = time.perf_counter()
    for padding in ("reflect", "zeros"):
        for bf16 in (False, True):
            label = f"| {padding} | {'bf16 autocast' if bf16 else 'fp32'} |"
            if args.budget is not None and time.perf_counter() - start > args.budget:
                print(f"{label} not run (budget) |" + " |" * len(backends), flush=True)
                continue
            ms = {}
            for b in backends:
                try:
                    ms[b] = step_ms(b, padding, bf16, r, device, reps)
                except Exception as exc:  # noqa: BLE001 - one failing cell must not stop the table
                    ms[b] = "OOM" if is_oom(exc) else f"error: {type(exc).__name__}: {str(exc)[:80]}"
                free_memory(device)
            cells = [f"{v:.2f}" if isinstance(v, float) else v for v in ms.values()]
            ratio = (f"{ms['triton'] / ms['reference']:.2f}" if all(isinstance(ms.get(b), float)
                                                                   for b in ("reference", "triton")) else "-")
            print(f"{label} {' | '.join(cells)} | {ratio} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
