"""Accuracy of the memory planner: predicted step_peak_bytes against the measured count.

    python -m bench.plan_accuracy [--only reference|triton] [--max-mib 2500] [--json OUT]

For each configuration of GRID: `simulate_step` (engine/step_model.py, no tensor computed) against
`bionet_fast.peak_step_memory` (on the CPU the deterministic TorchDispatchMode count; bf16 rows run
the whole step under CPU autocast). The fused backend runs in the Triton interpreter on the CPU
(TRITON_INTERPRET=1 is set here when there is no GPU), so its rows are small. Prints a Markdown
table with the relative error of each row and the largest one.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

if not os.environ.get("TRITON_INTERPRET"):
    import torch as _t
    if not _t.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from bionet_fast import BiOLinkNet, BiONet, peak_step_memory  # noqa: E402
from bionet_fast.engine.planning.memory_ops import Platform  # noqa: E402
from bionet_fast.engine.planning.step_model import simulate_step  # noqa: E402

# (backend, t, batch, size, multiplier, depth, precision, extra BiONet kwargs)
R, T, L = "reference", "triton", "linknet"  # linknet: BiOLinkNet (reference path; x1.0, depth 5 = ResNet-18)
CK = dict(checkpoint_iters=True)
GRID = [
    (R, 1, 1, 64, 0.25, 2, "fp32", {}),
    (R, 3, 2, 64, 0.25, 3, "fp32", {}),
    (R, 3, 2, 64, 0.25, 3, "bf16", {}),
    (R, 5, 2, 128, 0.5, 3, "fp32", {}),
    (R, 4, 8, 128, 0.25, 3, "fp32", {}),
    (R, 3, 8, 64, 1.0, 3, "fp32", {}),
    (R, 3, 1, 256, 1.0, 4, "fp32", {}),
    (R, 2, 2, 256, 1.0, 4, "bf16", {}),
    (R, 3, 1, 512, 0.5, 4, "fp32", {}),
    (R, 2, 1, 512, 1.0, 4, "fp32", CK),
    (R, 8, 4, 128, 0.25, 3, "fp32", CK),
    (R, 8, 4, 128, 0.25, 3, "bf16", CK),
    (R, 16, 2, 128, 0.25, 4, "fp32", CK),
    (R, 17, 2, 128, 0.25, 3, "fp32", CK),
    (R, 32, 1, 128, 0.25, 3, "fp32", CK),
    (R, 64, 1, 64, 0.25, 2, "fp32", CK),
    (R, 64, 2, 128, 0.25, 3, "bf16", CK),
    (R, 64, 1, 256, 0.5, 4, "fp32", CK),
    (R, 48, 1, 128, 0.5, 4, "bf16", CK),
    (R, 24, 1, 256, 0.25, 4, "fp32", CK),
    (R, 12, 2, 128, 0.25, 3, "fp32", dict(CK, checkpoint_segments=3)),
    (R, 12, 2, 128, 0.25, 3, "bf16", dict(CK, checkpoint_segments=4)),
    (R, 10, 4, 64, 0.75, 2, "fp32", dict(CK, checkpoint_segments=5)),
    (R, 8, 2, 128, 0.25, 3, "fp32", dict(CK, checkpoint_stages=True)),
    (R, 6, 2, 128, 0.5, 3, "fp32", dict(backward_skips=1)),
    (R, 6, 2, 128, 0.5, 3, "fp32", dict(backward_skips=0)),
    (R, 4, 2, 128, 0.5, 3, "fp32", dict(integrate=True)),
    (R, 4, 2, 128, 0.5, 3, "fp32", dict(CK, integrate=True)),
    (T, 1, 1, 32, 0.25, 2, "fp32", {}),
    (T, 2, 1, 32, 0.25, 2, "fp32", {}),
    (T, 2, 1, 32, 0.25, 2, "bf16", {}),
    (T, 3, 1, 32, 0.25, 2, "fp32", CK),
    (T, 4, 1, 32, 0.25, 2, "fp32", dict(CK, checkpoint_segments=2)),
    (T, 2, 2, 64, 0.25, 3, "fp32", dict(integrate=True)),
    (L, 1, 1, 64, 1.0, 5, "fp32", {}),
    (L, 3, 2, 64, 1.0, 5, "fp32", {}),
    (L, 3, 2, 64, 1.0, 5, "bf16", {}),
    (L, 4, 1, 64, 1.0, 5, "fp32", CK),
    (L, 8, 2, 128, 1.0, 5, "bf16", dict(CK, checkpoint_segments=3)),
]


def describe(row) -> str:
    backend, t, b, s, mul, depth, prec, kw = row
    extra = ",".join(f"{k.replace('checkpoint_', 'ck_')}={v}" for k, v in kw.items())
    return f"{backend} t={t} B={b} {s}x{s} x{mul} L={depth} {prec} {extra or '-'}"


def build(row) -> torch.nn.Module:
    backend, t, _, _, mul, depth, _, kw = row
    if backend == L:
        return BiOLinkNet(iterations=t, **kw)
    return BiONet(iterations=t, multiplier=mul, depth=depth, backend=backend, **kw)


def measure(row) -> dict:
    backend, t, b, s, mul, depth, prec, kw = row
    torch.manual_seed(0)
    model = build(row)
    backend = "reference" if backend == L else backend
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = model.to(device)
    x = torch.randn(b, 3, s, s, device=device)
    start = time.perf_counter()
    predicted = simulate_step(model, b, (s, s), prec, backend, platform=Platform.detect(device)).peak
    plan_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.autocast(device, dtype=torch.bfloat16, enabled=prec == "bf16"):
        measured = peak_step_memory(model, x)
    return dict(config=describe(row), measured=measured, predicted=predicted,
                error=(predicted - measured) / measured, plan_s=plan_s,
                measure_s=time.perf_counter() - start)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", choices=(R, T, L))
    p.add_argument("--max-mib", type=float, default=2500, help="skip rows predicted above this")
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--repredict", nargs="+", metavar="JSON",
                   help="do not measure: predict again the rows of earlier --json files (the measured "
                        "count does not depend on the planner)")
    args = p.parse_args(argv)
    rows = []
    print("| configuration | measured MiB | predicted MiB | error |\n|---|---|---|---|", flush=True)
    if args.repredict:
        by_name = {describe(row): row for row in GRID}
        for path in args.repredict:
            with open(path) as f:
                for old in json.load(f):
                    row = by_name[old["config"]]
                    backend = "reference" if row[0] == L else row[0]
                    device = "cuda" if torch.cuda.is_available() else "cpu"
                    old["predicted"] = simulate_step(build(row), row[2], (row[3], row[3]), row[6], backend,
                                                     platform=Platform.detect(device)).peak
                    old["error"] = (old["predicted"] - old["measured"]) / old["measured"]
                    rows.append(old)
                    _print(old)
        return _summary(rows, args.json)
    for row in GRID:
        if args.only and row[0] != args.only:
            continue
        guess = simulate_step(build(row), row[2], (row[3], row[3]), row[6],
                              "reference" if row[0] == L else row[0]).peak
        if guess > args.max_mib * 2**20:
            print(f"| {describe(row)} | skipped (predicted {guess / 2**20:.0f} MiB) | | |", flush=True)
            continue
        r = measure(row)
        rows.append(r)
        _print(r)
    return _summary(rows, args.json)


def _print(r: dict) -> None:
    print(f"| {r['config']} | {r['measured'] / 2**20:.3f} | {r['predicted'] / 2**20:.3f} | "
          f"{100 * r['error']:+.2f} % |", flush=True)


def _summary(rows: list, path) -> int:
    if rows:
        worst = max(rows, key=lambda r: abs(r["error"]))
        print(f"\n{len(rows)} configurations, largest error {100 * worst['error']:+.2f} % ({worst['config']})")
    if path:
        with open(path, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
