"""Saved activations per recurrent iteration, fused backend vs reference (issue 6's "at most 40 %").

    python -m bench.saved_bytes [--size 64] [--depth 4] [--multiplier 0.25]

What a train-mode forward keeps for backward (`bionet_fast.saved_activation_bytes`: autograd's saved
tensors, distinct storages, parameters and input excluded) at t=2 and t=3; their difference is what
one more iteration keeps. Runs anywhere: on the CPU the fused kernels run in Triton's interpreter
(slow: about a minute per fused forward at the default 64x64, depth 4). The per-iteration ratio does
not depend on the image size (every saved activation scales with H*W), so the CPU number holds at
512x512; on a GPU pass --device cuda --size 512 for the absolute bytes.
"""
from __future__ import annotations

import argparse
import os

import torch


def per_iteration(backend: str, dtype: str, size: int, depth: int, multiplier: float,
                  device: str = "cpu", batch: int = 1) -> tuple[int, int]:
    """(bytes saved at t=2, bytes saved at t=3) of one train-mode forward."""
    from bionet_fast import BiONet, saved_activation_bytes

    out = []
    for t in (2, 3):
        torch.manual_seed(0)
        model = BiONet(backend=backend, iterations=t, multiplier=multiplier, depth=depth).to(device)
        x = torch.randn(batch, 3, size, size, device=device)
        if dtype == "bf16":
            model, x = model.to(memory_format=torch.channels_last), x.to(memory_format=torch.channels_last)
        with torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bf16"):
            out.append(saved_activation_bytes(model, x))
    return out[0], out[1]


def table(size: int, depth: int, multiplier: float, device: str, dtypes=("fp32", "bf16")) -> str:
    rows = [f"BiO-Net x{multiplier}, depth {depth}, batch 1, 3x{size}x{size}, {device}: bytes a train-mode "
            "forward saves for backward.", "",
            "| precision | backend | t=2 | t=3 | per iteration | vs reference |", "|---|---|---|---|---|---|"]
    for dt in dtypes:
        ref = None
        for backend in ("reference", "triton"):
            a, b = per_iteration(backend, dt, size, depth, multiplier, device)
            ref = b - a if ref is None else ref
            rows.append(f"| {dt} | {backend} | {a / 2**20:.2f} MiB | {b / 2**20:.2f} MiB | "
                        f"{(b - a) / 2**20:.3f} MiB | {(b - a) / ref:.0%} |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--multiplier", type=float, default=0.25)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args(argv)
    if args.device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")
    print(table(args.size, args.depth, args.multiplier, args.device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
