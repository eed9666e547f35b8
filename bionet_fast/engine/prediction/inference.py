"""Inference shared by train, evaluate and predict: device choice, loading a checkpoint for
inference, tiled and blended prediction, validation losses and meters."""
from __future__ import annotations

from dataclasses import dataclass
from types import SimpleNamespace
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F

from ...metrics import PSNRMeter, RandMeter, SegmentationMeter
from ...models import from_pretrained, load_official
from ...models.pretrained import looks_like_repo_id
from ..checkpoint_io import ARGS_JSON, read_json
from .tiling import sliding_window_inference

TASKS = ("segmentation", "super-resolution")


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
    return device


def load_checkpoint(path: str | Path, device: torch.device, backend: str = "auto") -> tuple[torch.nn.Module, dict]:
    """A run folder of the trainer (config.json + model.safetensors, the best model), any folder
    written by save_pretrained, a Hugging Face Hub repo id ("org/name"), or an official port
    checkpoint (.pt). Returns the model in eval mode on `device` and the run's training options
    (train_args.json; {} when absent)."""
    model = load_model(path, backend)
    if model is None:
        raise FileNotFoundError(f"checkpoint {path} not found: pass the --out folder of a training run "
                                "(it holds config.json and model.safetensors), a Hub repo id (org/name) "
                                "or an official .pt file")
    args_file = Path(path) / ARGS_JSON
    args = read_json(args_file, "the run's options") if args_file.is_file() else {}
    return model.to(device).eval(), args


def load_model(path: str | Path, backend: str = "auto") -> Optional[torch.nn.Module]:
    """The model of an official port checkpoint (.pt / .pth), a save_pretrained or run folder, a
    bioimage.io package (.zip) of export_bioimageio, or a Hub repo id; None when `path` is none of these."""
    text, p = str(path), Path(path)
    if p.is_file() and p.suffix in (".pt", ".pth"):
        return load_official(p, backend=backend)
    if p.is_dir() or looks_like_repo_id(text) or (p.is_file() and p.suffix.lower() == ".zip"):
        return from_pretrained(text, backend=backend)
    return None


@dataclass
class InferenceOptions:
    """What `evaluate` and `predict` need to load a model; None = the checkpoint's own choice."""

    checkpoint: str | Path
    device: str = "auto"
    backend: str = "auto"
    task: Optional[str] = None
    sr_scale: Optional[int] = None
    tile_size: Optional[int] = None


# The default window of reflect-padded BiO-Nets: their answer does not depend on the window
# (issue 16, case 14: Dice within 0.02 from the 64-pixel training crop to whole 512 images), and
# larger windows are faster (fewer overlapping borders).
INVARIANT_WINDOW = 512


def inference_window(cfg: Any) -> Optional[int]:
    """The window validation, evaluate and predict use by default for a run of `cfg` (TrainConfig
    fields): --tile-size if given; for a reflect-padded BiO-Net at least INVARIANT_WINDOW; else the
    training crop (a zero-padded model's BatchNorm statistics hold at that window only); None:
    whole images."""
    tile, crop = getattr(cfg, "tile_size", None), getattr(cfg, "image_size", None)
    if tile:
        return tile
    if getattr(cfg, "arch", "bionet") == "bionet" and getattr(cfg, "padding_mode", "zeros") == "reflect":
        return max(INVARIANT_WINDOW, crop or 0)
    return crop


def load_for_inference(opts: InferenceOptions) -> tuple[torch.nn.Module, torch.device, str, int, int]:
    """The model of `opts.checkpoint` on `opts.device`, with task, sr_scale and tile_size defaulting
    to the checkpoint's: (model, device, task, sr_scale, tile_size). Each comes from the options,
    else config.json's "inference" block (`model.inference_info`), else train_args.json (run folders
    older than the block), else the defaults (segmentation, x2, tile 512). The saved tile is the
    training crop for zero-padded models (their BatchNorm statistics hold at that window only) and
    512 or more for reflect-padded BiO-Nets, whose answer does not depend on the window."""
    device = pick_device(opts.device)
    model, train_args = load_checkpoint(opts.checkpoint, device, opts.backend)
    info = getattr(model, "inference_info", None)
    saved = info.to_dict() if info is not None else {
        "task": train_args.get("task"), "sr_scale": train_args.get("sr_scale"),
        "tile_size": inference_window(SimpleNamespace(**train_args))}
    task = opts.task or saved["task"] or "segmentation"
    scale = opts.sr_scale or saved["sr_scale"] or 2
    tile = opts.tile_size or saved["tile_size"] or 512
    return model, device, task, scale, tile


