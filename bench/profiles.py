"""The grids each benchmark runs over: the full GPU run, a quick GPU run, and the tiny CPU smoke run
that proves the harness works on a machine without a GPU (CI, the dry run of run_device.sh)."""
from __future__ import annotations

from dataclasses import dataclass, field, replace

GIB = 2**30


@dataclass(frozen=True)
class Profile:
    name: str
    size: int
    multiplier: float
    depth: int
    # speed sweep: eager inference forward and train step over t x batch x dtype, per backend
    ts: tuple = (1, 2, 3, 5, 8)
    batches: tuple = (2, 8)
    dtypes: tuple = ("fp32", "bf16")
    warmup: int = 2
    reps: int = 10
    max_timed_s: float = 1.5  # per configuration: stop timing after this (at least 3 calls)
    # whole-train-step CUDA graphs: (t, batch, dtype)
    graph_cases: tuple = ((3, 2, "fp32"), (3, 2, "bf16"), (8, 2, "bf16"), (3, 8, "fp32"), (3, 8, "bf16"),
                          (8, 2, "fp32"))
    # checkpoint table (issue 3): peak memory and step time, with and without checkpoint_iters
    ckpt_ts: tuple = (1, 3, 5, 8, 16, 32, 64)
    ckpt_batches: tuple = (2, 8)
    ckpt_reps: int = 4
    ckpt_max_timed_s: float = 2.0
    # largest t that trains under a memory cap (bisection on 1..search_max_t)
    search_max_t: int = 64
    search_batches: tuple = (2, 8)
    cap_bytes: int = 8 * GIB
    # torch.compile comparators: (t, batch, dtype); each runs in its own process with a hard timeout
    compile_cases: tuple = ((3, 2, "fp32"), (3, 2, "bf16"))
    compile_min_s: float = 95.0  # reserved for the first compile case; no compile starts with less
    # seconds from run_device.sh's start (pip install included) to the printed report
    budget_s: float = 335.0
    # relative shares of the time left (after the compile reserve), in run order; time a section
    # does not use passes to the later ones
    weights: dict = field(default_factory=lambda: {"speed-reference": 50, "speed-triton": 60, "graph": 25,
                                                   "memory": 105})

    def model_kwargs(self) -> dict:
        return {"size": self.size, "multiplier": self.multiplier, "depth": self.depth}


GPU = Profile("gpu", size=512, multiplier=1.0, depth=4)

GPU_QUICK = replace(GPU, name="gpu-quick", ts=(1, 3, 8), batches=(2,), reps=6, max_timed_s=1.0,
                    graph_cases=((3, 2, "fp32"), (3, 2, "bf16")), ckpt_ts=(1, 3, 8, 16, 64),
                    ckpt_reps=3, compile_cases=(), budget_s=170.0,
                    weights={"speed-reference": 30, "speed-triton": 30, "graph": 12, "memory": 60})

# 64x64, x0.25, depth 3: a train step takes milliseconds on one CPU core. The memory cap of the
# search is simulated with the CPU count (bionet_fast.peak_step_memory) so its logic runs too.
CPU = Profile("cpu", size=64, multiplier=0.25, depth=3, ts=(1, 2), batches=(2,), warmup=1, reps=3,
              max_timed_s=0.5, graph_cases=(), ckpt_ts=(1, 2, 4), ckpt_batches=(2,), ckpt_reps=2,
              ckpt_max_timed_s=0.5, search_max_t=8, search_batches=(2,), cap_bytes=10 * 2**20,
              compile_cases=(), budget_s=100.0,
              weights={"speed-reference": 30, "speed-triton": 20, "memory": 50})

# The GPU grids at CPU sizes: exercises the ordering and budget logic of a full run on the CPU.
CPU_GRID = replace(GPU, name="cpu-grid", size=64, multiplier=0.25, depth=3, warmup=1, reps=3,
                   max_timed_s=0.3, ckpt_reps=2, ckpt_max_timed_s=0.3, cap_bytes=20 * 2**20,
                   budget_s=150.0, compile_cases=())


def pick(cuda: bool, quick: bool) -> Profile:
    if not cuda:
        return CPU
    return GPU_QUICK if quick else GPU
