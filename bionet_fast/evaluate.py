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
import json
import sys
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.nn.functional as F

from bionet_fast import BiONet, load_official

from .metrics import PSNRMeter, RandMeter, SegmentationMeter
from .tiling import sliding_window_inference

TASKS = ("segmentation", "super-resolution")


# --- shared by train, evaluate and predict -----------------------------------------------------------
def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def load_checkpoint(path: str | Path, device: torch.device, backend: str = "auto") -> tuple[BiONet, dict]:
    """A run folder of the trainer (config.json + model.safetensors, the best model), any folder
    written by BiONet.save_pretrained, or an official port checkpoint (.pt). Returns the model in
    eval mode on `device` and the run's training options (train_args.json; {} when absent)."""
    path = Path(path)
    if path.is_file() and path.suffix in (".pt", ".pth"):
        model, args = load_official(path, backend=backend), {}
    elif path.is_dir():
        model = BiONet.from_pretrained(path, backend=backend)
        args_file = path / "train_args.json"
        args = json.loads(args_file.read_text()) if args_file.is_file() else {}
    else:
        raise FileNotFoundError(f"checkpoint {path} not found: pass the --out folder of a training run "
                                "(it holds config.json and model.safetensors) or an official .pt file")
    return model.to(device).eval(), args


def load_for_inference(args: argparse.Namespace) -> tuple[BiONet, torch.device, str, int, int]:
    """The model of --checkpoint on --device (--backend), with --task, --sr-scale and --tile-size
    defaulting to the training run's: (model, device, task, sr_scale, tile_size). The default tile
    is the training crop size (the BatchNorm statistics were estimated at it), else 512."""
    device = pick_device(args.device)
    model, train_args = load_checkpoint(args.checkpoint, device, args.backend)
    task = args.task or train_args.get("task", "segmentation")
    scale = args.sr_scale or train_args.get("sr_scale", 2)
    tile = args.tile_size or train_args.get("image_size") or 512
    return model, device, task, scale, tile


def activation(task: str, classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits -> output: sigmoid (one class), softmax (several), identity (super-resolution)."""
    if task == "super-resolution":
        return lambda x: x
    return torch.sigmoid if classes == 1 else (lambda x: torch.softmax(x, dim=1))


@torch.no_grad()
def infer(model: BiONet, images: torch.Tensor, task: str = "segmentation", tile_size: int = 512,
          overlap: float = 0.25, mode: str = "gaussian", sw_batch_size: int = 4,
          autocast: Optional[Callable] = None) -> torch.Tensor:
    """images (B, C, H, W), any H, W -> probabilities (B, classes, H, W), or the super-resolved
    image (B, C, H, W) clamped to [0, 1]. Runs in eval mode; the model's own mode is restored."""
    was_training = model.training
    model.eval()
    act = activation(task, model.config.classes)
    ctx = autocast or torch.autocast(images.device.type, enabled=False)

    def run(windows: torch.Tensor) -> torch.Tensor:
        with ctx:
            return act(model(windows).float())

    try:
        out = sliding_window_inference(images, tile_size, run, overlap=overlap, mode=mode,
                                       sw_batch_size=sw_batch_size, size_multiple=model.size_multiple)
    finally:
        model.train(was_training)
    return out.clamp_(0, 1) if task == "super-resolution" else out


def make_meter(task: str, classes: int, rand: bool):
    if task == "super-resolution":
        return PSNRMeter()
    return RandMeter() if rand else SegmentationMeter(classes)


def val_loss(out: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """Summed loss of blended outputs (probabilities or images): BCE / NLL / MSE."""
    if task == "super-resolution":
        return F.mse_loss(out, target, reduction="sum") / out[0].numel()
    p = out.clamp(1e-6, 1 - 1e-6)
    if out.shape[1] == 1:
        return F.binary_cross_entropy(p, target.float(), reduction="sum") / out[0].numel()
    return F.nll_loss(p.log(), target[:, 0].long(), reduction="sum") / out[0, 0].numel()


@torch.no_grad()
def evaluate_loader(model: BiONet, loader, task: str, device: torch.device, tile_size: int,
                    overlap: float = 0.25, rand: bool = False, keep: int = 0,
                    autocast: Optional[Callable] = None, on_batch: Optional[Callable] = None):
    """Run the model over a loader of (image, target) batches. Returns (meters, loss_sum, n_images,
    kept) where meters = [main meter] (+ a SegmentationMeter beside a RandMeter) and kept holds
    the first `keep` (image, target, output) triples on the CPU for plots."""
    meters = [make_meter(task, model.config.classes, rand)]
    if rand:
        meters.append(SegmentationMeter(model.config.classes))
    loss_sum, n, kept = 0.0, 0, []
    for images, targets in loader:
        images, targets = images.to(device), targets.to(device)
        out = infer(model, images, task, tile_size, overlap, autocast=autocast)
        for meter in meters:
            if task == "super-resolution":
                meter.update(out, targets, baseline=images)
            else:
                meter.update(out, targets)
        loss_sum += float(val_loss(out, targets, task))
        n += images.shape[0]
        for i in range(min(keep - len(kept), images.shape[0])):
            kept.append((images[i].cpu(), targets[i].cpu(), out[i].cpu()))
        if on_batch is not None:
            on_batch(out, images.shape[0])
    return meters, loss_sum, n, kept


def summarize(meters, loss_sum: float, n: int) -> dict:
    result = {}
    for meter in reversed(meters):  # the main meter's n_images wins
        result.update(meter.compute())
    result["loss"] = loss_sum / max(n, 1)
    return result


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
    from .data import SegmentationDataset  # the data layer (a leaf)

    try:
        model, device, task, scale, tile = load_for_inference(args)
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
    from .trainer_io import write_json

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
        from .predict import write_outputs

        for k in range(count):
            name = self.ds.samples[self.ds.items[self.i][0]].name
            write_outputs(self.folder, name, out[k], self.ds.task)
            self.i += 1


if __name__ == "__main__":
    raise SystemExit(main())
