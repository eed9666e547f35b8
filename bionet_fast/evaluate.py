"""Score a trained BiO-Net on a labelled dataset folder.

    python -m bionet_fast.evaluate --checkpoint runs/bionet-t5 --data DIR --out DIR

DIR holds images and their masks in one of the layouts of `python -m bionet_fast.train --help`
(MoNuSeg x/ + y/, images/ + masks/, TNBC Slide_XX/ + GT_XX/, EM TIFF stacks). Images of any size
are processed whole, in overlapping tiles (--tile-size, --overlap) blended smoothly.
Prints the scores and writes OUT/metrics.json:
  dice, iou      nuclei (foreground) overlap, predictions thresholded at 0.5, counted over all
                 pixels of all images together (as in the BiO-Net paper); *_per_image: the mean
                 of the per-image scores
  aji, pq, dq, sq, object_precision, object_recall, object_f1
                 nuclei as objects, where the masks hold instances (Aperio XML, QuPath GeoJSON,
                 instance label maps): AJI (Kumar et al. 2017), panoptic quality and object F1 at
                 IoU > 0.5, pooled over all images; *_per_image: the means of the per-image scores
                 (definitions: docs/real-data.md). Predicted objects: engine.instance_eval
  rand_f         EM membranes (TIFF stacks): foreground-restricted Rand F-score of the cells
  psnr           super-resolution, beside psnr_bicubic (the plain bicubic upsampling)
  n_images       how many images (or stack slices) were scored
and OUT/per_image.csv (segmentation): one row per image, its Dice and IoU (and object scores).
"""
from __future__ import annotations

if __name__ == "__main__":  # this program's own process only, before torch loads (never on import)
    from ._process import configure_cli_process

    configure_cli_process()

import argparse
import csv
import io
import sys
from pathlib import Path

import torch
from .utils.progress import tqdm

from .engine.prediction.writers import write_outputs
from .utils.files import atomic_write, write_json
from ._cli import (AT_LEAST_1, FRACTION, PROBABILITY, WINDOW, add_engine_arguments, check_multiple,
                   check_numbers, check_writable, inference_options, model_target, model_threshold)
from .data import SegmentationDataset
from .data.training import synthetic_heldout, uniform_sizes
from .engine.prediction.engines import inference_setup
from .engine.prediction.inference import TASKS, evaluate_loader, load_for_inference, summarize
from .engine.prediction.instance_eval import object_meter
from .engine.prediction.split import SPLITS
from .engine.precision import PRECISIONS


# --- the CLI -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bionet_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the --out folder of a training run (or a folder from save_pretrained, or an "
                        "official .pt checkpoint)")
    p.add_argument("--data", required=True, metavar="DIR",
                   help="labelled images to score; 'synthetic': the 48 held-out synthetic images the "
                        "synthetic training run validates on")
    p.add_argument("--out", metavar="DIR", help="where metrics.json (and predictions) go "
                   "(default: CHECKPOINT/eval-<data folder name>; beside a .pt file)")
    p.add_argument("--data-format", "--format", default="auto",
                   choices=("auto", "folder", "tnbc", "tiff-stack", "annotated"),
                   help="dataset layout (default: auto)")
    p.add_argument("--task", choices=TASKS, help="default: the task the checkpoint was trained for")
    p.add_argument("--sr-scale", type=int, help="super-resolution factor (default: the training one)")
    p.add_argument("--tile-size", type=int,
                   help="images are processed in overlapping tiles of this side (default: the model's, from "
                        "its config.json: 512 for reflect-padded BiO-Nets, the training crop for zero-padded "
                        "ones, else 512); smaller uses less memory")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction (default 0.25)")
    p.add_argument("--split", choices=SPLITS, default="auto",
                   help="how the object metrics (AJI, PQ, F1) separate touching nuclei, as predict --split: "
                        "default auto (watershed)")
    p.add_argument("--threshold", type=float,
                   help="nucleus where the probability exceeds this, for Dice/IoU and saved masks (default: "
                        "the model's, from its config.json; 0.5)")
    p.add_argument("--save-predictions", action="store_true",
                   help="also write each predicted mask (PNG 0/255) and probability map (16-bit PNG)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: replay a captured forward per window shape (less launch overhead); "
                        "without CUDA: a message, then eager")
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (same-size images only)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on CUDA and on CPUs with native bf16 "
                   "(AVX512-BF16 / AMX), else fp32; bf16/fp16 run channels_last")
    add_engine_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    """Score a checkpoint; returns 0, or 2 for bad input (nothing written)."""
    args = build_parser().parse_args(argv)

    try:
        check_numbers(args, NUMBERS)
        out = check_writable(Path(args.out) if args.out else default_out(args.checkpoint, args.data), "--out")
        model, device, task, scale, tile = load_for_inference(inference_options(args))
        check_multiple("--tile-size", args.tile_size, model.size_multiple, "the model's size multiple")
        ds, text, names = _dataset(args, model, task, scale)
        setup = inference_setup(model, device, args.engine, args.precision, args.threads, args.cuda_graph)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"data: {text}\nwindows: {tile}x{tile}, overlap {args.overlap}; {setup.describe()}")
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size if uniform_sizes(ds) else 1)
    loader = tqdm(loader, desc="evaluating", unit="batch", disable=args.quiet, dynamic_ncols=True, leave=False)
    rand = task == "segmentation" and getattr(ds, "fmt", None) == "tiff-stack"
    threshold = model_threshold(model, args.threshold)
    saver = _PredictionSaver(out / "predictions", names, task, threshold) if args.save_predictions else None
    objects = object_meter(threshold, objects=getattr(ds, "has_instances", False), target=model_target(model),
                           split=args.split) \
        if task == "segmentation" else None
    meters, loss_sum, n, _ = evaluate_loader(model, loader, task, device, tile, args.overlap, forward=setup.forward,
                                             rand=rand, on_batch=saver, channels_last=setup.channels_last,
                                             autocast=setup.autocast, threshold=threshold, objects=objects,
                                             target=model_target(model))
    result = summarize(meters, loss_sum, n)
    result.update(checkpoint=str(args.checkpoint), data=str(args.data), task=task, precision=setup.precision,
                  engine=setup.engine, **({"threshold": threshold} if task == "segmentation" else {}))
    write_json(out / "metrics.json", result)
    if objects is not None:
        write_per_image(out / "per_image.csv", names, objects.rows)
    keys = ("psnr", "psnr_bicubic") if task == "super-resolution" else ("dice", "iou", "rand_f", "aji", "pq",
                                                                         "object_f1")
    print("  ".join(f"{k} {result[k]:.4f}" for k in keys if k in result) + f"  ({n} images)")
    print(f"wrote {out / 'metrics.json'}" + (f" and predictions in {out / 'predictions'}" if saver else ""))
    return 0


