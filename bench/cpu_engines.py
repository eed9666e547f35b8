"""CPU inference engines side by side: windows per second of torch eager fp32, torch bf16 autocast +
channels_last, onnxruntime fp32, OpenVINO fp32 (INFERENCE_PRECISION_HINT=f32) and OpenVINO bf16
hint, on the same windows in ONE process (alternating engine by engine, so load from other jobs on
a shared machine hits all alike), with the official port's eager fp32 (tests/port_layout.py, a
stand-in written from its checkpoint format) as the anchor; then a whole-slide prediction per engine,
each in its own subprocess (wall time, peak RSS).

    python -m bench.cpu_engines                      # default + paper-size model, 256 and 512, 8000 px slide
    python -m bench.cpu_engines --quick              # tiny model, 64 px windows, 512 px slide: a smoke run
    python -m bench.cpu_engines --slide-size 4000 --json bench/cpu_engines.json

Models: the default run's (the SYNTHETIC recipe of bionet_fast/train.py: x0.25, depth 3, t=5,
reflect padding) and the paper's size (x1.0, depth 4, t=3, zero padding), random weights with
non-trivial BatchNorm statistics. Per model it also reports the seconds to convert it for OpenVINO
by each route (the project's ONNX export + convert_model, and convert_model on the PyTorch module)
and the largest probability difference of every engine from torch fp32. The CPU's name and flags
are recorded.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
ENGINES = ("official port fp32", "torch fp32", "torch bf16+channels_last", "onnxruntime fp32",
           "openvino fp32", "openvino bf16")
SLIDE_ENGINES = {"torch fp32": ("torch", "fp32"), "torch bf16": ("torch", "bf16"),
                 "onnxruntime fp32": ("onnxruntime", "fp32"), "openvino fp32": ("openvino", "fp32"),
                 "openvino bf16": ("openvino", "bf16")}
MODELS = {"default (x0.25, depth 3, t=5, reflect)": dict(multiplier=0.25, depth=3, iterations=5, padding_mode="reflect"),
          "paper size (x1.0, depth 4, t=3, zeros)": dict(multiplier=1.0, depth=4, iterations=3, padding_mode="zeros")}
QUICK = {"tiny (x0.125, depth 2, t=2, reflect)": dict(multiplier=0.125, depth=2, iterations=2, padding_mode="reflect")}


def cpu_info() -> dict:
    """The CPU's name, its flags that matter to these engines, and the CPUs this process may use."""
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")),
                platform.processor() or platform.machine())
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "sse4", "vnni"))]
    return {"name": name, "flags": sorted(set(keep)), "cpus": len(os.sched_getaffinity(0)),
            "load_average_1min": os.getloadavg()[0]}


def make_model(kw: dict, seed: int = 0):
    import torch

    from bionet_fast import BiONet

    torch.manual_seed(seed)
    model = BiONet(in_channels=3, classes=1, backend="reference", **kw)
    model.train()
    with torch.no_grad():  # non-trivial running statistics
        model(torch.rand(2, 3, 2 * model.size_multiple, 2 * model.size_multiple))
    return model.eval()


def port_model(kw: dict):
    sys.path.insert(0, str(ROOT / "tests"))
    from port_layout import PortNet, randomise

    return randomise(PortNet(1, kw["iterations"], kw["multiplier"], kw["depth"])).eval()


