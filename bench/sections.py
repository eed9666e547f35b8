"""Worker sections of the device run that time steps: the speed sweep (eager inference forward and
train step, whole-train-step CUDA graphs) and one torch.compile configuration.

Each section emits one JSON-able record per configuration through `emit` as soon as it is known, so
a worker killed at its deadline still leaves everything it measured. Every configuration runs inside
try/except: an error is recorded (with the traceback's tail) and the section goes on.
"""
from __future__ import annotations

import traceback
from typing import Callable, Optional

import torch

from .harness import (Case, Runner, capture_train_graph, cpu_peak_mib, free_memory, is_oom, median,
                      nvml_used_mib, peak_mib, reset_peak, sync, time_calls)
from .profiles import Profile
from .search import Budget, predict, step_cost

Emit = Callable[[dict], None]


def error_text(exc: BaseException, lines: int = 6) -> str:
    """'Type: message' plus the last frames: enough to find the failing line in a log."""
    tail = traceback.format_exception(type(exc), exc, exc.__traceback__)
    text = "".join(tail[-lines:]).strip()
    return text[-1500:]


def last_line(text: Optional[str]) -> str:
    lines = (text or "").strip().splitlines()
    return lines[-1] if lines else ""


def record(section: str, variant: str, case: Case, status: str, **extra) -> dict:
    return {"section": section, "variant": variant, "case": case.to_dict(), "status": status, **extra}


def cuda_alive(device: torch.device) -> Optional[str]:
    """None when the CUDA context still works, else the error (a faulting kernel poisons it)."""
    if device.type != "cuda":
        return None
    try:
        torch.cuda.synchronize(device)
        torch.zeros(1, device=device).add_(1).item()
        return None
    except Exception as exc:  # noqa: BLE001
        return f"{type(exc).__name__}: {exc}"


def measure(case: Case, variant: str, device: torch.device, warmup: int, reps: int,
            max_timed_s: float, min_reps: int = 3) -> dict:
    """Build, warm up and time one configuration. Returns the fields of a record (status ok / oom /
    error). Peak is max_memory_allocated from the model's construction to the last timed call."""
    runner, fn, out = None, None, {}
    try:
        reset_peak(device)
        runner = Runner(case, device, capturable=variant == "graph")
        fn = capture_train_graph(runner) if variant == "graph" else runner.step
        times = time_calls(fn, device, warmup, reps, max_timed_s, min_reps)
        peak = peak_mib(device) if device.type == "cuda" else cpu_peak_mib(runner)
        out = {"status": "ok", "ms": median(times), "ms_all": [round(v, 3) for v in times],
               "peak_mib": peak, "nvml_used_mib": nvml_used_mib()}
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        out = {"status": "oom" if is_oom(exc) else "error", "error": error_text(exc)}
    if runner is not None:
        runner.close()
    runner = fn = None
    free_memory(device)
    return out


def speed_plan(profile: Profile, backend: str, cuda: bool, variants: str = "all") -> list[tuple[str, Case]]:
    """Eager sweep at the first batch size, the CUDA-graph cases, then the other batch sizes:
    the configurations the official port was measured at come first, in case time runs out.
    `variants` "eager" or "graph" keeps only those (the fused backend runs them in two processes:
    a failed capture can leave the CUDA context unusable, and must not cost the eager rows)."""
    items = []
    for i, batch in enumerate(profile.batches):
        for t in profile.ts:
            for mode in ("train", "infer"):
                for dtype in profile.dtypes:
                    items.append(("eager", Case(backend, t, batch, dtype, mode, **profile.model_kwargs())))
        if i == 0 and cuda:
            items += [("graph", Case(backend, t, b, d, "train", **profile.model_kwargs()))
                      for t, b, d in profile.graph_cases]
    return [(v, c) for v, c in items if variants in ("all", v)]


