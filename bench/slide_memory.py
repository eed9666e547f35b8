"""Peak host memory and windows/s of whole-image prediction: the bounded (streaming) path against
the in-memory path, on RGB tiled TIFFs of growing size, through a tiny BiO-Net on the CPU.

    python -m bench.slide_memory                          # 4000 and 8000 px sides, fp32 and bf16
    python -m bench.slide_memory --sizes 1000 --cases bounded-fp32

Each case runs in a fresh subprocess (one thread) that reports its own peak resident set size
(VmHWM from /proc/self/status) and the seconds spent predicting and writing. Cases:
  bounded-fp32 / bounded-bf16   engine.whole_slide.predict_image on a lazy TiffReader, writing
                                tiled BigTIFF mask + probability map (what predict does for TIFFs)
  in-memory-fp32                the previous predict: tifffile.imread of the whole slide, float32
                                tensor, infer() (sliding_window_inference on the whole image),
                                mask + probability written from the full arrays
  baseline                      importing torch and building the model, nothing predicted
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

CASES = ("baseline", "bounded-fp32", "bounded-bf16", "in-memory-fp32")


def make_slide(path: Path, side: int | tuple[int, int], tile: int = 256) -> None:
    """An H&E-like RGB tiled TIFF (pink background, purple blobs), written tile by tile."""
    import tifffile

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:tile, :tile]
    patterns = []
    for _ in range(8):
        t = np.empty((tile, tile, 3), np.uint8)
        t[:] = (230, 190, 215)
        for _ in range(12):
            cy, cx, r = rng.integers(0, tile, 2).tolist() + [int(rng.integers(6, 14))]
            t[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = (110, 60, 150)
        patterns.append(t)
    h, w = (side, side) if isinstance(side, int) else side
    tiles = (patterns[(i * 7 + j * 3) % 8] for i in range(-(-h // tile)) for j in range(-(-w // tile)))
    tifffile.imwrite(path, tiles, shape=(h, w, 3), dtype=np.uint8, tile=(tile, tile), photometric="rgb",
                     bigtiff=True)


def _peak_rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(case: str, slide: Path, out: Path, tile: int, overlap: float) -> dict:
    import torch

    torch.set_num_threads(1)
    from bionet_fast.engine.precision import autocast_context
    from bionet_fast.models import BiONet

    torch.manual_seed(0)
    model = BiONet(in_channels=3, classes=1, iterations=2, multiplier=0.125, depth=2, backend="reference").eval()
    result = {"case": case}
    if case == "baseline":
        return result | {"peak_rss_mib": _peak_rss_mib()}
    t0 = time.perf_counter()
    if case.startswith("bounded"):
        from bionet_fast.engine.prediction.inference import window_predictor
        from bionet_fast.engine.prediction.slide import TiffReader
        from bionet_fast.engine.prediction.streaming import StreamOptions, count_windows
        from bionet_fast.engine.prediction.whole_slide import OutputOptions, predict_image

        bf16 = case.endswith("bf16")
        if bf16:
            model = model.to(memory_format=torch.channels_last)
        run = window_predictor(model, "segmentation", autocast_context("bf16" if bf16 else "fp32", torch.device("cpu")),
                               channels_last=bf16)
        reader = TiffReader(slide)
        windows = count_windows(*reader.shape[:2], tile, overlap, model.size_multiple)
        predict_image(reader, run, 3, 1, model.size_multiple, StreamOptions(tile, overlap, 4, progress=False),
                      OutputOptions(), out, "slide", torch.device("cpu"))
    else:
        import tifffile

        from bionet_fast.data.readers import to_float
        from bionet_fast.engine.prediction.inference import infer
        from bionet_fast.engine.prediction.streaming import count_windows
        from bionet_fast.engine.prediction.writers import mask_of

        img = tifffile.imread(slide)
        x = torch.from_numpy(to_float(img).transpose(2, 0, 1).copy())[None]
        del img
        windows = count_windows(x.shape[-2], x.shape[-1], tile, overlap, model.size_multiple)
        probs = infer(model, x, "segmentation", tile, overlap)[0].numpy()
        tifffile.imwrite(out / "slide_mask.tif", mask_of(probs), compression="zlib", bigtiff=True)
        tifffile.imwrite(out / "slide_prob.tif", np.rint(probs[0] * 65535).astype(np.uint16),
                         compression="zlib", bigtiff=True)
    seconds = time.perf_counter() - t0
    return result | {"peak_rss_mib": _peak_rss_mib(), "seconds": seconds, "windows": windows,
                     "windows_per_s": windows / seconds}


def precision_ratio(reps: int = 5) -> list[dict]:
    """fp32 vs bf16 (autocast + channels_last) windows/s in ONE process, alternating, so load from
    other jobs on a shared machine hits both alike: batches of 4 windows of 256 x 256, one thread."""
    import torch

    torch.set_num_threads(1)
    from bionet_fast.engine.prediction.inference import window_predictor
    from bionet_fast.engine.precision import autocast_context
    from bionet_fast.models import BiONet

    rows = []
    for name, kw in (("x0.125 depth 2 t=2", dict(multiplier=0.125, depth=2, iterations=2)),
                     ("x0.25 depth 3 t=5 (default run)", dict(multiplier=0.25, depth=3, iterations=5)),
                     ("x1.0 depth 4 t=3 (paper)", dict(multiplier=1.0, depth=4, iterations=3))):
        model = BiONet(in_channels=3, classes=1, backend="reference", **kw).eval()
        x = torch.rand(4, 3, 256, 256)
        runs = {"fp32": window_predictor(model, "segmentation")}
        cl = BiONet(in_channels=3, classes=1, backend="reference", **kw).eval()
        cl.load_state_dict(model.state_dict())
        cl = cl.to(memory_format=torch.channels_last)
        runs["bf16"] = window_predictor(cl, "segmentation", autocast_context("bf16", torch.device("cpu")), True)
        times = {k: [] for k in runs}
        with torch.no_grad():
            out = {k: f(x) for k, f in runs.items()}  # warm-up
            for _ in range(reps):
                for k, f in runs.items():
                    t0 = time.perf_counter()
                    f(x)
                    times[k].append(time.perf_counter() - t0)
        best = {k: min(v) for k, v in times.items()}
        rows.append({"model": name, "fp32_windows_per_s": 4 / best["fp32"], "bf16_windows_per_s": 4 / best["bf16"],
                     "speedup": best["fp32"] / best["bf16"],
                     "max_abs_prob_diff": float((out["fp32"] - out["bf16"]).abs().max())})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def run_case(case: str, slide: Path, tile: int, overlap: float) -> dict:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "bench.slide_memory", "--child", case, str(slide), out,
               "--tile", str(tile), "--overlap", str(overlap)]
        env = dict(os.environ, OMP_NUM_THREADS="1")
        r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=Path(__file__).resolve().parents[1])
        if r.returncode:
            raise RuntimeError(f"{case} failed:\n{r.stderr[-3000:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])


def _machine() -> str:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.machine())
    return f"{model}, {os.cpu_count()} CPUs (shared with other jobs), 1 thread"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["4000", "8000"], help="sides, or HxW (e.g. 8000x4000)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--overlap", type=float, default=0.125)
    p.add_argument("--out", default="bench/slide_memory.json")
    p.add_argument("--child", nargs=3, metavar=("CASE", "SLIDE", "OUT"))
    p.add_argument("--precision-only", action="store_true", help="only the fp32 / bf16 windows/s ratio")
    a = p.parse_args(argv)
    if a.precision_only:
        rows = precision_ratio()
        Path(a.out).write_text(json.dumps({"machine": _machine(), "precision": rows}, indent=2) + "\n")
        return 0
    if a.child:
        print(json.dumps(child(a.child[0], Path(a.child[1]), Path(a.child[2]), a.tile, a.overlap)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            side = tuple(int(v) for v in size.split("x")) if "x" in size else int(size)
            slide = Path(tmp) / f"slide{size}.tif"
            make_slide(slide, side)
            for case in a.cases:
                row = run_case(case, slide, a.tile, a.overlap) | {"side": size}
                rows.append(row)
                print(json.dumps(row), flush=True)
            slide.unlink()
    report = {"machine": _machine(), "tile": a.tile, "overlap": a.overlap,
              "model": "BiONet x0.125 depth 2 t=2 (reference backend)", "rows": rows}
    Path(a.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
