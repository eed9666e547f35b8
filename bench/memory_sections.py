"""Worker sections of the device run that measure memory.

* checkpoint table (issue 3): peak memory and train-step time for t in profile.ckpt_ts, batch x
  precision, with and without BiONet(checkpoint_iters=True). Run t-major (every series at t=1, then
  every series at t=3, ...) so that a tight budget cuts the largest t, and each series' earlier
  points predict the next one's memory and time (skipped when over the card or the budget).
* the cap search: the largest t (bisection on 1..64) whose second train step succeeds under
  torch.cuda.set_per_process_memory_fraction(8 GiB / total). On the CPU the cap is simulated with
  the deterministic count of bionet_fast.peak_step_memory so the same logic runs in CI.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

from .harness import (MIB, Case, Runner, SimulatedOOM, cpu_peak_mib, free_memory, is_oom, peak_mib,
                      reset_peak, sync)
from .profiles import Profile
from .search import Budget, describe_fit, largest_fitting, predict, share, step_cost
from .sections import Emit, error_text, last_line, measure, record

def run_memory(profile: Profile, backend: str, device: torch.device, budget: Budget, emit: Emit) -> None:
    table = Budget(share(budget.deadline, [55, 45]))
    points: dict = {}
    try:
        points = run_ckpt_table(profile, backend, device, table, emit)
    except Exception as exc:  # noqa: BLE001 - the cap search can still run (without hints)
        print(f"  checkpoint table failed: {error_text(exc)}", flush=True)
        emit({"section": "worker", "status": "error", "worker": "ckpt table", "error": error_text(exc)})
    run_cap_search(profile, backend, device, budget, emit, points)


def _card_mib(device: torch.device) -> Optional[float]:
    return torch.cuda.get_device_properties(device).total_memory / MIB if device.type == "cuda" else None


def run_ckpt_table(profile: Profile, backend: str, device: torch.device, budget: Budget,
                   emit: Emit) -> dict:
    """Returns {(ckpt, dtype, batch): {"mem": [(t, MiB)], "time": [(t, s)]}} for the cap search."""
    card = _card_mib(device)
    points: dict = {}
    stopped: set = set()  # series that ran out of memory: larger t will too
    for t, (ckpt, dtype, batch) in ckpt_plan(profile):
            key = (ckpt, dtype, batch)
            pts = points.setdefault(key, {"mem": [], "time": []})
            case = Case(backend, t, batch, dtype, "train", ckpt=ckpt, **profile.model_kwargs())
            mem, step_s = predict(pts["mem"], t), predict(pts["time"], t)
            cost = step_cost(step_s, 1, profile.ckpt_reps, profile.ckpt_max_timed_s, min_reps=2)
            reason = None
            if key in stopped or (card and mem and mem > 0.92 * card):
                reason = f"skipped (card: predicted {mem:.0f} MiB)" if mem else "skipped (card)"
            elif not budget.allows(cost):
                reason = "skipped (budget)"
            if reason:
                emit(record("ckpt", "eager", case, "skipped", reason=reason, predicted_s=cost,
                            predicted_mib=mem))
                print(f"  {reason}: {case.label()}", flush=True)
                continue
            out = measure(case, "eager", device, 1, profile.ckpt_reps, profile.ckpt_max_timed_s, min_reps=2)
            emit(record("ckpt", "eager", case, **out))
            if out["status"] == "ok":
                pts["mem"].append((t, out["peak_mib"]))
                pts["time"].append((t, out["ms"] / 1e3))
                print(f"  ckpt   {case.label():38s} {out['ms']:.1f} ms, peak {out['peak_mib']:.0f} MiB"
                      f"  [{budget.left():.0f} s left]", flush=True)
            else:
                stopped.add(key)
                print(f"  ckpt   {case.label():38s} {out['status'].upper()}: "
                      f"{last_line(out.get('error'))}", flush=True)
    return points


def ckpt_plan(profile: Profile, big: int = 16) -> list[tuple[int, tuple]]:
    """(t, series) in run order: every series up to t=big, t-major; then the checkpointed rows
    above it (smallest batch first), and last the rows without checkpointing above it, whose
    memory and time are linear in t and best predicted from the smaller t (the budget cuts them)."""
    series = _series(profile, profile.ckpt_batches)
    small = min(profile.ckpt_batches)
    ts_small = [t for t in profile.ckpt_ts if t <= big]
    ts_big = [t for t in profile.ckpt_ts if t > big]
    return ([(t, s) for t in ts_small for s in series]
            + [(t, s) for s in series if s[0] and s[2] == small for t in ts_big]
            + [(t, s) for s in series if s[0] and s[2] != small for t in ts_big]
            + [(t, s) for t in ts_big for s in series if not s[0]])


def _series(profile: Profile, batches: tuple) -> list:
    """(checkpoint_iters, precision, batch), checkpointed and bf16 first: the rows that matter most
    at large t."""
    return [(c, d, b) for c in (True, False) for b in batches for d in ("bf16", "fp32")
            if d in profile.dtypes]


def hint_from(points: list[tuple[float, float]], cap_mib: float, max_t: int) -> Optional[int]:
    """The largest t whose peak, interpolated from measured (t, MiB) points, stays under 95% of the
    cap: where bisection on the real cap should look first."""
    if not points:
        return None
    limit = 0.95 * cap_mib
    best = 1  # even t=1 looks too big: probe it first, the answer is small
    for t in range(1, max_t + 1):
        below = [p for p in points if p[0] <= t]
        above = [p for p in points if p[0] > t]
        if below and above:  # interpolate between the neighbours
            (ta, ma), (tb, mb) = max(below), min(above)
            est = ma + (mb - ma) * (t - ta) / (tb - ta)
        else:
            est = predict(below or points, t)
        if est is not None and est <= limit:
            best = t
    return best


def run_cap_search(profile: Profile, backend: str, device: torch.device, budget: Budget, emit: Emit,
                   points: dict) -> None:
    cuda = device.type == "cuda"
    cap_mib = profile.cap_bytes / MIB
    if cuda:
        free_memory(device)
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, profile.cap_bytes / total), device)
    try:
        # cheap searches first: without checkpointing the answers (and the probes) are small
        searches = sorted(_series(profile, profile.search_batches), key=lambda s: (s[0], s[2]))
        for ckpt, dtype, batch in searches:
            pts = points.get((ckpt, dtype, batch), {"mem": [], "time": []})
            try:
                _one_search(profile, backend, device, budget, emit, ckpt, dtype, batch, pts, cap_mib)
            except Exception as exc:  # noqa: BLE001 - a bug in one search must not end the others
                base = Case(backend, 1, batch, dtype, "train", ckpt=ckpt, **profile.model_kwargs())
                emit(record("cap", "cap", base, "error", error=error_text(exc)))
    finally:
        if cuda:
            torch.cuda.set_per_process_memory_fraction(1.0, device)
            free_memory(device)


def _one_search(profile, backend, device, budget, emit, ckpt, dtype, batch, pts, cap_mib) -> None:
    base = Case(backend, 1, batch, dtype, "train", ckpt=ckpt, **profile.model_kwargs())
    hint = hint_from(pts["mem"], cap_mib, profile.search_max_t)
    measured = hint is not None  # a hint from measured peaks: its neighbour is the next best guess
    if hint is None and ckpt:
        hint = profile.search_max_t  # checkpointing is expected to reach the top: try it first
    log: list = []

    def cost(t: int) -> Optional[float]:
        step_s = predict(pts["time"], t)
        return None if step_s is None else 1.0 + 2 * step_s

    def fits(t: int) -> bool:
        ok, peak, secs = probe(base, t, device, profile.cap_bytes)
        log.append({"t": t, "fits": ok, "peak_mib": peak, "s": round(secs, 2)})
        label = Case(**{**base.to_dict(), "t": t}).label()
        print(f"  cap    {label:38s} {'fits' if ok else 'OOM'}"
              f"{f', peak {peak:.0f} MiB' if peak else ''} ({secs:.1f} s)  [{budget.left():.0f} s left]",
              flush=True)
        return ok

    try:
        if not budget.allows(cost(hint or 1)):
            raise _Budget
        res = largest_fitting(fits, profile.search_max_t, hint, lambda t: budget.allows(cost(t)), measured)
    except _Budget:
        emit(record("cap", "cap", base, "skipped", reason="skipped (budget)", probes=log))
        print(f"  skipped (budget): cap search {base.label()}", flush=True)
        return
    except Exception as exc:  # noqa: BLE001
        emit(record("cap", "cap", base, "error", error=error_text(exc), probes=log))
        return
    best_peak = next((p["peak_mib"] for p in log if p["t"] == res["best"] and p["fits"]), None)
    emit(record("cap", "cap", base, "ok", result=describe_fit(res, profile.search_max_t),
                best=res["best"], first_fail=res["first_fail"], complete=res["complete"], hint=hint,
                probes=log, peak_mib=best_peak, cap_mib=cap_mib))


class _Budget(Exception):
    pass


def probe(base: Case, t: int, device: torch.device, cap_bytes: int) -> tuple[bool, Optional[float], float]:
    """Two train steps at iterations=t; the second one's peak is measured. An OOM is caught and
    everything freed before returning, so it does not poison later probes. Other errors raise."""
    case = Case(**{**base.to_dict(), "t": t})
    runner, ok, peak, err = None, False, None, None
    t0 = time.perf_counter()
    try:
        free_memory(device)
        runner = Runner(case, device)
        runner.step()
        sync(device)
        if device.type == "cuda":
            reset_peak(device)
            runner.step()
            peak = peak_mib(device)
        else:  # the simulated cap: the deterministic CPU count of the second step
            peak = cpu_peak_mib(runner)
            if peak * MIB > cap_bytes:
                raise SimulatedOOM(f"{peak:.1f} MiB over the simulated cap")
        ok = True
    except Exception as exc:  # noqa: BLE001
        if not is_oom(exc):
            err = error_text(exc)
    if runner is not None:
        runner.close()
    runner = None
    free_memory(device)
    if err:
        raise RuntimeError(err)
    return ok, peak if ok else None, time.perf_counter() - t0
