"""How many CPU threads torch uses: its default (one per core) is the worst choice on a CPU that
another job is using. Each parallel region then waits for its slowest thread, which shares a core
with the other job. Measured on this repository's 2-core machine under heavy load (docs/cpu-threads.md): 1.2 s per training
step with one thread, 2.4 s with two passive threads, 67 s with two threads whose OpenMP runtime
spins while it waits.

Two remedies: the CLIs (train, evaluate, predict) set ``OMP_WAIT_POLICY=PASSIVE`` (unless the user
set it) for their own process before torch loads (bionet_fast/_process.py; importing the library
sets nothing), and :func:`default_threads` uses only the cores that are idle when the run starts.
"""
from __future__ import annotations

import os
import time


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; os.cpu_count() elsewhere)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def busy_cpus(interval: float = 0.25) -> float:
    """How many CPUs other processes keep busy, measured over `interval` seconds from /proc/stat
    (this process sleeps meanwhile); 0.0 where /proc/stat does not exist."""

    def sample() -> tuple[int, int]:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
        idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
        return sum(fields), idle

    try:
        total0, idle0 = sample()
        time.sleep(interval)
        total1, idle1 = sample()
    except (OSError, ValueError, IndexError):
        return 0.0
    cpus = os.cpu_count() or 1
    return cpus * (1 - (idle1 - idle0) / max(total1 - total0, 1))


def default_threads(limit: int = 8) -> int:
    """Threads for a CPU run: OMP_NUM_THREADS if set, else the usable CPUs that are idle now (at
    least 1, at most `limit`: beyond about 8 the small convolutions of these models stop getting
    faster)."""
    given = os.environ.get("OMP_NUM_THREADS", "")
    if given.isdigit() and int(given) > 0:  # the user's own choice
        return int(given)
    cpus = usable_cpus()
    return max(1, min(limit, cpus, int(cpus - busy_cpus() + 0.5)))
