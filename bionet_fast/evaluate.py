"""Score a trained BiO-Net on a labelled dataset folder.

    python -m bionet_fast.evaluate --checkpoint runs/bionet-t5 --data DIR --out DIR

DIR holds images and their masks in one of the layouts of `python -m bionet_fast.train --help`
(MoNuSeg x/ + y/, images/ + masks/, TNBC Slide_XX/ + GT_XX/, EM TIFF stacks). Images of any size
are processed whole, in overlapping tiles (--tile-size, --overlap) blended smoothly.
Prints the scores and writes OUT/metrics.json:
  dice, iou      nuclei (foreground) overlap, predictions thresholded at 0.5, counted over all
                 pixels of all images together (as in the BiO-Net paper); *_per_image: the mean
                 of the per-image scores
  rand_f         EM membranes (TIFF stacks): foreground-restricted Rand F-score of the cells
  psnr           super-resolution, beside psnr_bicubic (the plain bicubic upsampling)
  n_images       how many images (or stack slices) were scored
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from .engine.writers import write_outputs
from .utils.files import write_json
from ._cli import inference_options
from .engine.inference import TASKS, evaluate_loader, load_for_inference, summarize


# --- the CLI -------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bionet_fast.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the --out folder of a training run (or a folder from save_pretrained, or an "
                        "official .pt checkpoint)")
    p.add_argument("--data", required=True, metavar="DIR", help="labelled images to score")
    p.add_argument("--out", metavar="DIR", help="where metrics.json (and predictions) go "
                   "(default: CHECKPOINT/eval-<data folder name>)")
    p.add_argument("--data-format", "--format", default="auto",
                   choices=("auto", "folder", "tnbc", "tiff-stack"), help="dataset layout (default: auto)")
    p.add_argument("--task", choices=TASKS, help="default: the task the checkpoint was trained for")
    p.add_argument("--sr-scale", type=int, help="super-resolution factor (default: the training one)")
    p.add_argument("--tile-size", type=int,
                   help="images are processed in overlapping tiles of this side (default: the training "
                        "--image-size, else 512); smaller uses less memory")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction (default 0.25)")
    p.add_argument("--save-predictions", action="store_true",
                   help="also write each predicted mask (PNG 0/255) and probability map (16-bit PNG)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    p.add_argument("--batch-size", type=int, default=1, help="images per batch (same-size images only)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .data import SegmentationDataset

    try:
        model, device, task, scale, tile = load_for_inference(inference_options(args))
        ds = SegmentationDataset(args.data, args.data_format, in_channels=model.config.in_channels,
                                 task=task, sr_scale=scale, train=False)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    out = Path(args.out) if args.out else Path(args.checkpoint) / f"eval-{Path(args.data).name}"
    out.mkdir(parents=True, exist_ok=True)
    print(f"data: {ds.describe()}")
    loader = torch.utils.data.DataLoader(ds, batch_size=args.batch_size if len(set(ds.shapes)) == 1 else 1)
    rand = task == "segmentation" and ds.fmt == "tiff-stack"
    saver = _PredictionSaver(out / "predictions", ds) if args.save_predictions else None
    meters, loss_sum, n, _ = evaluate_loader(model, loader, task, device, tile, args.overlap,
                                             rand=rand, on_batch=saver)
    result = summarize(meters, loss_sum, n)
    result.update(checkpoint=str(args.checkpoint), data=str(args.data), task=task)
    write_json(out / "metrics.json", result)
    keys = ("psnr", "psnr_bicubic") if task == "super-resolution" else ("dice", "iou", "rand_f")
    print("  ".join(f"{k} {result[k]:.4f}" for k in keys if k in result) + f"  ({n} images)")
    print(f"wrote {out / 'metrics.json'}" + (f" and predictions in {out / 'predictions'}" if saver else ""))
    return 0


class _PredictionSaver:
    """Callback of evaluate_loader writing each output under the sample's name."""

    def __init__(self, folder: Path, ds):
        self.folder, self.ds, self.i = folder, ds, 0

    def __call__(self, out: torch.Tensor, count: int) -> None:
        for k in range(count):
            name = self.ds.samples[self.ds.items[self.i][0]].name
            write_outputs(self.folder, name, out[k], self.ds.task)
            self.i += 1


if __name__ == "__main__":
    raise SystemExit(main())
