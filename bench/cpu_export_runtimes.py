"""What each CPU runtime gives for the default model: onnxruntime (the dynamo-exported ONNX file),
TorchScript (the traced file, as QuPath loads it), eager PyTorch fp32 and eager bf16 (autocast +
channels_last, as predict runs it), one image per call at each size, in one process.

The default model is the synthetic recipe's (data/training.py, train.py): BiO-Net x0.25, depth 3,
t=5, reflection padding, reference backend, eval mode (random weights: speed does not depend on
them). Each runtime is timed on the same input: `--warmup` calls, then the median of `--repeats`;
the runtimes alternate call by call (round robin), so a load that changes during the run touches
all of them alike. The ratio is against eager fp32 of the same size in the same run; `max |diff|`
is the largest difference of the logits from eager fp32. Name the machine and its load with the
numbers (printed first).

    python -m bench.cpu_export_runtimes                      # 256 and 512, ~2-4 min on 2 cores
    python -m bench.cpu_export_runtimes --sizes 32 64 --repeats 2 --warmup 1   # a dry run
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch


def default_model() -> torch.nn.Module:
    from bionet_fast import BiONet

    torch.manual_seed(0)
    model = BiONet(3, 1, iterations=5, multiplier=0.25, depth=3, padding_mode="reflect", backend="reference")
    model.train()
    with torch.no_grad():  # non-trivial BatchNorm statistics
        model(torch.rand(4, 3, 64, 64))
    return model.eval()


def runtimes(model: torch.nn.Module, folder: Path, threads: int) -> dict[str, Callable]:
    """name -> x (1, 3, H, W) float32 -> logits float32."""
    from bionet_fast.engine.prediction.export import export
    from bionet_fast.engine.precision import autocast_context

    sizes = [(1, 3, 64, 64), (2, 3, 80, 48)]
    found = {}
    try:
        import onnxruntime as ort

        report = export(model, folder / "m.onnx", format="onnx", sizes=sizes, verify=False)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        session = ort.InferenceSession(str(folder / "m.onnx"), opts, providers=["CPUExecutionProvider"])
        found[f"onnxruntime ({report.exporter} export)"] = \
            lambda x: torch.from_numpy(session.run(None, {"image": x.numpy()})[0])
    except ImportError as err:
        print(f"onnxruntime skipped: {err}")
    export(model, folder / "m.pt", format="torchscript", sizes=sizes, verify=False)
    scripted = torch.jit.load(str(folder / "m.pt")).eval()
    found["TorchScript fp32"] = scripted
    found["eager fp32"] = model
    bf16 = default_model().to(memory_format=torch.channels_last)
    bf16.load_state_dict(model.state_dict())
    cpu = torch.device("cpu")

    def eager_bf16(x: torch.Tensor) -> torch.Tensor:
        with autocast_context("bf16", cpu):
            return bf16(x.contiguous(memory_format=torch.channels_last)).float()

    found["eager bf16 (autocast, channels_last)"] = eager_bf16
    return found


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS") or os.cpu_count() or 1))
    args = p.parse_args(argv)
    from bionet_fast.engine.precision import cpu_has_native_bf16

    torch.set_num_threads(args.threads)
    model_name = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t") \
        if os.path.exists("/proc/cpuinfo") else "unknown CPU"
    print(f"{model_name}, {os.cpu_count()} CPUs, native bf16: {cpu_has_native_bf16()}, {args.threads} thread(s), "
          f"load average {os.getloadavg()[0]:.1f}, torch {torch.__version__}")
    model = default_model()
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = time.perf_counter()
        found = runtimes(model, Path(tmp), args.threads)
        print(f"exports took {time.perf_counter() - start:.0f} s")
        print("\n| runtime | size | median ms | vs eager fp32 | max abs diff |\n|---|---|---|---|---|")
        for size in args.sizes:
            x = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(size))
            times: dict[str, list[float]] = {name: [] for name in found}
            with torch.inference_mode():
                want = model(x)
                diffs = {name: float((fn(x).float() - want).abs().max()) for name, fn in found.items()}
                for i in range(args.warmup + args.repeats):
                    for name, fn in found.items():
                        t0 = time.perf_counter()
                        fn(x)
                        if i >= args.warmup:
                            times[name].append(time.perf_counter() - t0)
            base = statistics.median(times["eager fp32"])
            for name in found:
                med = statistics.median(times[name])
                print(f"| {name} | {size}x{size} | {med * 1000:.1f} | {base / med:.2f}x | {diffs[name]:.1e} |",
                      flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
