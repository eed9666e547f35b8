"""bench/ in CI: the pytest-benchmark suite's CPU smoke run (in-process), the deterministic CPU memory
benchmark against its baseline, and the pure logic of the device run (bisection, budget, report,
error recording) on fakes."""
from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # bench/ is a folder of the checkout, not of the installed package

from bench import cpu_memory, report  # noqa: E402
from bench.harness import Case, is_oom, SimulatedOOM  # noqa: E402
from bench.profiles import CPU  # noqa: E402
from bench.search import Budget, describe_fit, largest_fitting, predict, share, step_cost  # noqa: E402

TINY = dict(size=64, multiplier=0.25, depth=3)


@pytest.fixture
def one_thread():
    # Tiny shapes: OpenMP threads only contend with each other on a busy 2-core host.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_benchmark_suite_cpu_smoke(tmp_path, monkeypatch):
    """`pytest bench/ --benchmark-only` runs and every benchmark carries a time and a peak."""
    if torch.cuda.is_available():  # keep CI-sized on a GPU machine too
        for name, value in (("T", "1"), ("BATCH", "2"), ("DTYPE", "fp32"), ("BACKENDS", "reference")):
            monkeypatch.setenv(f"BIONET_BENCH_{name}", value)
    out = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    start = time.perf_counter()
    rc = pytest.main([str(REPO / "bench"), "--benchmark-only", "-q", "-p", "no:cacheprovider",
                      f"--benchmark-json={out}", "--benchmark-columns=median,rounds"])
    elapsed = time.perf_counter() - start
    torch.set_num_threads(threads)
    assert rc == 0, f"bench suite failed (exit {rc})"
    benches = json.loads(out.read_text())["benchmarks"]
    names = {b["name"] for b in benches}
    expected = 2 * 1 if torch.cuda.is_available() else 2 * len(CPU.ts) * len(CPU.dtypes)
    assert len(names) == expected, names
    for b in benches:
        assert b["stats"]["median"] > 0
        assert b["extra_info"]["peak_mib"] > 0, b["name"]
        assert b["extra_info"]["mode"] in ("train", "infer")
    assert elapsed < 300, f"the smoke suite took {elapsed:.0f} s"


def test_cpu_memory_within_baseline():
    counts = cpu_memory.run()
    baseline = cpu_memory.load_baseline()
    assert cpu_memory.regressions(counts, baseline) == []
    # Checkpointing across iterations keeps the peak nearly flat in t; without it the peak grows.
    no = [counts[cpu_memory.key(t, False)] for t in cpu_memory.TS]
    ck = [counts[cpu_memory.key(t, True)] for t in cpu_memory.TS]
    assert no == sorted(no) and no[-1] > 1.5 * no[0]
    assert ck[-1] < 0.5 * no[-1]


def test_cpu_memory_regression_detected():
    base = {"t=2 ckpt=no": 1000}
    assert cpu_memory.regressions({"t=2 ckpt=no": 1099}, base) == []
    assert "above the baseline" in cpu_memory.regressions({"t=2 ckpt=no": 1101}, base)[0]
    assert "--update" in cpu_memory.regressions({"t=4 ckpt=no": 1}, base)[0]


@settings(max_examples=60, deadline=None)
@given(truth=st.integers(0, 64), hint=st.one_of(st.none(), st.integers(-3, 70)))
def test_largest_fitting_finds_the_boundary(truth, hint):
    res = largest_fitting(lambda t: t <= truth, 64, hint)
    assert res["complete"] and res["best"] == truth
    assert len(res["probes"]) <= 9  # bisection plus the hint's two
    assert len({t for t, _ in res["probes"]}) == len(res["probes"])  # no t probed twice


def test_largest_fitting_with_a_good_hint_takes_two_probes_and_stops_on_budget():
    assert len(largest_fitting(lambda t: t <= 9, 64, hint=9)["probes"]) == 2
    assert largest_fitting(lambda t: True, 64, hint=64)["probes"] == [(64, True)]
    res = largest_fitting(lambda t: t <= 40, 64, can_probe=lambda t: t < 30)
    assert not res["complete"] and res["best"] <= 40 < res["first_fail"]
    assert "stopped: budget" in describe_fit(res, 64)
    assert describe_fit({"best": 64, "first_fail": 65, "complete": True}, 64) == ">= 64"
    assert describe_fit({"best": 0, "first_fail": 1, "complete": True}, 64).startswith("0")