def activation(task: str, classes: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """Logits -> output: sigmoid (one class), softmax (several), identity (super-resolution)."""
    if task == "super-resolution":
        return lambda x: x
    return torch.sigmoid if classes == 1 else (lambda x: torch.softmax(x, dim=1))


def window_predictor(model: torch.nn.Module, task: str, autocast: Optional[Callable] = None,
                     channels_last: bool = False, forward: Optional[Callable] = None
                     ) -> Callable[[torch.Tensor], torch.Tensor]:
    """windows (N, C, h, w) -> the model's activated float32 output (N, K, h, w), under `autocast`
    (a context manager; None = fp32), in channels_last layout when asked. `forward` replaces
    model(windows) (a cuda_graph.GraphedForward for --cuda-graph)."""
    act = activation(task, model.config.classes)
    net = forward or model

    def run(windows: torch.Tensor) -> torch.Tensor:
        if channels_last:
            windows = windows.contiguous(memory_format=torch.channels_last)
        with autocast or torch.autocast(windows.device.type, enabled=False):
            return act(net(windows).float()).contiguous()

    return run


@torch.no_grad()
def infer(model: torch.nn.Module, images: torch.Tensor, task: str = "segmentation", tile_size: int = 512,
          overlap: float = 0.25, mode: str = "gaussian", sw_batch_size: int = 4,
          autocast: Optional[Callable] = None, channels_last: bool = False, out_device=None,
          forward: Optional[Callable] = None) -> torch.Tensor:
    """images (B, C, H, W), any H, W -> probabilities (B, classes, H, W), or the super-resolved
    image (B, C, H, W) clamped to [0, 1], on `out_device` (default: the images' device; windows
    always run on the images' device). Runs in eval mode; the model's own mode is restored."""
    was_training = model.training
    model.eval()
    run = window_predictor(model, task, autocast, channels_last, forward)
    try:
        out = sliding_window_inference(images, tile_size, sw_batch_size, run, overlap=overlap, mode=mode,
                                       size_multiple=model.size_multiple, device=out_device)
    finally:
        model.train(was_training)
    return out.clamp_(0, 1) if task == "super-resolution" else out


def make_meter(task: str, classes: int, rand: bool, threshold: float = 0.5):
    if task == "super-resolution":
        return PSNRMeter()
    return RandMeter() if rand else SegmentationMeter(classes, threshold)


def val_loss(out: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """Summed loss of blended outputs (probabilities or images): BCE / NLL / MSE."""
    if task == "super-resolution":
        return F.mse_loss(out, target, reduction="sum") / out[0].numel()
    p = out.clamp(1e-6, 1 - 1e-6)
    if out.shape[1] == 1:
        return F.binary_cross_entropy(p, target.float(), reduction="sum") / out[0].numel()
    return F.nll_loss(p.log(), target[:, 0].long(), reduction="sum") / out[0, 0].numel()


@torch.no_grad()
def evaluate_loader(model: torch.nn.Module, loader, task: str, device: torch.device, tile_size: int,
                    overlap: float = 0.25, rand: bool = False, keep: int = 0,
                    autocast: Optional[Callable] = None, on_batch: Optional[Callable] = None,
                    forward: Optional[Callable] = None, channels_last: bool = False, threshold: float = 0.5,
                    objects=None, target: str = "mask"):
    """Run the model over a loader of (image, target) or (image, target, instances) batches. Returns
    (meters, loss_sum, n_images, kept) where meters = [main meter] (+ a SegmentationMeter beside a
    RandMeter) (+ `objects`, a metrics.ObjectMeter, last) and kept holds the first `keep` (image,
    target, output) triples on the CPU for plots. Dice and IoU count the pixels whose probability
    exceeds `threshold` (one class). `objects` scores every image: against its instance labels where
    the batches carry them (object metrics), else against its target (per-image pixel rows only).
    A contour model (`target` "contour") is scored as one class, nucleus (interior + boundary) vs
    background: its output becomes 1 - p(background) and its targets (class maps or masks) `> 0`."""
    contour = target == "contour"
    classes = 1 if contour else model.config.classes
    meters = [make_meter(task, classes, rand, threshold)]
    if rand:
        meters.append(SegmentationMeter(classes, threshold))
    loss_sum, n, kept = 0.0, 0, []
    for batch in loader:
        images, targets = batch[0].to(device), batch[1].to(device)
        out = infer(model, images, task, tile_size, overlap, autocast=autocast, forward=forward,
                    channels_last=channels_last)
        raw = out  # a contour model's objects come from all three of its channels
        if contour:
            out, targets = 1 - out[:, :1], (targets > 0).float()
        for meter in meters:
            if task == "super-resolution":
                meter.update(out, targets, baseline=images)
            else:
                meter.update(out, targets)
        if objects is not None:
            objects.update(raw, batch[2] if len(batch) > 2 else targets)
        loss_sum += float(val_loss(out, targets, task))
        n += images.shape[0]
        for i in range(min(keep - len(kept), images.shape[0])):
            kept.append((images[i].cpu(), targets[i].cpu(), out[i].cpu()))
        if on_batch is not None:
            on_batch(out, images.shape[0])
    return meters + ([objects] if objects is not None else []), loss_sum, n, kept


def summarize(meters, loss_sum: float, n: int) -> dict:
    result = {}
    for meter in reversed(meters):  # the main meter's n_images wins
        result.update(meter.compute())
    result["loss"] = loss_sum / max(n, 1)
    return result
