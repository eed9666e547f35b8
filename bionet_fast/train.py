"""Train a BiO-Net (bi-directional O-shaped U-Net, MICCAI 2020) for nuclei segmentation.

Quick start (no data needed): trains on synthetic H&E-like nuclei images made on the fly, a
small model sized for a laptop CPU (a few minutes), and writes everything to runs/bionet-t5:

    python -m bionet_fast.train --t 5 --checkpoint-iters

Your own data: a folder of images and masks (MoNuSeg layout ROOT/x/NAME.png + ROOT/y/NAME.png,
or ROOT/images/ + ROOT/masks/; TNBC Slide_XX/ + GT_XX/; EM multi-page TIFF stacks):

    python -m bionet_fast.train --train-data monuseg/train --valid-data monuseg/test --t 3

With data given, the defaults are the paper's recipe (multiplier 1.0, depth 4, Adam lr 0.01
decayed as lr / (1 + 3e-5 * step), batch 2, 300 epochs of 250 steps, rotation/shift/shear/zoom/
flip augmentation). Without data, the synthetic defaults are: multiplier 0.25, depth 3, 64x64
crops, batch 8, 10 epochs of 80 steps (lr 0.01 as the paper). Before each validation the BatchNorm statistics are
re-estimated on 64 training images (--precise-bn): the running averages of small batches make
eval-mode predictions much worse than the training loss suggests.

The output folder (--out) holds: model.safetensors + config.json (the best model, by IoU or PSNR
on the validation images), last.safetensors, training_state.* (to --resume), train_args.json,
metrics.jsonl (one line per epoch), curves.png and samples.png.
Several GPUs: torchrun --nproc_per_node N -m bionet_fast.train ... (one process per GPU).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch.distributed as dist

from .engine import checkpoint_io as tio
from .data.training import build_data
from .engine.trainer import NonFiniteLoss, Trainer, setup_distributed
from .engine.checkpoint_io import ARGS_JSON, has_training_state

SYNTHETIC = dict(multiplier=0.25, depth=3, image_size=64, batch_size=8, epochs=10, steps=80, lr=0.01,
                 workers=0, n_train=512, n_val=48)
PAPER = dict(multiplier=1.0, depth=4, image_size=None, batch_size=2, epochs=300, steps=250, lr=0.01, workers=2)
ARCH = ("t", "multiplier", "depth", "backward_skips", "integrate", "in_channels", "classes", "task")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bionet_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("model").add_argument
    a("--t", "--iterations", "--iter", dest="t", type=int, default=3, help="recurrent iterations t (default 3)")
    a("--multiplier", type=float, help="channel multiplier n: 32n..512n channels (paper 1.0; synthetic 0.25)")
    a("--depth", "--num_layers", type=int, help="encoder depth L (paper 4; synthetic 3)")
    a("--backward-skips", type=int, help="backward skips counted from the deepest level (default: all)")
    a("--integrate", action="store_true", help="INT: feed every iteration's output to the last stage")
    a("--in-channels", type=int, default=3, help="image channels: 3 RGB (default), 1 gray")
    a("--classes", type=int, help="output channels: 1 = nucleus/background (default); K > 1: label maps "
                                  "with softmax; super-resolution: the image channels")
    a("--bn-momentum", type=float, default=0.01, help="BatchNorm momentum, PyTorch convention (default 0.01)")
    a("--task", choices=("segmentation", "super-resolution"), default="segmentation")
    a("--sr-scale", type=int, default=2, choices=(2, 4), help="super-resolution factor (default 2)")
    a("--checkpoint-iters", action="store_true",
      help="recompute each iteration in the backward pass: much less memory, about 30%% slower")
    d = p.add_argument_group("data").add_argument
    d("--train-data", "--train_data", metavar="DIR", help="training images + masks (default: synthetic)")
    d("--valid-data", "--valid_data", metavar="DIR",
      help="validation images + masks (default: 10%% of --train-data, or a synthetic held-out split)")
    d("--data-format", "--format", default="auto", choices=("auto", "folder", "tnbc", "tiff-stack"),
      help="dataset layout (default: auto-detect)")
    d("--image-size", type=int, help="train on random square crops of this side (multiple of 2**(depth+1)); "
                                     "default: whole images (synthetic: 64)")
    d("--no-augment", action="store_true", help="turn off rotation/shift/shear/zoom/flip augmentation")
    d("--workers", type=int, help="data loading processes (default 2; synthetic 0)")
    o = p.add_argument_group("optimisation").add_argument
    o("--epochs", type=int, help="epochs (paper 300; synthetic 10)")
    o("--steps", type=int, help="optimizer steps per epoch (paper 250; synthetic 80)")
    o("--batch-size", "--batch_size", type=int, help="images per step and per process (paper 2; synthetic 8)")
    o("--lr", type=float, help="Adam learning rate (default 0.01, as the paper)")
    o("--lr-decay", "--lr_decay", type=float, default=3e-5, help="Keras decay: lr / (1 + decay * step)")
    o("--precise-bn", type=int, default=64, metavar="IMAGES",
      help="before each validation and save, re-estimate the BatchNorm statistics on this many training "
           "images in batches of 16 (default 64; 0: keep the running averages, as the paper)")
    o("--seed", type=int, default=0, help="random seed: same seed, same run (on the CPU bit for bit)")
    r = p.add_argument_group("speed and hardware").add_argument
    r("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    r("--amp", action="store_true", help="mixed precision (autocast) on the GPU")
    r("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    r("--channels-last", action="store_true", help="NHWC memory layout (faster convolutions on GPUs)")
    r("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    r("--backend", choices=("auto", "reference", "triton"), default="auto",
      help="auto: fused Triton kernels on CUDA, plain PyTorch elsewhere")
    r("--sync-bn", action="store_true", help="multi-GPU: BatchNorm statistics over all GPUs")
    r("--tile-size", type=int, help="validation images are processed in overlapping tiles of this side "
                                   "(default: --image-size, so BatchNorm sees the sizes it was trained on; "
                                   "512 for whole images)")
    s = p.add_argument_group("output").add_argument
    s("--out", metavar="DIR", help="output folder (default runs/bionet-t<T>)")
    s("--resume", metavar="DIR", help="continue the interrupted run in DIR (its options are reused)")
    s("--overwrite", action="store_true", help="replace an earlier run in --out")
    s("--config", metavar="FILE", help="YAML or JSON file of options (keys as the flags); flags override it")
    s("--save-every-steps", type=int, default=0, help="also save the training state every N steps")
    s("--save-every-minutes", type=float, default=10.0, help="and at least every N minutes (default 10)")
    s("--quiet", action="store_true", help="no progress bars")
    for name in ("--debug-nan-at-step", "--debug-exit-at-step"):  # test hooks
        p.add_argument(name, type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-train", type=int, help=argparse.SUPPRESS)
    p.add_argument("--n-val", type=int, help=argparse.SUPPRESS)
    return p


def _option_names(parser: argparse.ArgumentParser) -> dict[str, str]:
    names = {}
    for action in parser._actions:
        for opt in action.option_strings:
            key = opt.lstrip("-")
            names[key] = names[key.replace("-", "_")] = action.dest
    return names


def _read_config(path: str, parser: argparse.ArgumentParser) -> dict:
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"--config {file}: no such file (a YAML or JSON file of options)")
    text = file.read_text()
    if file.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        import yaml

        data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ValueError(f"--config {file}: expected a mapping of option: value, got {type(data).__name__}")
    names = _option_names(parser)
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        raise ValueError(f"--config {file}: unknown option(s) {unknown}; use the flag names, e.g. "
                         "'epochs: 10' or 'batch-size: 4'")
    return {names[k]: v for k, v in data.items()}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Flags > --config file > the resumed run's options > defaults (synthetic or paper)."""
    parser = build_parser()
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--resume")
    known, _ = pre.parse_known_args(argv)
    defaults = {}
    if known.resume:
        saved = Path(known.resume) / ARGS_JSON
        if not saved.is_file():
            raise FileNotFoundError(f"--resume {known.resume}: no {ARGS_JSON} there; pass the --out folder "
                                    "of an earlier run of python -m bionet_fast.train")
        defaults.update(json.loads(saved.read_text()))
        defaults.update(out=known.resume, resume=known.resume)
    if known.config:
        defaults.update(_read_config(known.config, parser))
    parser.set_defaults(**{k: v for k, v in defaults.items() if k not in ("config",)})
    args = parser.parse_args(argv)
    if known.resume and Path(args.out).resolve() != Path(known.resume).resolve():
        raise ValueError(f"--resume {known.resume} continues the run in its own folder; drop --out {args.out}")
    if known.resume:
        changed = [k for k in ARCH if getattr(args, k) != defaults.get(k)]
        if changed:
            raise ValueError(f"--resume {known.resume}: the architecture cannot change ({', '.join(changed)}); "
                             "start a new run with --out instead")
    return resolve(args)


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the unset options with the synthetic or the paper defaults and check them."""
    args.synthetic = args.train_data is None
    table = SYNTHETIC if args.synthetic else PAPER
    for key, value in table.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.classes is None:
        args.classes = args.in_channels if args.task == "super-resolution" else 1
    if args.out is None:
        args.out = f"runs/bionet-t{args.t}" + ("-sr" if args.task == "super-resolution" else "")
    multiple = 2 ** (args.depth + 1)
    if args.image_size is not None and args.image_size % multiple:
        lo, hi = args.image_size // multiple * multiple, (args.image_size // multiple + 1) * multiple
        raise ValueError(f"--image-size {args.image_size} is not a multiple of 2**(depth+1) = {multiple}; "
                         f"use {lo or hi} or {hi}")
    if args.task == "super-resolution" and args.classes != args.in_channels:
        raise ValueError(f"super-resolution outputs the image: --classes must equal --in-channels "
                         f"({args.in_channels}), got {args.classes}")
    for key in ("epochs", "steps", "batch_size", "t"):
        if getattr(args, key) < 1:
            raise ValueError(f"--{key.replace('_', '-')} must be >= 1, got {getattr(args, key)}")
    if args.valid_data and args.train_data is None:
        raise ValueError("--valid-data needs --train-data (without both, the synthetic data is used)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Parse, check the data, train; returns 0, 2 (bad input) or 3 (loss became NaN/inf)."""
    try:
        args = parse_args(argv)
        out = Path(args.out)
        if not args.resume and has_training_state(out) and not args.overwrite:
            raise ValueError(f"{out} already holds a run; pass --resume {out} to continue it, --overwrite "
                             "to replace it, or another --out")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return run(args)


