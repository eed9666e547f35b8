"""CPU threads and OpenMP waiting on a shared machine: the time of one training step of the default
synthetic model (x0.25, depth 3, t=5, iteration checkpointing, batch 8 of 64x64) with 2 threads
spinning (torch's default), 2 threads waiting passively, and 1 thread. Each configuration runs in
its own process (OMP_WAIT_POLICY is read when OpenMP loads). Start another CPU job beside it to see
what a shared machine does; name the machine and its load with the numbers.

    python -m bench.cpu_threads [--steps 8]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

# "" leaves OpenMP its default (spin, then sleep): the CLIs only set PASSIVE where the variable is unset
CONFIGS = [(2, ""), (2, "PASSIVE"), (1, "")]


def child(threads: int, steps: int) -> float:
    """Seconds per training step (after 2 warm-up steps)."""
    import torch

    from bionet_fast import BiONet

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = BiONet(3, 1, 5, 0.25, 3, checkpoint_iters=True, backend="reference")
    opt = torch.optim.Adam(model.parameters(), 0.01)
    x, y = torch.randn(8, 3, 64, 64), (torch.rand(8, 1, 64, 64) > 0.5).float()

    def step() -> None:
        opt.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(model(x), y).backward()
        opt.step()

    for _ in range(2):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--child", nargs=1, type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        print(child(args.child[0], args.steps))
        return 0
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs")
    for threads, wait in CONFIGS:
        env = {**os.environ, "OMP_WAIT_POLICY": wait, "OMP_NUM_THREADS": str(threads)}
        out = subprocess.run([sys.executable, "-m", "bench.cpu_threads", "--child", str(threads),
                              "--steps", str(args.steps)], env=env, capture_output=True, text=True, check=True)
        seconds = float(out.stdout.strip().splitlines()[-1])
        print(f"{threads} thread(s), OMP_WAIT_POLICY={wait or '(OpenMP default)'}: {seconds * 1000:.0f} ms per step, "
              f"{8 / seconds:.1f} img/s", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
