"""Process-wide settings that only the command-line programs make, for their own process.

Importing the library changes nothing in the environment; `python -m bionet_fast.train` (and
evaluate, predict) call :func:`configure_cli_process` at the top of their module, before torch
loads its OpenMP runtime, which reads OMP_WAIT_POLICY once, when it starts.
"""
from __future__ import annotations

import os


def configure_cli_process() -> None:
    """OMP_WAIT_POLICY=PASSIVE unless the user set it: OpenMP threads that spin while they wait make
    torch many times slower on a CPU another job is using (engine/cpu_threads.py, docs/cpu-threads.md)."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
