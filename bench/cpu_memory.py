"""Deterministic CPU benchmark of training memory: what activation checkpointing across iterations
saves, measured without a GPU (bionet_fast.peak_step_memory counts every tensor a train step's
forward and backward create; parameters, buffers and the input are not counted).

    python -m bench.cpu_memory            # print the table
    python -m bench.cpu_memory --check    # and fail (exit 1) if a count grew > 10% over the baseline
    python -m bench.cpu_memory --update   # rewrite bench/cpu_memory_baseline.json

BiO-Net x0.25, depth 3, batch 2, 3x64x64, BCE against fixed random binary targets, fp32.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

BASELINE = Path(__file__).with_name("cpu_memory_baseline.json")
TS = (2, 4, 8)
TOLERANCE = 0.10  # a count more than 10% above its baseline is a regression
SHAPE = {"multiplier": 0.25, "depth": 3, "batch": 2, "size": 64}


def measure(t: int, ckpt: bool) -> int:
    """Peak bytes of one train step (forward + backward) at iterations=t."""
    from bionet_fast import BiONet, peak_step_memory

    torch.manual_seed(0)
    model = BiONet(iterations=t, multiplier=SHAPE["multiplier"], depth=SHAPE["depth"],
                   checkpoint_iters=ckpt, backend="reference")
    x = torch.randn(SHAPE["batch"], 3, SHAPE["size"], SHAPE["size"])
    y = (torch.rand(SHAPE["batch"], 1, SHAPE["size"], SHAPE["size"]) > 0.5).float()
    return peak_step_memory(model, x, y)


def run() -> dict[str, int]:
    """{"t=2 ckpt=no": bytes, ...} for every t in TS, without and with checkpoint_iters."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the count does not depend on threads; one is fastest on a busy host
    try:
        return {key(t, ck): measure(t, ck) for t in TS for ck in (False, True)}
    finally:
        torch.set_num_threads(threads)


def key(t: int, ckpt: bool) -> str:
    return f"t={t} ckpt={'yes' if ckpt else 'no'}"


def table(counts: dict[str, int], baseline: dict[str, int] | None = None) -> str:
    rows = ["| t | no checkpointing (MiB) | checkpoint_iters (MiB) | saved | baseline (no / ckpt) |",
            "|---|---|---|---|---|"]
    for t in TS:
        no, ck = counts[key(t, False)], counts[key(t, True)]
        base = ""
        if baseline:
            no_b, ck_b = baseline.get(key(t, False), 0), baseline.get(key(t, True), 0)
            base = f"{no_b / 2**20:.2f} / {ck_b / 2**20:.2f}"
        rows.append(f"| {t} | {no / 2**20:.2f} | {ck / 2**20:.2f} | {1 - ck / no:.0%} | {base} |")
    return "\n".join(rows)


def regressions(counts: dict[str, int], baseline: dict[str, int], tolerance: float = TOLERANCE) -> list[str]:
    """One message per count more than `tolerance` above its baseline (or missing from it)."""
    out = []
    for k, value in counts.items():
        if k not in baseline:
            out.append(f"{k}: no baseline; run python -m bench.cpu_memory --update")
        elif value > baseline[k] * (1 + tolerance):
            out.append(f"{k}: {value} bytes is {value / baseline[k] - 1:.1%} above the baseline "
                       f"{baseline[k]}")
    return out


def load_baseline(path: Path = BASELINE) -> dict[str, int]:
    return {k: int(v) for k, v in json.loads(path.read_text())["peak_bytes"].items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--check", action="store_true", help="exit 1 on a >10%% regression vs the baseline")
    p.add_argument("--update", action="store_true", help="write the counts as the new baseline")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    counts = run()
    baseline = load_baseline() if BASELINE.exists() else None
    print(f"peak bytes of one train step, BiO-Net x{SHAPE['multiplier']} depth {SHAPE['depth']}, batch "
          f"{SHAPE['batch']}, 3x{SHAPE['size']}x{SHAPE['size']}, fp32 "
          f"(CPU count, {time.perf_counter() - t0:.1f} s)")
    print(table(counts, baseline))
    if args.update:
        tmp = BASELINE.with_suffix(".tmp")
        tmp.write_text(json.dumps({"shape": SHAPE, "peak_bytes": counts}, indent=1) + "\n")
        tmp.replace(BASELINE)
        print(f"wrote {BASELINE}")
    if args.check:
        if baseline is None:
            print(f"no baseline at {BASELINE}; run with --update first")
            return 1
        bad = regressions(counts, baseline)
        for line in bad:
            print("REGRESSION:", line)
        return 1 if bad else 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
