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
crops, batch 8, 10 epochs of 80 steps (lr 0.01 as the paper), and convolutions that pad by reflection
(--padding-mode reflect: the trained model's answer then does not depend on the inference window, so
predict and evaluate use 512-pixel windows). Before each validation the BatchNorm statistics are
set from one forward of 256 training images in a single batch (--precise-bn): the running averages
of small batches make eval-mode predictions much worse than the training loss suggests, and the
recurrence amplifies any mismatch between the statistics and what each layer sees.

The output folder (--out) holds: model.safetensors + config.json (the best model, by IoU or PSNR
on the validation images), last.safetensors, training_state.* (to --resume), train_args.json,
metrics.jsonl (one line per epoch), curves.png and samples.png.
Several GPUs: torchrun --nproc_per_node N -m bionet_fast.train ... (one process per GPU).
"""
from __future__ import annotations

if __name__ == "__main__":  # this program's own process only, before torch loads (never on import)
    from ._process import configure_cli_process

    configure_cli_process()

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ._cli import (AT_LEAST_0, AT_LEAST_1, MOMENTUM, POSITIVE, WINDOW, check_multiple, check_numbers,
                   check_writable)
from .engine import checkpoint_io as tio
from .data.training import build_data
from .engine.training.train_notes import accumulation_warning
from .engine.training.trainer import Diverged, Trainer, setup_distributed
from .engine.checkpoint_io import ARGS_JSON
from .engine.cpu_threads import default_threads
from .engine.training.run_folder import resume_changes, take_folder
from .engine.run_lock import RunLocked
from .engine.training.train_config import TrainConfig
from .models import BiOLinkNetConfig, BiONetConfig

# The synthetic runs pad by reflection: a model trained on 64-pixel crops then gives the same answer
# at every window (issue 16, case 14); the paper's recipe keeps the official zeros.
SYNTHETIC = dict(multiplier=0.25, depth=3, padding_mode="reflect", image_size=64, batch_size=8, epochs=10, steps=80,
                 lr=0.01, workers=0, n_train=512, n_val=48)
PAPER = dict(multiplier=1.0, depth=4, padding_mode="zeros", image_size=None, batch_size=2, epochs=300, steps=250, lr=0.01,
             workers=2)
BIONET_ONLY = ("multiplier", "depth", "backward_skips", "integrate", "padding_mode")  # not options of BiO-LinkNet
# Every numeric option, checked before any work (the message names the flag).
NUMBERS = dict(t=AT_LEAST_1, multiplier=POSITIVE, depth=AT_LEAST_1, backward_skips=AT_LEAST_0, in_channels=AT_LEAST_1,
               classes=AT_LEAST_1, bn_momentum=MOMENTUM, image_size=AT_LEAST_1, workers=AT_LEAST_0,
               n_train=AT_LEAST_1, n_val=AT_LEAST_1, epochs=AT_LEAST_1, steps=AT_LEAST_1, batch_size=AT_LEAST_1,
               lr=AT_LEAST_0, lr_decay=AT_LEAST_0, precise_bn=AT_LEAST_0, seed=AT_LEAST_0, tile_size=WINDOW,
               save_every_steps=AT_LEAST_0, save_every_minutes=POSITIVE, threads=AT_LEAST_1,
               grad_accum_steps=AT_LEAST_1, clip_grad=POSITIVE, train_mpp=POSITIVE,
               model_ema_decay=(lambda v: 0 < v < 1, "in (0, 1), e.g. 0.999"))
ARCH = ("arch", "t", "multiplier", "depth", "backward_skips", "integrate", "padding_mode", "in_channels", "classes", "task")


def _int_or_auto(text: str):
    return "auto" if text == "auto" else int(text)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bionet_fast.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument_group("model").add_argument
    a("--arch", choices=("bionet", "biolinknet"),
      help="bionet (default) or biolinknet: LinkNet (ResNet-18 encoder) with BiO-Net's recurrence; "
           "crops and tiles must be multiples of 32, and --multiplier/--depth/--backward-skips/--integrate "
           "are BiO-Net options")
    a("--t", "--iterations", "--iter", dest="t", type=int, default=3, help="recurrent iterations t (default 3)")
    a("--multiplier", type=float, help="channel multiplier n: 32n..512n channels (paper 1.0; synthetic 0.25)")
    a("--depth", "--num_layers", type=int, help="encoder depth L (paper 4; synthetic 3)")
    a("--backward-skips", type=int, help="backward skips counted from the deepest level (default: all)")
    a("--integrate", action="store_true", help="INT: feed every iteration's output to the last stage")
    a("--padding-mode", choices=("zeros", "reflect", "replicate"),
      help="how the convs pad: zeros (the official network; default) or reflect/replicate")
    a("--in-channels", type=int, default=3, help="image channels: 3 RGB (default), 1 gray")
    a("--classes", type=int, help="output channels: 1 = nucleus/background (default); K > 1: label maps "
                                  "with softmax; super-resolution: the image channels")
    a("--bn-momentum", type=float, help="BatchNorm momentum, PyTorch convention (default 0.01; 0.1 for "
                                        "biolinknet, as torchvision's ResNet)")
    a("--task", choices=("segmentation", "super-resolution"), default="segmentation")
    a("--target", choices=("mask", "contour"), default="mask",
      help="segmentation target: mask (nucleus / background, default) or contour: background / interior / "
           "boundary from instance labels (DCAN-style; 3 classes; predict separates touching nuclei from the "
           "interiors)")
    a("--sr-scale", type=int, default=2, choices=(2, 4), help="super-resolution factor (default 2)")
    a("--checkpoint-iters", action="store_true",
      help="recompute each iteration in the backward pass: much less memory, about 30%% slower")
    d = p.add_argument_group("data").add_argument
    d("--train-data", "--train_data", metavar="DIR", help="training images + masks (default: synthetic)")
    d("--valid-data", "--valid_data", metavar="DIR",
      help="validation images + masks (default: 10%% of --train-data, or a synthetic held-out split)")
    d("--data-format", "--format", default="auto", choices=("auto", "folder", "tnbc", "tiff-stack", "annotated"),
      help="dataset layout (default: auto-detect; MoNuSeg as downloaded, Aperio XML / QuPath GeoJSON: "
           "docs/real-data.md)")
    d("--train-mpp", type=float, metavar="UM",
      help="pixel size of the training images in micrometres per pixel (default: read from their files); "
           "saved in config.json, predict reads slides at it")
    d("--image-size", type=int, help="train on random square crops of this side (multiple of 2**(depth+1)); "
                                     "default: whole images (synthetic: 64)")
    d("--no-augment", action="store_true", help="turn off rotation/shift/shear/zoom/flip augmentation")
    d("--workers", type=int, help="data loading processes (default 2; synthetic 0)")
    o = p.add_argument_group("optimisation").add_argument
    o("--epochs", type=int, help="epochs (paper 300; synthetic 10)")
    o("--steps", type=int, help="optimizer steps per epoch (paper 250; synthetic 80)")
    o("--batch-size", "--batch_size", type=_int_or_auto,
      help="images per step and per process (paper 2; synthetic 8); auto (with --memory-budget): the "
           "largest batch whose memory plan fits")
    o("--lr", type=float, help="Adam learning rate (default 0.01, as the paper)")
    o("--lr-decay", "--lr_decay", type=float, default=3e-5, help="Keras decay: lr / (1 + decay * step)")
    o("--precise-bn", type=int, default=256, metavar="IMAGES",
      help="before each validation and save, set the BatchNorm statistics to those of one forward of this "
           "many training images in a single batch (default 256; fewer if they pass 4.2 million pixels); "
           "0: keep the running averages, as the paper")
    o("--seed", type=int, default=0, help="random seed: same seed, same run (on the CPU bit for bit)")
    f = p.add_argument_group("fine-tuning").add_argument
    f("--initial-checkpoint", metavar="PATH",
      help="start from these weights: a run's --out folder, a save_pretrained folder, a Hub repo id or an "
           "official .pt; the architecture flags must match it (a mismatch is named before training)")
    f("--model-ema", action="store_true",
      help="keep an exponential moving average of the weights; it is what is validated and saved as the best")
    f("--model-ema-decay", type=float, default=0.999, help="EMA decay per optimizer step (default 0.999)")
    f("--grad-accum-steps", type=int, default=1, metavar="N",
      help="accumulate the gradients of N batches per optimizer step (effective batch N x --batch-size; "
           "--steps still counts batches)")
    f("--clip-grad", type=float, metavar="NORM", help="clip the global gradient norm to NORM before each step")
    r = p.add_argument_group("speed and hardware").add_argument
    r("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    r("--threads", type=int, help="CPU threads of torch (default: the CPUs this process may use, at most 8; "
                                  "OpenMP threads wait passively, so another job on the machine costs its share)")
    r("--amp", action="store_true", help="mixed precision (autocast), on the GPU and on the CPU too "
      "(bf16 pays on CPUs with AVX512-BF16 or AMX; fp16 needs a GPU)")
    r("--amp-dtype", choices=("bfloat16", "float16"), default="bfloat16")
    r("--channels-last", action="store_true", help="NHWC memory layout (faster convolutions on GPUs)")
    r("--compile", action="store_true", help="torch.compile the model (slow start, faster steps)")
    r("--cuda-graph", action="store_true",
      help="CUDA: capture the whole training step once and replay it (less launch overhead at small "
           "batches); other batch shapes, several processes, --compile and float16 AMP train eagerly, "
           "said once; without CUDA: a message, then eager training")
    r("--memory-budget", metavar="BYTES",
      help="plan the step's memory before training (python -m bionet_fast.plan) and turn on the fastest "
           "checkpointing that fits: 8GiB, 12GB, ... or auto (the device's free memory less max(10%%, "
           "768 MiB)); stops before training, naming the largest t and batch that fit, when nothing does")
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
    for name in ("--debug-nan-at-step", "--debug-exit-at-step", "--debug-kill-at-step"):  # test hooks
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
    try:
        if file.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:  # JSONDecodeError, yaml.YAMLError
        raise ValueError(f"--config {file}: not valid {'JSON' if file.suffix.lower() == '.json' else 'YAML'} "
                         f"({type(err).__name__}: {err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {file}: expected a mapping of option: value, got {type(data).__name__}")
    names = _option_names(parser)
    unknown = sorted(k for k in data if k not in names)
    if unknown:
        raise ValueError(f"--config {file}: unknown option(s) {unknown}; use the flag names, e.g. "
                         "'epochs: 10' or 'batch-size: 4'")
    return {names[k]: v for k, v in data.items()}


def parse_args(argv: list[str] | None = None) -> TrainConfig:
    """Flags > --config file > the resumed run's options > defaults (synthetic or paper), as the
    typed config of the run."""
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
        dests = {a.dest for a in parser._actions}  # options of older versions are dropped
        defaults.update({k: v for k, v in tio.read_json(saved, "the run's options").items() if k in dests})
        if (defaults.get("arch") or "bionet") == "bionet":
            defaults.setdefault("padding_mode", "zeros")  # runs older than the option padded with zeros
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
    return TrainConfig.from_namespace(resolve(args))


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill the unset options with the synthetic or the paper defaults and check them."""
    args.synthetic = args.train_data is None
    _resolve_arch(args)
    args.auto_batch = args.batch_size == "auto"
    if args.auto_batch:  # a placeholder until run() plans the batch (the defaults fill it)
        if not args.memory_budget:
            raise ValueError("--batch-size auto needs --memory-budget (e.g. 8GiB, or auto)")
        args.batch_size = None
    table = SYNTHETIC if args.synthetic else PAPER
    for key, value in table.items():
        if getattr(args, key, None) is None and not (args.arch != "bionet" and key in BIONET_ONLY):
            setattr(args, key, value)
    if args.target == "contour" and (args.task != "segmentation" or args.classes not in (None, 3)):
        raise ValueError("--target contour trains 3 classes (background, interior, boundary) for segmentation: "
                         "drop --classes / --task super-resolution")
    if args.classes is None:
        args.classes = 3 if args.target == "contour" else args.in_channels if args.task == "super-resolution" else 1
    if args.out is None:
        args.out = f"runs/{args.arch}-t{args.t}" + ("-sr" if args.task == "super-resolution" else "")
    check_numbers(args, NUMBERS)
    multiple, why = (32, "BiO-LinkNet") if args.arch == "biolinknet" else (2 ** (args.depth + 1), "2**(depth+1)")
    if args.image_size is not None and args.image_size % multiple:
        lo, hi = args.image_size // multiple * multiple, (args.image_size // multiple + 1) * multiple
        raise ValueError(f"--image-size {args.image_size} is not a multiple of {multiple} ({why}); "
                         f"use {lo or hi} or {hi}")
    if args.task == "super-resolution" and args.classes != args.in_channels:
        raise ValueError(f"super-resolution outputs the image: --classes must equal --in-channels "
                         f"({args.in_channels}), got {args.classes}")
    check_multiple("--tile-size", args.tile_size, multiple, why)
    if args.arch == "bionet" and args.padding_mode == "reflect" and args.image_size and args.image_size < 2 * multiple:
        raise ValueError(f"--image-size {args.image_size}: a reflect-padded BiO-Net of depth {args.depth} needs "
                         f"training crops of at least {2 * multiple} (its deepest maps must be 2 x 2 to be "
                         f"reflected); use --image-size {2 * multiple}, or --padding-mode replicate")
    if args.cuda_graph and args.grad_accum_steps > 1:  # (--clip-grad is captured in the graph)
        raise ValueError("--cuda-graph replays one whole optimizer step per batch: it cannot accumulate "
                         "gradients; drop --cuda-graph or --grad-accum-steps")
    if args.valid_data and args.train_data is None:
        raise ValueError("--valid-data needs --train-data (without both, the synthetic data is used)")
    return args


