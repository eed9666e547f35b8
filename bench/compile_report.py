"""Which GPU autotune configs of the GEMM kernels can run on an H100/H200: an sm_90 compile report.

    python -m bench.compile_report [--dtype bf16] [--all-configs] [--workers 2]

No GPU needed. Compiles the implicit-GEMM kernels (conv_fwd, dgrad, wgrad) for sm_90 at the
(C1, C2, COUT) of every 3x3 conv block of BiO-Net x1.0, with the configs their autotuner would try
there (its early_config_prune applied), and prints a Markdown table: shared memory, registers,
spills, tensor-core instructions (wgmma / mma.sync), compile seconds. A config needing more than
SHARED_LIMIT bytes of shared memory fails at launch on H100/H200 with OutOfResources (the autotuner
skips it while benchmarking; a config that is the only one left crashes); spills cost speed.
Exits 1 when a config is over the limit or fails to compile.

Default: the configs of a run with BIONET_FAST_AUTOTUNE=0 (one pinned config per GEMM kernel).
--all-configs: every config of the autotune tables, the split-K ones (config "... splitS") at the
layers where the prune keeps them (fewer output tiles than SMs at the layer's smallest level, see
bench/aot_kernels.split_pixels).
Identical compiles (same config, signature and specialisation) are done once; the layers column
lists every layer that shares one.
"""
from __future__ import annotations

import argparse
import sys
import time

from .aot import DTYPES, GEMMS, SHARED_LIMIT, plan, run_jobs


def bionet_layers(multiplier: float = 1.0, depth: int = 4) -> dict:
    """{(C1, C2, COUT): "C1+C2>COUT"} of every fused 3x3 conv block a BiO-Net forward runs, recorded
    from the model itself (reference ops, a 2-iteration forward at the smallest valid size)."""
    import torch

    from bionet_fast import BiONet
    from bionet_fast.blocks.reference import RefOps

    seen = {}

    class Recorder(RefOps):
        def block(self, xs, conv, bn):
            key = (xs[0].shape[1], xs[1].shape[1] if len(xs) > 1 else 0, conv.out_channels)
            seen[key] = f"{key[0]}+{key[1]}>{key[2]}"
            return super().block(xs, conv, bn)

    model = BiONet(iterations=2, multiplier=multiplier, depth=depth, backend="reference").eval()
    model._ops = lambda device, *_: Recorder()
    with torch.no_grad():
        model(torch.zeros(1, model.config.in_channels, model.size_multiple, model.size_multiple))
    return dict(sorted(seen.items()))


def _row(r: dict) -> tuple[str, str]:
    """(Markdown row, status) of one result."""
    if r["error"]:
        return (f"| {r['kernel']} | {r['dtype']} | {_cfg(r)} | {_inputs(r)} | | | | | | **ERROR** "
                f"{r['error'].splitlines()[0][:200]} | {r['tag']} |", "error")
    spills = r["spill_stores"] or r["spill_loads"]
    over = r["shared"] > SHARED_LIMIT
    status = "**OVER SHARED LIMIT**" if over else ("spills" if spills else "ok")
    tc = "wgmma" if r["wgmma"] else ("mma.sync" if r["mma_sync"] else "none")
    return (f"| {r['kernel']} | {r['dtype']} | {_cfg(r)} | {_inputs(r)} | {r['shared']} | {r['registers']} | "
            f"{r['spill_stores']}/{r['spill_loads']} | {tc} | "
            f"{r['seconds']:.1f} | {status} | {r['tag']} |", "over" if over else ("spills" if spills else "ok"))


def _inputs(r: dict) -> int:
    """1 or 2: whether the kernel was compiled with a second (concatenated) input, HAS_X2."""
    return 2 if r["channels"][1] else 1


def _cfg(r: dict) -> str:
    m, n, k, w, s, *split = r["config"]  # (..., SPLIT_K) for the split-K GEMMs
    return f"{m}x{n}x{k} w{w} s{s}" + (f" split{split[0]}" if split and split[0] > 1 else "")


def report(dtype: str, all_configs: bool, workers: int) -> tuple[str, dict]:
    layers = bionet_layers()
    t0 = time.time()
    jobs = plan(GEMMS, dtype, layers, all_configs)
    results = run_jobs(jobs, workers=workers, timeout=1800)
    lines = [f"### sm_90 compile report: {dtype}, "
             f"{'every autotune config' if all_configs else 'BIONET_FAST_AUTOTUNE=0 configs'}",
             "",
             f"{len(results)} distinct compiles over {len(layers)} conv layers of BiO-Net x1.0 "
             f"({time.time() - t0:.0f} s on this machine). Shared limit {SHARED_LIMIT} B per block; "
             "spills = ptxas spill stores/loads in bytes; layers = C1+C2>COUT.",
             "",
             "| kernel | dtype | config (BMxBNxBK warps stages) | inputs | shared B | regs | spills B | "
             "tensor cores | compile s | status | layers |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    counts = {"ok": 0, "spills": 0, "over": 0, "error": 0}
    order = sorted(results, key=lambda r: (GEMMS.index(r["kernel"]), -(r.get("shared") or 0), r["config"]))
    for r in order:
        row, status = _row(r)
        lines.append(row)
        counts[status] += 1
    split = [r for r in results if len(r["config"] or ()) > 5 and r["config"][5] > 1]
    bad = sum(1 for r in split if r["error"] or r["spill_stores"] or r["spill_loads"]
              or r["shared"] > SHARED_LIMIT)
    lines += ["", f"ok {counts['ok']}, spilling {counts['spills']}, over the shared-memory limit "
                  f"{counts['over']}, failed to compile {counts['error']}. Split-K configs: "
                  f"{len(split)}, of which spilling, over the limit or failed: {bad}."]
    return "\n".join(lines), counts


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dtype", choices=DTYPES, action="append",
                   help="compute dtype (repeatable; default bf16 and fp32)")
    p.add_argument("--all-configs", action="store_true", help="every autotune config, not only the pinned ones")
    p.add_argument("--workers", type=int, default=2, help="parallel compile processes (default 2)")
    args = p.parse_args(argv)
    bad = 0
    for dtype in args.dtype or ["bf16", "fp32"]:
        text, counts = report(dtype, args.all_configs, args.workers)
        print(text + "\n", flush=True)
        bad += counts["over"] + counts["error"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