def run(args) -> int:
    """Train with parsed options; returns the exit code."""
    rank, world, device = setup_distributed(args)
    main = rank == 0
    try:
        try:
            train, val, train_text, val_text = build_data(args)
        except (FileNotFoundError, ValueError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        try:
            trainer = Trainer(args, rank, world, device, train, val)
        except ValueError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        out = Path(args.out)
        if args.resume and has_training_state(out):
            trainer.resume()
        elif main:
            out.mkdir(parents=True, exist_ok=True)
            for old in [tio.METRICS_JSONL, tio.STATE_JSON]:
                (out / old).unlink(missing_ok=True)
        if main:
            saved = {k: v for k, v in vars(args).items()
                     if k not in ("resume", "config", "overwrite", "synthetic") and not k.startswith("debug")}
            tio.write_json(out / ARGS_JSON, saved)
            _print_plan(args, trainer, world, device, train_text, val_text)
        start = time.perf_counter()
        try:
            trainer.fit()
        except NonFiniteLoss as err:
            done = trainer.saved
            kept = (f"the last good checkpoint (after {done['epoch']} epoch(s), step {done['global_step']}) is "
                    f"intact in {out}; continue from it with --resume {out} and a lower --lr" if done else
                    "nothing had been saved yet")
            hint = " or --amp-dtype bfloat16" if args.amp and args.amp_dtype == "float16" else ""
            print(f"error: {err}. Training stopped: {kept}. Lower --lr{hint}.", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            print(f"interrupted; continue with: python -m bionet_fast.train --resume {out}", file=sys.stderr)
            return 130
        if main:
            _print_summary(args, trainer, time.perf_counter() - start)
        return 0
    finally:
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _print_plan(args, trainer, world, device, train_text, val_text) -> None:
    n = sum(p.numel() for p in trainer.model.parameters())
    backend = trainer.model.resolved_backend(device)
    print(f"training data:   {train_text}\nvalidation data: {val_text}")
    print(f"model: BiO-Net t={args.t} x{args.multiplier} depth {args.depth}{' INT' if args.integrate else ''}"
          f", {n:,} parameters, {args.task}; {device}{f' x{world} processes' if world > 1 else ''}, backend "
          f"{backend}{', iteration checkpointing' if args.checkpoint_iters else ''}"
          f"{f', AMP {args.amp_dtype}' if args.amp else ''}")
    print(f"recipe: {args.epochs} epochs x {args.steps} steps x batch {args.batch_size}, Adam lr {args.lr} "
          f"decay {args.lr_decay}, augmentation {'off' if args.no_augment else 'on'}, seed {args.seed}")
    print(f"output: {args.out}", flush=True)


def _print_summary(args, trainer, seconds: float) -> None:
    out, p = Path(args.out), trainer.progress
    key = "PSNR" if args.task == "super-resolution" else "IoU"
    best = next((r for r in trainer.records if r["epoch"] == p["best_epoch"]), None)
    extra = f" (Dice {best['dice']:.4f})" if best and "dice" in best else ""
    print(f"done in {seconds:.0f} s. Best validation {key} {p['best']:.4f}{extra} at epoch {p['best_epoch']}.")
    print(f"  best model      {out / 'model.safetensors'} + config.json  (BiONet.from_pretrained('{out}'))")
    print(f"  last weights    {out / tio.LAST_WEIGHTS}\n  resume state    {out / tio.STATE_JSON}")
    print(f"  per-epoch log   {out / tio.METRICS_JSONL}\n  plots           {out / 'curves.png'}, "
          f"{out / 'samples.png'}")
    print(f"  evaluate:  python -m bionet_fast.evaluate --checkpoint {out} --data DIR")
    print(f"  predict:   python -m bionet_fast.predict --checkpoint {out} IMAGES... --out DIR")


if __name__ == "__main__":
    raise SystemExit(main())