def _resolve_arch(args: argparse.Namespace) -> None:
    """--arch (bionet when unset, as runs before the flag) and its BatchNorm momentum; BiO-Net's
    width and depth options given with biolinknet are refused by name."""
    args.arch = args.arch or "bionet"
    if args.bn_momentum is None:
        args.bn_momentum = 0.1 if args.arch == "biolinknet" else 0.01
    given = [f"--{k.replace('_', '-')}" for k in BIONET_ONLY if getattr(args, k) not in (None, False)]
    if args.arch != "bionet" and given:
        raise ValueError(f"{', '.join(given)}: BiO-Net option(s), but --arch {args.arch} has a fixed ResNet-18 "
                         "encoder (64..512 channels, 5 downsamplings); drop them or use --arch bionet")


def main(argv: list[str] | None = None) -> int:
    """Parse, check the options, the output folder and the data, train; returns 0, 1 (an I/O error
    during training; what was saved is kept), 2 (bad input, nothing done) or 3 (training diverged)."""
    try:
        args = parse_args(argv)
        check_writable(Path(args.out), "--out")
        tio.check_out_folder(args.out, bool(args.resume), args.overwrite)
        changes = resume_changes(args) if args.resume else []
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.lr == 0:
        print("warning: --lr 0: the weights will not change (only the BatchNorm statistics will)", file=sys.stderr)
    accumulation = accumulation_warning(args.grad_accum_steps, args.steps, args.epochs)
    if accumulation:
        print(accumulation, file=sys.stderr)
    return run(args, changes)