def run_speed(profile: Profile, backend: str, device: torch.device, budget: Budget, emit: Emit,
              variants: str = "all") -> None:
    """The speed sweep of one backend. A backend whose blocks do not import (the fused path while it
    is being written) is recorded once per configuration without trying again."""
    series: dict[tuple, list[tuple[float, float]]] = {}
    dead: Optional[str] = None  # why every further configuration of this backend is hopeless
    for variant, case in speed_plan(profile, backend, device.type == "cuda", variants):
        key = (variant, case.mode, case.dtype, case.batch)
        est = predict(series.get(key, []), case.t)
        if est is None and variant == "graph":  # a replay is no slower than the eager step
            est = predict(series.get(("eager", "train", case.dtype, case.batch), []), case.t)
        warm = profile.warmup + (4 if variant == "graph" else 0)
        cost = step_cost(est, warm, profile.reps, profile.max_timed_s)
        if dead:
            emit(record("speed", variant, case, "error", error=dead, reason="skipped: backend failed"))
            continue
        if not budget.allows(cost):
            emit(record("speed", variant, case, "skipped", reason="skipped (budget)",
                        predicted_s=cost, left_s=round(budget.left(), 1)))
            print(f"  skipped (budget): {variant} {case.label()}", flush=True)
            continue
        if est is None:  # the first of a series may compile kernels: say what is running
            print(f"  ...    {variant} {case.label()} (first of its series)", flush=True)
        out = measure(case, variant, device, profile.warmup if variant == "eager" else 1,
                      profile.reps, profile.max_timed_s)
        rec = record("speed", variant, case, **out)
        emit(rec)
        _print(variant, case, rec, budget)
        if out["status"] == "ok":
            series.setdefault(key, []).append((case.t, out["ms"] / 1e3))
        elif out["status"] == "error":
            dead = _hopeless(out["error"], device)


def _hopeless(error: str, device: torch.device) -> Optional[str]:
    if "ModuleNotFoundError" in error or "ImportError" in error:
        return "backend does not import: " + last_line(error)
    lost = cuda_alive(device)
    if lost:
        return f"CUDA context lost after an error ({lost}); first error: {last_line(error)}"
    return None


def _print(variant: str, case: Case, rec: dict, budget: Budget) -> None:
    if rec["status"] == "ok":
        peak = rec.get("peak_mib")
        mem = f", peak {peak:.0f} MiB" if peak is not None else ""
        msg = f"{rec['ms']:.2f} ms (median of {len(rec['ms_all'])}){mem}"
    else:
        msg = f"{rec['status'].upper()}: {last_line(rec.get('error'))}"
    print(f"  {variant:6s} {case.label():38s} {msg}  [{budget.left():.0f} s left]", flush=True)


def run_compile(profile: Profile, case: Case, mode: str, device: torch.device, emit: Emit) -> None:
    """torch.compile(model, mode=mode) on one train configuration: the first step's wall time
    (compilation included), then warm-up and timed steps as in the eager sweep."""
    import time

    runner = None
    variant = f"compile-{mode}"
    try:
        reset_peak(device)
        runner = Runner(case, device)
        runner.model = torch.compile(runner.model, mode=mode)
        t0 = time.perf_counter()
        runner.step()
        sync(device)
        compile_s = time.perf_counter() - t0
        print(f"  {variant}: first step (compilation) {compile_s:.1f} s", flush=True)
        times = time_calls(runner.step, device, profile.warmup, profile.reps, profile.max_timed_s)
        peak = peak_mib(device) if device.type == "cuda" else None
        rec = record("compile", variant, case, "ok", ms=median(times), ms_all=[round(v, 3) for v in times],
                     peak_mib=peak, nvml_used_mib=nvml_used_mib(), compile_s=round(compile_s, 1))
    except Exception as exc:  # noqa: BLE001
        rec = record("compile", variant, case, "oom" if is_oom(exc) else "error", error=error_text(exc))
    emit(rec)
    _print(variant, case, rec, Budget(float("inf")))
    if runner is not None:
        runner.close()
    free_memory(device)
