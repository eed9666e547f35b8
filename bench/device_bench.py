"""The device run: every benchmark of bench/ in one command under a time budget.

    python -u -m bench.device_bench OUTDIR [--quick] [--no-compile] [--max-autotune] [--budget S]
    (bash bench/run_device.sh OUTDIR ... wraps this: it makes the package importable first)

The orchestrator (this process never touches CUDA) runs each section in a worker subprocess, so a
faulting kernel, a hang or a slow compilation costs only its own section: the worker gets a deadline
it checks before every configuration, and is killed shortly after it. Sections, in order, each with a
share of the time left (time a section does not use passes to the next ones):
  speed-reference  eager sweep (inference forward, train step) + whole-step CUDA graphs
  speed-triton     the same for the fused backend (errors recorded, the run goes on)
  memory           checkpoint table, then the largest t under an 8 GiB cap (reference backend)
  compile          torch.compile (default; max-autotune with --max-autotune), one process per case
Writes OUTDIR/results.json, OUTDIR/results.md (also printed last) and PNG plots.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

from .profiles import CPU, CPU_GRID, GPU, GPU_QUICK, pick
from .search import share

REPO = Path(__file__).resolve().parents[1]
PROFILES = {p.name: p for p in (GPU, GPU_QUICK, CPU, CPU_GRID)}
REPORT_RESERVE_S = 10.0  # writing results and plots after the last section
GRACE_S = 20.0  # a worker may overrun its deadline by the configuration in flight


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("outdir", nargs="?", help="folder for results.md, results.json and plots")
    p.add_argument("--quick", action="store_true",
                   help="smaller grids and budget, no compile (GPU); CPU runs are tiny anyway")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile comparators (slow)")
    p.add_argument("--max-autotune", action="store_true", help="also torch.compile(mode='max-autotune')")
    p.add_argument("--budget", type=float, help="seconds for the whole run (default: the profile's)")
    p.add_argument("--started-at", type=float, help="time.time() when the wrapper started (budget origin)")
    p.add_argument("--backends", help="speed sections, comma-separated (default: reference,triton on CUDA; "
                   "reference on the CPU, where triton's interpreter is far too slow for a dry run)")
    p.add_argument("--memory-backends", default="reference",
                   help="backends of the memory sections (checkpoint table, cap search), comma-separated; "
                        "each is a section of its own with the same share of time")
    # worker mode (used by the orchestrator)
    p.add_argument("--worker", choices=["speed", "memory", "compile"], help=argparse.SUPPRESS)
    p.add_argument("--backend", help=argparse.SUPPRESS)
    p.add_argument("--profile", choices=sorted(PROFILES),
                   help="override the grid (default: gpu, gpu-quick with --quick, cpu without CUDA)")
    p.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    p.add_argument("--jsonl", help=argparse.SUPPRESS)
    p.add_argument("--case", help=argparse.SUPPRESS)
    p.add_argument("--mode", help=argparse.SUPPRESS)
    p.add_argument("--variants", default="all", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if not args.worker and not args.outdir:
        p.error("OUTDIR is required")
    return args


# --- worker -------------------------------------------------------------------------------------
def worker(args: argparse.Namespace) -> int:
    from .harness import ensure_importable

    with open(args.jsonl, "a") as sink:
        def emit(rec: dict) -> None:
            sink.write(json.dumps(rec, default=str) + "\n")
            sink.flush()

        try:
            ensure_importable()
            import torch

            from .harness import Case, default_device, environment
            from .search import Budget

            device = default_device()
            if device.type == "cpu":  # tiny shapes: one thread avoids OpenMP contention on a busy host
                torch.set_num_threads(1)
            emit({"section": "env", **environment()})
            profile, budget = PROFILES[args.profile], Budget(args.deadline)
            if args.worker == "speed":
                from .sections import run_speed

                run_speed(profile, args.backend, device, budget, emit, args.variants)
            elif args.worker == "memory":
                from .memory_sections import run_memory

                run_memory(profile, args.backend, device, budget, emit)
            else:
                from .sections import run_compile

                run_compile(profile, Case(**json.loads(args.case)), args.mode, device, emit)
        except Exception:  # noqa: BLE001 - logged; the orchestrator keeps what was emitted
            text = traceback.format_exc()
            print(text, file=sys.stderr, flush=True)
            emit({"section": "worker", "status": "error", "worker": args.worker, "error": text[-1500:]})
            return 1
    return 0


# --- orchestrator -------------------------------------------------------------------------------
def spawn(name: str, argv: list[str], profile_name: str, deadline: float, timeout: float,
          tmp: Path, cuda: bool) -> tuple[list[dict], list[str]]:
    """Run one worker; returns its records and notes (a kill, a crash)."""
    path = tmp / f"{name}.jsonl"
    cmd = [sys.executable, "-u", "-m", "bench.device_bench", "--worker", *argv, "--profile", profile_name,
           "--deadline", str(deadline), "--jsonl", str(path)]
    env = os.environ.copy()
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    if not cuda:
        env.setdefault("TRITON_INTERPRET", "1")
    notes, t0 = [], time.time()
    print(f"\n=== {name}: {deadline - t0:.0f} s (hard stop in {timeout:.0f} s)", flush=True)
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True)
    try:
        rc = proc.wait(timeout=max(1.0, timeout))
        if rc != 0:
            notes.append(f"- {name}: worker exited with code {rc} after {time.time() - t0:.0f} s "
                         "(records so far kept)")
    except subprocess.TimeoutExpired:
        _kill(proc)
        notes.append(f"- {name}: worker killed at its hard stop after {time.time() - t0:.0f} s "
                     "(records so far kept)")
    print(f"=== {name}: done in {time.time() - t0:.0f} s", flush=True)
    return _read(path), notes


def _kill(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except (subprocess.TimeoutExpired, ProcessLookupError, PermissionError):
            continue


def _read(path: Path) -> list[dict]:
    out = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass  # a line cut by a kill
    return out


def compile_jobs(args, profile, deadline: float, tmp: Path, cuda: bool) -> tuple[list[dict], list[str]]:
    from .harness import Case

    modes = ["default"] + (["max-autotune"] if args.max_autotune else [])
    records, notes = [], []
    if args.no_compile or not cuda or not profile.compile_cases:
        why = "--no-compile" if args.no_compile else ("no CUDA" if not cuda else "not in this profile")
        return [], [f"- compile: skipped ({why})"]
    for mode in modes:
        for t, batch, dtype in profile.compile_cases:
            case = Case("reference", t, batch, dtype, "train", **profile.model_kwargs())
            need = profile.compile_min_s * (2 if mode == "max-autotune" else 1)
            left = deadline - time.time()
            if left < need:
                records.append({"section": "compile", "variant": f"compile-{mode}", "case": case.to_dict(),
                                "status": "skipped", "reason": "skipped (budget)"})
                print(f"  skipped (budget): compile-{mode} {case.label()} ({left:.0f} s left, "
                      f"needs {need:.0f})", flush=True)
                continue
            recs, n = spawn(f"compile-{mode}-{dtype}-t{t}-b{batch}",
                            ["compile", "--case", json.dumps(case.to_dict()), "--mode", mode],
                            profile.name, deadline, left - 2, tmp, cuda)
            if not any(r.get("section") == "compile" for r in recs):
                recs.append({"section": "compile", "variant": f"compile-{mode}", "case": case.to_dict(),
                             "status": "error", "error": f"no result within {left - 2:.0f} s (killed)"})
            records += recs
            notes += n
    return records, notes


def orchestrate(args: argparse.Namespace) -> int:
    start = args.started_at or time.time()
    import torch  # only to ask whether CUDA exists: no context is created here

    cuda = torch.cuda.is_available()
    profile = PROFILES[args.profile] if args.profile else pick(cuda, args.quick)
    budget_s = args.budget or profile.budget_s
    deadline = start + budget_s - REPORT_RESERVE_S
    outdir = Path(args.outdir).resolve()
    outdir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="bionet_bench_"))
    print(f"device_bench: profile {profile.name}, budget {budget_s:.0f} s "
          f"({deadline - time.time():.0f} s left for measuring), output {outdir}", flush=True)
    backends = args.backends or ("reference,triton" if cuda else "reference")
    plan = []
    for b in [b for b in backends.split(",") if b]:
        if b == "reference" or not cuda:
            plan.append((f"speed-{b}", ["speed", "--backend", b]))
        else:  # eager and graph rows in separate processes (see sections.speed_plan)
            plan += [(f"speed-{b}", ["speed", "--backend", b, "--variants", "eager"]),
                     (f"graph-{b}", ["speed", "--backend", b, "--variants", "graph"])]
    plan += [(f"memory-{b}", ["memory", "--backend", b]) for b in args.memory_backends.split(",") if b]
    plan += [("compile", None)]
    compiling = cuda and not args.no_compile and bool(profile.compile_cases)
    # The first compile case gets its time reserved up front; the sections before it share the rest.
    reserve = profile.compile_min_s if compiling else 0.0
    weights = [profile.weights.get(name.split("-")[0] if name.startswith(("memory", "graph")) else name, 50)
               for name, argv in plan if argv is not None]
    records, notes = [], []
    if not args.backends and not cuda:
        notes.append("- speed-triton: not run on the CPU (the interpreter is too slow; "
                     "--backends reference,triton tries it)")
    for i, (name, argv) in enumerate(plan):
        try:
            if argv is None:
                recs, n = compile_jobs(args, profile, deadline, tmp, cuda)
            else:
                sec_deadline = share(deadline - reserve, weights[i:])
                if sec_deadline - time.time() < 5:
                    recs, n = [], [f"- {name}: skipped (budget): {sec_deadline - time.time():.0f} s left"]
                    print(n[0], flush=True)
                else:
                    hard = min(sec_deadline + GRACE_S, deadline - reserve + 5) - time.time()
                    recs, n = spawn(name, argv, profile.name, sec_deadline, hard, tmp, cuda)
            records += recs
            notes += n
        except Exception:  # noqa: BLE001 - one section's failure must not end the run
            notes.append(f"- {name}: orchestrator error: {traceback.format_exc().splitlines()[-1]}")
            traceback.print_exc()
    return finish(args, profile, records, notes, outdir, start, budget_s, cuda)


def finish(args, profile, records, notes, outdir: Path, start: float, budget_s: float, cuda: bool) -> int:
    from . import anchors, report

    envs = [r for r in records if r.get("section") == "env"]
    env = next((e for e in envs if e.get("cuda_available")), envs[0] if envs else {})
    if not env:
        try:
            from .harness import environment

            env = environment()
        except Exception:  # noqa: BLE001
            env = {"card": "unknown"}
    data = [r for r in records if r.get("section") not in ("env",)]
    for r in data:
        if r.get("section") == "worker":
            notes.append(f"- worker {r.get('worker')} crashed: {r['error'].strip().splitlines()[-1]}")
    meta = {"profile": profile.name, "size": profile.size, "multiplier": profile.multiplier,
            "depth": profile.depth, "elapsed_s": time.time() - start, "budget_s": budget_s,
            "cap_mib": profile.cap_bytes / 2**20,
            "max_t": profile.search_max_t,
            "peak_def": "torch.cuda.max_memory_allocated, absolute, from model construction to the last "
                        "timed call" if cuda else "the CPU count of bionet_fast.peak_step_memory "
                        "(one step's activations and grads; params excluded; cap simulated)",
            "args": vars(args)}
    data = [r for r in data if r.get("section") != "worker"]
    (outdir / "results.json").write_text(json.dumps(
        {"env": env, "meta": meta, "notes": notes, "records": data,
         "anchors": {"label": anchors.LABEL, "train": [list(k) + list(v) for k, v in anchors.TRAIN.items()],
                     "infer_fp32_b2": anchors.INFER_FP32_B2,
                     "cap_8gib": [list(k) + [v] for k, v in anchors.CAP_8GIB.items()]}},
        indent=1, default=str))
    files = ["results.json"]
    try:
        from .plots import write_plots

        files += write_plots(data, outdir, str(env.get("card")))
    except Exception:  # noqa: BLE001
        notes.append(f"- plots failed: {traceback.format_exc().strip().splitlines()[-1]}")
    meta["elapsed_s"] = time.time() - start
    try:
        text = report.render(env, meta, data, notes)
    except Exception:  # noqa: BLE001 - never lose the numbers: results.json has them all
        traceback.print_exc()
        text = "# bionet_fast device benchmark\n\nreport rendering failed; records:\n\n" + "\n".join(
            f"- {r.get('section')} {r.get('variant')} {r.get('case')} {r.get('status')} ms={r.get('ms')} "
            f"peak={r.get('peak_mib')} {r.get('result', '')}" for r in data)
    (outdir / "results.md").write_text(text)
    files.append("results.md")
    print(f"\nwrote {', '.join(files)} to {outdir}\n", flush=True)
    print(text, flush=True)
    return 0


def main(argv=None) -> int:
    args = parse(argv)
    return worker(args) if args.worker else orchestrate(args)


if __name__ == "__main__":
    sys.exit(main())