NUMBERS = dict(batch_size=AT_LEAST_1, overlap=FRACTION, tile_size=WINDOW, sr_scale=AT_LEAST_1,
               threshold=PROBABILITY, threads=AT_LEAST_1)


def default_out(checkpoint: str, data: str) -> Path:
    """CHECKPOINT/eval-DATA for a run folder; beside the file (NAME-eval-DATA) for a .pt file."""
    ckpt, name = Path(checkpoint), Path(data).name
    if ckpt.is_dir():
        return ckpt / f"eval-{name}"
    if ckpt.is_file():
        return ckpt.with_name(f"{ckpt.stem}-eval-{name}")
    return Path(f"eval-{ckpt.name}-{name}")  # a Hub repo id: in the current folder


def _dataset(args, model, task: str, scale: int):
    """(dataset, description, names of its items) of --data (a folder, or 'synthetic')."""
    sr = scale if task == "super-resolution" else None
    if args.data == "synthetic":
        ds, text = synthetic_heldout(channels=model.config.in_channels, sr_scale=sr, instances=True)
        return ds, text, [f"synthetic{i:02d}" for i in range(len(ds))]
    ds = SegmentationDataset(args.data, args.data_format, in_channels=model.config.in_channels,
                             task=task, sr_scale=scale, train=False, return_instances=True,
                             classes=model.config.classes if task == "segmentation" and model_target(model) == "mask"
                             else 1)
    return ds, ds.describe(), [ds.samples[i].name for i, _, _ in ds.items]


def write_per_image(path: Path, names: list[str], rows: list[dict]) -> Path:
    """per_image.csv: the image's name, then the scores of its row (atomically written)."""
    columns = list(rows[0]) if rows else []
    buf = io.StringIO()
    table = csv.writer(buf, lineterminator="\n")
    table.writerow(["image", *columns])
    for name, row in zip(names, rows):
        table.writerow([name, *(f"{row[c]:.6g}" if isinstance(row[c], float) else row[c] for c in columns)])
    return atomic_write(path, lambda tmp: Path(tmp).write_text(buf.getvalue()))


class _PredictionSaver:
    """Callback of evaluate_loader writing each output under its item's name."""

    def __init__(self, folder: Path, names: list[str], task: str, threshold: float = 0.5):
        self.folder, self.names, self.task, self.i, self.threshold = folder, names, task, 0, threshold

    def __call__(self, out: torch.Tensor, count: int) -> None:
        for k in range(count):
            write_outputs(self.folder, self.names[self.i], out[k], self.task, threshold=self.threshold)
            self.i += 1


if __name__ == "__main__":
    raise SystemExit(main())