def run(args: TrainConfig, changes: list[str] | None = None) -> int:
    """Train with parsed options; returns the exit code (see main)."""
    rank, world, device = setup_distributed(args.device)
    main, lock, out = rank == 0, None, Path(args.out)
    if args.threads is None:  # resolved once and saved: a resumed run uses the same count (bit for bit)
        args.threads = default_threads() if device.type == "cpu" else torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        try:
            train, val, train_text, val_text = build_data(args.data)
            args, mpp_note = _training_mpp(args, train)
            train_text += f"; {mpp_note}" if mpp_note else ""
            plan = None
            if args.memory_budget:
                args, plan = _memory_plan(args, device, main)
            trainer = Trainer(args, rank, world, device, train, val)
            if plan is not None:
                plan.apply(trainer.model)
            lock = take_folder(args) if main else None
            if args.resume:
                trainer.resume()
            if main:
                tio.write_json(out / ARGS_JSON, args.to_json())
        except (FileNotFoundError, ValueError, RunLocked) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if main:
            _print_plan(args, trainer, world, device, train_text, val_text)
            if changes:
                print(f"resumed with changed options: {'; '.join(changes)}", flush=True)
        start = time.perf_counter()
        try:
            trainer.fit()
        except Diverged as err:
            _print_diverged(args, trainer, err)
            return 3
        except OSError as err:
            print(f"error: {err}. Training stopped: {_kept(trainer, out)}.", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print(f"interrupted; continue with: python -m bionet_fast.train --resume {out}", file=sys.stderr)
            return 130
        if main:
            _print_summary(args, trainer, time.perf_counter() - start)
        return 0
    finally:
        if lock is not None:
            lock.release()
        if world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _training_mpp(args: TrainConfig, train) -> tuple[TrainConfig, str]:
    """The pixel size of the training data (--train-mpp, else read from the image files) into the
    run's config, so the "inference" block records it; and a note for the log."""
    from .data.pixel_size import dataset_mpp

    if args.train_mpp is not None:
        return args, f"pixel size {args.train_mpp:g} um/px (--train-mpp)"
    if args.synthetic:
        return args, ""
    base = getattr(train, "dataset", train)
    mpp, note = dataset_mpp([s.image for s in getattr(base, "samples", [])])
    return dataclasses.replace(args, train_mpp=mpp), note


def _memory_plan(args: TrainConfig, device, main: bool):
    """--memory-budget: plan (engine/planner.py), print it, and return the config with the planned
    batch size and checkpointing; DoesNotFit (a ValueError naming what fits) stops before training."""
    from .engine.planning.planner import plan_training

    if args.arch == "biolinknet":
        model = BiOLinkNetConfig(in_channels=args.in_channels, classes=args.classes, iterations=args.t,
                                 bn_momentum=args.bn_momentum)
    else:
        model = BiONetConfig(in_channels=args.in_channels, classes=args.classes, iterations=args.t,
                             multiplier=args.multiplier, depth=args.depth, backward_skips=args.backward_skips,
                             integrate=args.integrate, backend=args.backend)
    precision = ("bf16" if args.amp_dtype == "bfloat16" else "fp16") if args.amp else "fp32"
    batch = "auto" if args.auto_batch and not args.resume else args.batch_size
    plan = plan_training(model, batch, args.image_size, precision, args.memory_budget, device)
    if main:
        print(plan.describe(), flush=True)
    return dataclasses.replace(args, batch_size=plan.batch_size,
                               checkpoint_iters=plan.checkpointing.iters), plan


def _kept(trainer: Trainer, out: Path) -> str:
    done = trainer.saved
    return (f"the last good checkpoint (after {done['epoch']} epoch(s), step {done['global_step']}) is intact "
            f"in {out}" if done else "nothing had been saved yet")


def _print_diverged(args: TrainConfig, trainer: Trainer, err: Diverged) -> None:
    """One message whatever the learning rate and wherever the divergence showed."""
    out, lower = Path(args.out), f"a lower --lr (e.g. {args.lr / 10:g})"
    hint = " or --amp-dtype bfloat16" if args.amp and args.amp_dtype == "float16" else ""
    then = (f"continue from it with --resume {out} and {lower}{hint}" if trainer.saved else
            f"start again with {lower}{hint}")
    print(f"error: training diverged: {err}. Training stopped: {_kept(trainer, out)}; {then}.", file=sys.stderr)


def _print_plan(args, trainer, world, device, train_text, val_text) -> None:
    n = sum(p.numel() for p in trainer.model.parameters())
    backend = trainer.model.resolved_backend(device)
    print(f"training data:   {train_text}\nvalidation data: {val_text}")
    shape = ("BiO-LinkNet (ResNet-18)" if args.arch == "biolinknet" else
             f"BiO-Net x{args.multiplier} depth {args.depth}{' INT' if args.integrate else ''}")
    print(f"model: {shape} t={args.t}"
          f", {n:,} parameters, {args.task}; {device}{f' x{world} processes' if world > 1 else ''}, backend "
          f"{backend}{', iteration checkpointing' if args.checkpoint_iters else ''}"
          f"{f', AMP {args.amp_dtype}' if args.amp else ''}"
          f"{f', {args.threads} CPU thread(s) (--threads)' if device.type == 'cpu' else ''}")
    print(f"recipe: {args.epochs} epochs x {args.steps} steps x batch {args.batch_size}, Adam lr {args.lr} "
          f"decay {args.lr_decay}, augmentation {'off' if args.no_augment else 'on'}, seed {args.seed}")
    print(f"output: {args.out}", flush=True)


def _print_summary(args, trainer, seconds: float) -> None:
    out, p = Path(args.out), trainer.progress
    key = "PSNR" if args.task == "super-resolution" else "IoU"
    best = next((r for r in trainer.records if r["epoch"] == p["best_epoch"]), None)
    extra = f" (Dice {best['dice']:.4f})" if best and "dice" in best else ""
    print(f"done in {seconds:.0f} s. Best validation {key} {p['best']:.4f}{extra} at epoch {p['best_epoch']}.")
    print(f"  best model      {out / 'model.safetensors'} + config.json  (bionet_fast.from_pretrained('{out}'))")
    print(f"  last weights    {out / tio.LAST_WEIGHTS}\n  resume state    {out / tio.STATE_JSON}")
    print(f"  per-epoch log   {out / tio.METRICS_JSONL}\n  plots           {out / 'curves.png'}, "
          f"{out / 'samples.png'}")
    print(f"  evaluate:  python -m bionet_fast.evaluate --checkpoint {out} --data DIR")
    print(f"  predict:   python -m bionet_fast.predict --checkpoint {out} IMAGES... --out DIR")


if __name__ == "__main__":
    raise SystemExit(main())