def test_predict_share_and_cost():
    assert predict([], 3) is None
    assert predict([(1, 10.0)], 4) == pytest.approx(40.0)
    assert predict([(1, 10.0), (3, 20.0)], 5) == pytest.approx(30.0)
    assert predict([(1, 10.0), (3, 5.0)], 5) == pytest.approx(5.0)  # no negative slope
    assert share(100.0, [1, 3], now=0.0) == pytest.approx(25.0)
    assert share(100.0, [0, 3], now=0.0) == 0.0
    assert step_cost(None, 2, 10, 1.0) is None
    assert step_cost(0.1, 2, 10, 1.5, fixed_s=0) == pytest.approx(0.2 + 1.0)
    assert not Budget(time.time() + 5).allows(10.0) and Budget(time.time() + 50).allows(10.0)


def test_oom_detection():
    assert is_oom(SimulatedOOM("x")) and is_oom(RuntimeError("CUDA out of memory. Tried to allocate"))
    assert not is_oom(ValueError("bad shape"))


def test_measure_records_errors_and_a_dead_backend_is_not_retried(monkeypatch, one_thread):
    from bench import sections

    bad = sections.measure(Case(backend="bogus", **TINY), "eager", torch.device("cpu"), 1, 2, 1.0)
    assert bad["status"] == "error" and "backend" in bad["error"]
    calls = []

    def fake_measure(case, *a, **k):
        calls.append(case)
        return {"status": "error", "error": "ModuleNotFoundError: No module named 'bionet_fast.blocks.fused'"}

    monkeypatch.setattr(sections, "measure", fake_measure)
    records = []
    sections.run_speed(CPU, "triton", torch.device("cpu"), Budget(float("inf")), records.append)
    assert len(calls) == 1 and len(records) == len(sections.speed_plan(CPU, "triton", False))
    assert all(r["status"] == "error" for r in records)
    assert "does not import" in records[-1]["error"]


def test_memory_section_on_cpu_is_consistent(one_thread):
    """Checkpoint table and simulated-cap search agree: the answer fits, the next t does not."""
    from bench.memory_sections import run_memory

    profile = replace(CPU, dtypes=("fp32",), ckpt_ts=(1, 2), ckpt_reps=1, search_max_t=4,
                      cap_bytes=9 * 2**20)
    records = []
    run_memory(profile, "reference", torch.device("cpu"), Budget(float("inf")), records.append)
    table = [r for r in records if r["section"] == "ckpt"]
    caps = {r["case"]["ckpt"]: r for r in records if r["section"] == "cap"}
    assert len(table) == 4 and all(r["status"] == "ok" for r in table)
    assert caps[False]["status"] == "ok" and 1 <= caps[False]["best"] < 4  # ~2.2 MiB per iteration
    fits = {p["t"]: p["fits"] for p in caps[False]["probes"]}
    assert fits.get(caps[False]["best"], True) and not fits.get(caps[False]["best"] + 1, False)
    assert caps[True]["result"] == ">= 4"


def test_report_renders_every_table_with_the_official_numbers():
    case = Case(**TINY).to_dict()
    recs = [
        {"section": "speed", "variant": "eager", "case": {**case, "t": 3}, "status": "ok", "ms": 12.5,
         "peak_mib": 3000.0},
        {"section": "speed", "variant": "graph", "case": {**case, "t": 3}, "status": "skipped",
         "reason": "skipped (budget)"},
        {"section": "speed", "variant": "eager", "case": {**case, "backend": "triton", "t": 3},
         "status": "error", "error": "Traceback...\nModuleNotFoundError: no fused"},
        {"section": "ckpt", "variant": "eager", "case": {**case, "t": 8, "ckpt": True}, "status": "ok",
         "ms": 190.0, "peak_mib": 1700.0},
        {"section": "cap", "variant": "cap", "case": {**case, "t": 1}, "status": "ok", "result": "9",
         "best": 9, "peak_mib": 7900.0},
    ]
    meta = {"profile": "gpu", "size": 512, "multiplier": 1.0, "depth": 4, "peak_def": "p", "elapsed_s": 1,
            "budget_s": 2, "cap_mib": 8192, "max_t": 64}
    text = report.render({"card": "X"}, meta, recs, ["- compile: skipped (--no-compile)"])
    assert "12.5 ms / 3000 MiB" in text and "39.4 ms / 3142 MiB" in text
    assert report.anchors.LABEL in text and "8 GiB cap" in text
    assert "| reference | fp32, eager | 9 (peak 7900 MiB) | 9 |" in text
    assert "190.0 ms / 1700 MiB" in text and "skipped (budget)" in text
    assert "ModuleNotFoundError: no fused" in text and "--no-compile" in text


def test_reflect_step_quick_prints_every_row(capsys, one_thread):
    """bench/reflect_step.py (run by gpu_session.sh): the CPU dry run fills its table."""
    from bench import reflect_step

    assert reflect_step.main(["--quick"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| reflect") or
            line.startswith("| zeros")]
    assert len(rows) == 4 and not any("error" in r for r in rows), rows