def convert_seconds(model) -> dict:
    """Seconds (wall and this process' CPU) to convert `model` for OpenVINO by each route."""
    from bionet_fast.engine.prediction.export import reference_copy, to_openvino

    ref, out = reference_copy(model), {}
    for how in ("onnx", "pytorch"):
        w0, c0 = time.perf_counter(), time.process_time()
        to_openvino(ref, how)
        out[how] = {"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0}
    return out


def predictors(model, threads: int) -> dict:
    """engine name -> windows (N, 3, H, W) -> probabilities, all from the same weights."""
    import torch

    from bionet_fast.engine.prediction import openvino_engine as ove
    from bionet_fast.engine.prediction.engines import OnnxRuntimeForward
    from bionet_fast.engine.prediction.inference import window_predictor
    from bionet_fast.engine.precision import autocast_context

    cl = make_model({k: getattr(model.config, k) for k in ("multiplier", "depth", "iterations", "padding_mode")})
    cl.load_state_dict(model.state_dict())
    cl = cl.to(memory_format=torch.channels_last)
    return {
        "torch fp32": window_predictor(model, "segmentation"),
        "torch bf16+channels_last": window_predictor(cl, "segmentation", autocast_context("bf16", torch.device("cpu")),
                                                     channels_last=True),
        "onnxruntime fp32": window_predictor(model, "segmentation", forward=OnnxRuntimeForward(model, threads)),
        "openvino fp32": window_predictor(model, "segmentation", forward=ove.openvino_forward(model, "fp32", threads)),
        "openvino bf16": window_predictor(model, "segmentation", forward=ove.openvino_forward(model, "bf16", threads)),
    }


def time_engines(runs: dict, x, min_time: float, reps: int) -> dict:
    """Median seconds per call of every engine: one warm-up each, then rounds of one call per engine
    (alternating) until every engine has `reps` calls and `min_time` seconds have passed."""
    import torch

    times = {k: [] for k in runs}
    with torch.no_grad():
        outs = {k: f(x) for k, f in runs.items()}
        start = time.perf_counter()
        while min(len(v) for v in times.values()) < reps or time.perf_counter() - start < min_time:
            for k, f in runs.items():
                t0 = time.perf_counter()
                f(x)
                times[k].append(time.perf_counter() - t0)
            if min(len(v) for v in times.values()) >= 50:
                break
    ref = outs["torch fp32"]
    return {k: {"median_s": float(np.median(v)), "calls": len(v),
                "max_prob_diff": float((outs[k].float() - ref).abs().max()) if k != "official port fp32" else None}
            for k, v in times.items()}


def window_rows(models: dict, sides: list[int], batch: int, threads: int, min_time: float, reps: int) -> list[dict]:
    import torch

    torch.set_num_threads(threads)
    rows = []
    for name, kw in models.items():
        model = make_model(kw)
        conv = convert_seconds(model)
        print(json.dumps({"model": name, "convert": conv}), flush=True)
        runs = predictors(model, threads)
        port = port_model(kw)
        runs = {"official port fp32": lambda w, p=port: p(w), **runs}  # the port ends in its sigmoid
        for side in sides:
            x = torch.rand(batch, 3, side, side, generator=torch.Generator().manual_seed(side))
            result = time_engines(runs, x, min_time, reps)
            base = result["torch fp32"]["median_s"]
            for engine, r in result.items():
                rows.append({"model": name, "side": side, "batch": batch, "engine": engine, **r,
                             "windows_per_s": batch / r["median_s"], "vs_torch_fp32": base / r["median_s"],
                             "vs_official_port": result["official port fp32"]["median_s"] / r["median_s"]})
                print(json.dumps(rows[-1]), flush=True)
        rows.append({"model": name, "convert": conv})
    return rows


# --- whole slide, one subprocess per engine --------------------------------------------------------
def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def slide_child(engine: str, precision: str, slide: Path, out: Path, kw: dict, tile: int, overlap: float,
                batch: int, threads: int) -> dict:
    """Predict `slide` as predict does (streaming, tiled BigTIFF outputs) with one engine."""
    import torch

    from bionet_fast.engine.prediction.engines import inference_setup
    from bionet_fast.engine.prediction.inference import window_predictor
    from bionet_fast.engine.prediction.slide import TiffReader
    from bionet_fast.engine.prediction.streaming import StreamOptions, count_windows
    from bionet_fast.engine.prediction.whole_slide import OutputOptions, predict_image

    cpu = torch.device("cpu")
    model = make_model(kw)
    t0 = time.perf_counter()
    setup = inference_setup(model, cpu, engine, precision, threads)
    run = window_predictor(model, "segmentation", setup.autocast, setup.channels_last, setup.forward)
    t1 = time.perf_counter()
    reader = TiffReader(slide)
    windows = count_windows(*reader.shape[:2], tile, overlap, model.size_multiple)
    predict_image(reader, run, 3, 1, model.size_multiple, StreamOptions(tile, overlap, batch, progress=False),
                  OutputOptions(), out, "slide", cpu)
    seconds = time.perf_counter() - t1
    return {"engine": setup.engine, "precision": setup.precision, "setup_s": t1 - t0, "predict_s": seconds,
            "windows": windows, "windows_per_s": windows / seconds, "peak_rss_mib": _peak_rss_mib()}


def slide_rows(kw: dict, side: int, tile: int, overlap: float, batch: int, threads: int) -> list[dict]:
    from bench.slide_memory import make_slide

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        slide = Path(tmp) / "slide.tif"
        make_slide(slide, side)
        for label, (engine, precision) in SLIDE_ENGINES.items():
            out = Path(tmp) / label.replace(" ", "_")
            out.mkdir()
            cmd = [sys.executable, "-m", "bench.cpu_engines", "--slide-child", engine, precision, str(slide), str(out),
                   "--model-json", json.dumps(kw), "--tile", str(tile), "--overlap", str(overlap),
                   "--batch", str(batch), "--threads", str(threads)]
            r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ))
            if r.returncode:
                raise RuntimeError(f"{label} failed:\n{r.stderr[-3000:]}")
            rows.append({"case": label, "side": side, **json.loads(r.stdout.strip().splitlines()[-1])})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict], slides: list[dict]) -> str:
    lines = ["| model | engine | " + " | ".join(f"{s}x{s} windows/s (x torch fp32, x port)" for s in
                                                 sorted({r["side"] for r in rows if "side" in r})) + " | max prob diff |"]
    lines.append("|" + "---|" * (lines[0].count("|") - 1))
    for model in dict.fromkeys(r["model"] for r in rows):
        for engine in ENGINES:
            cells = [r for r in rows if r.get("model") == model and r.get("engine") == engine]
            if not cells:
                continue
            diff = max((c["max_prob_diff"] for c in cells if c["max_prob_diff"] is not None), default=None)
            lines.append(f"| {model} | {engine} | " + " | ".join(
                f"{c['windows_per_s']:.2f} ({c['vs_torch_fp32']:.2f}x, {c['vs_official_port']:.2f}x)" for c in cells)
                + f" | {'-' if diff is None else f'{diff:.4f}'} |")
    if slides:
        lines += ["", "| whole slide | engine | setup s | predict s | windows/s | peak RSS MiB |", "|---|---|---|---|---|---|"]
        lines += [f"| {s['side']}x{s['side']} | {s['case']} | {s['setup_s']:.1f} | {s['predict_s']:.1f} | "
                  f"{s['windows_per_s']:.2f} | {s['peak_rss_mib']:.0f} |" for s in slides]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny model, 64 px windows, 512 px slide (a smoke run)")
    p.add_argument("--sides", type=int, nargs="+", help="window sides (default 256 512)")
    p.add_argument("--batch", type=int, default=1, help="windows per call (default 1)")
    p.add_argument("--threads", type=int, help="CPU threads of every engine (default: the CPUs this process may use)")
    p.add_argument("--min-time", type=float, default=3.0, help="seconds of timed rounds per window size")
    p.add_argument("--reps", type=int, default=5, help="timed calls per engine at least")
    p.add_argument("--slide-size", type=int, help="side of the whole-slide run (default 8000; 0 = none)")
    p.add_argument("--tile", type=int, default=512, help="whole-slide window (default 512)")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--slide-child", nargs=4, help=argparse.SUPPRESS)
    p.add_argument("--model-json", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    threads = a.threads or len(os.sched_getaffinity(0))
    if a.slide_child:
        engine, precision, slide, out = a.slide_child
        print(json.dumps(slide_child(engine, precision, Path(slide), Path(out), json.loads(a.model_json), a.tile,
                                     a.overlap, a.batch, threads)))
        return 0
    # one cache folder for this run: the slide subprocesses reuse the conversions of the window runs
    cache = tempfile.TemporaryDirectory(prefix="bionet-bench-openvino-")
    os.environ["BIONET_FAST_OPENVINO_CACHE"] = cache.name
    models = QUICK if a.quick else MODELS
    sides = a.sides or ([64] if a.quick else [256, 512])
    slide_side = a.slide_size if a.slide_size is not None else (512 if a.quick else 8000)
    tile = 64 if a.quick else a.tile
    info = cpu_info()
    print(json.dumps({"cpu": info, "threads": threads}), flush=True)
    rows = window_rows(models, sides, a.batch, threads, 0.2 if a.quick else a.min_time, 2 if a.quick else a.reps)
    slides = slide_rows(next(iter(models.values())), slide_side, tile, a.overlap, 4, threads) if slide_side else []
    print(f"\nCPU: {info['name']}, {info['cpus']} CPUs, {threads} thread(s), load {info['load_average_1min']:.1f}; "
          f"flags: {' '.join(info['flags'])}\n")
    print(table([r for r in rows if "engine" in r], slides))
    for r in rows:
        if "convert" in r:
            c = r["convert"]
            print(f"convert {r['model']}: via ONNX {c['onnx']['wall_s']:.1f} s (CPU {c['onnx']['cpu_s']:.1f} s), "
                  f"from the PyTorch module {c['pytorch']['wall_s']:.1f} s (CPU {c['pytorch']['cpu_s']:.1f} s)")
    if a.json:
        Path(a.json).write_text(json.dumps({"cpu": info, "threads": threads, "windows": rows, "slide": slides},
                                           indent=2) + "\n")
        print(f"wrote {a.json}")
    cache.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
