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
from pathlib import Path

import math
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from bionet_fast import BiONet

from . import trainer_io as tio
from .evaluate import evaluate_loader, pick_device
from .plots import plot_curves, plot_samples
from .trainer_io import ARGS_JSON, has_training_state

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



# --- data ----------------------------------------------------------------------------------------------
class EpochSampler(torch.utils.data.Sampler):
    """`per_rank` indices per process and epoch: permutations of the dataset seeded by (seed, epoch),
    concatenated as often as needed, every `world`-th index to one rank (DistributedSampler's
    sharding); `set_epoch(epoch, skip)` skips the indices already used (mid-epoch resume)."""

    def __init__(self, n: int, per_rank: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.per_rank, self.seed, self.rank, self.world = n, per_rank, seed, rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __iter__(self):
        g = torch.Generator().manual_seed(_mix(self.seed, self.epoch))
        total = self.per_rank * self.world
        idx = torch.cat([torch.randperm(self.n, generator=g) for _ in range(math.ceil(total / self.n))])
        return iter(idx[:total][self.rank::self.world][self.skip:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.skip


def _mix(*numbers: int) -> int:
    """A 63-bit seed from several integers (numpy's SeedSequence hashing)."""
    return int(np.random.SeedSequence([abs(int(n)) for n in numbers]).generate_state(2, np.uint64)[0] >> 1)


class SyntheticCrops(Dataset):
    """Synthetic nuclei (image (C, S, S), mask (1, S, S)), random `crop`-sided crops seeded by
    (seed, epoch, index); super-resolution: (bicubic-degraded image, image)."""

    def __init__(self, base: Dataset, crop, seed: int, sr_scale=None):
        self.base, self.crop, self.seed, self.sr_scale, self.epoch = base, crop, seed, sr_scale, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        image, mask = self.base[i]
        size = image.shape[-1]
        if self.crop and self.crop < size:
            y, x = np.random.default_rng([self.seed, self.epoch, i]).integers(0, size - self.crop + 1, 2)
            image, mask = (t[:, y:y + self.crop, x:x + self.crop] for t in (image, mask))
        if self.sr_scale:
            from .data import degrade_bicubic

            return degrade_bicubic(image, self.sr_scale), image
        return image, mask


def build_data(args) -> tuple[Dataset, Dataset, str, str]:
    """(train, validation, train description, validation description); raises ValueError /
    FileNotFoundError naming the file and the expected layout, before anything is trained."""
    sr = args.sr_scale if args.task == "super-resolution" else None
    if args.synthetic:
        from .synthetic import SyntheticNucleiDataset

        size = max(128, args.image_size)
        base = SyntheticNucleiDataset(args.n_train, size, seed=args.seed, channels=args.in_channels)
        held = SyntheticNucleiDataset(args.n_val, size, seed=2**31 - 1, channels=args.in_channels)
        return (SyntheticCrops(base, args.image_size, args.seed, sr), SyntheticCrops(held, None, 0, sr),
                base.describe() + f", random {args.image_size}x{args.image_size} crops",
                held.describe() + " (held out)")
    from .data import SegmentationDataset

    kw = dict(in_channels=args.in_channels, task=args.task, sr_scale=args.sr_scale)
    train = SegmentationDataset(args.train_data, args.data_format, image_size=args.image_size, train=True,
                                seed=args.seed, **kw)
    if args.image_size is None:
        m = 2 ** (args.depth + 1)
        if len(set(train.shapes)) > 1 or train.shapes[0][0] % m or train.shapes[0][1] % m:
            raise ValueError(f"{args.train_data}: images of sizes {sorted(set(train.shapes))[:4]} (H, W) cannot "
                             f"be batched whole; pass --image-size (a multiple of {m}, e.g. {4 * m}) to train "
                             "on random crops")
    if args.valid_data:
        val = SegmentationDataset(args.valid_data, args.data_format, train=False, **kw)
        return train, val, train.describe(), val.describe()
    if len(train.samples) < 2:
        raise ValueError(f"{args.train_data} holds one image: pass --valid-data DIR for validation")
    full = SegmentationDataset(args.train_data, args.data_format, train=False, **kw)
    order = np.random.default_rng(args.seed).permutation(len(full))
    n_val = max(1, len(full) // 10)
    return (Subset(train, order[n_val:].tolist()), Subset(full, order[:n_val].tolist()),
            f"{train.describe()}; {len(full) - n_val} of them for training",
            f"the other {n_val} (no --valid-data given)")


def _set_epoch(ds: Dataset, epoch: int) -> None:
    ds = ds.dataset if isinstance(ds, Subset) else ds
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)


# --- training -----------------------------------------------------------------------------------------
class NonFiniteLoss(RuntimeError):
    pass


def loss_fn(logits: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """BCE with logits (one class), cross-entropy on label maps (several), MSE (super-resolution)."""
    logits = logits.float()
    if task == "super-resolution":
        return F.mse_loss(logits, target)
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target[:, 0].long())


def _setup_distributed(args) -> tuple[int, int, torch.device]:
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(args.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class Trainer:
    """One training run: model, optimizer, Keras-style LR decay, AMP, DDP, validation, saves."""

    def __init__(self, args, rank: int, world: int, device: torch.device, train: Dataset, val: Dataset):
        self.args, self.rank, self.world, self.device = args, rank, world, device
        self.out, self.train, self.main = Path(args.out), train, rank == 0
        torch.manual_seed(args.seed)
        np.random.seed(args.seed % 2**32)
        self.model = BiONet(args.in_channels, args.classes, args.t, args.multiplier, args.depth,
                            args.backward_skips, args.integrate, args.bn_momentum,
                            checkpoint_iters=args.checkpoint_iters, backend=args.backend).to(device)
        self.sync_calls = None
        if args.sync_bn and world > 1:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # The blocks may call F.batch_norm with a BatchNorm's parameters rather than the module:
            # count the module calls to tell the user if the statistics are really synchronised.
            self.sync_calls = [0]
            sync = next(m for m in self.model.modules() if isinstance(m, torch.nn.SyncBatchNorm))
            sync.register_forward_hook(lambda *_: self.sync_calls.__setitem__(0, self.sync_calls[0] + 1))
        if args.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=args.lr)
        decay = args.lr_decay
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0 / (1.0 + decay * step))
        fp16 = args.amp and args.amp_dtype == "float16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16 and device.type == "cuda")
        self.autocast = lambda: torch.autocast(device.type, dtype=getattr(torch, args.amp_dtype),
                                               enabled=args.amp)
        self.net = torch.compile(self.model) if args.compile else self.model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            # static_graph: the same parameters are used every step, but not all of them (without INT,
            # the last UP BatchNorm of the non-final iterations feeds nothing).
            self.net = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids, static_graph=True)
        self.augment = None
        if not args.no_augment:
            try:
                from .augment import Augment
            except ImportError as err:  # kornia missing
                raise ValueError(f"the augmentation needs kornia ({err}): pip install kornia, or pass "
                                 "--no-augment") from err
            self.augment = Augment(mask_mode="bilinear" if args.task == "super-resolution" else "nearest")
        self.sampler = EpochSampler(len(train), args.steps * args.batch_size, args.seed, rank, world)
        shard = Subset(val, list(range(rank, len(val), world))) if world > 1 else val
        same = len({tuple(val[i][0].shape) for i in range(min(len(val), 16))}) == 1
        base = val.dataset if isinstance(val, Subset) else val
        self.rand = getattr(base, "fmt", None) == "tiff-stack" and args.task == "segmentation"  # EM stacks
        self.val_loader = DataLoader(shard, batch_size=args.batch_size if same else 1,
                                     num_workers=min(args.workers, 2))
        self.progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None, "best_epoch": None,
                         "loss_sum": 0.0, "loss_count": 0}
        self.records: list[dict] = []
        self.last_save = time.monotonic()
        self.saved: dict | None = None  # the progress of the last save

    # -- persistence --
    def resume(self) -> None:
        self.progress = tio.load_training_state(self.out, self.model, self.opt, self.sched, self.scaler)
        self.saved = dict(self.progress)
        self.records = tio.truncate_metrics(self.out, self.progress["epoch"]) if self.main else []

    def save(self, best: bool = False) -> None:
        if not self.main:
            return
        tio.save_tensors(self.out / tio.LAST_WEIGHTS, self.model.state_dict(), {"format": "pt"})
        if best:
            self.model.save_pretrained(self.out)
        tio.save_training_state(self.out, self.model, self.opt, self.sched, self.scaler, self.progress)
        self.last_save = time.monotonic()
        self.saved = dict(self.progress)

    # -- one step --
    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> float:
        a, p = self.args, self.progress
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.augment is not None:
            gen = torch.Generator().manual_seed(_mix(a.seed, epoch, step, self.rank))
            x, y = self.augment(x, y, generator=gen)
        if a.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            logits = self.net(x)
        loss = loss_fn(logits, y, a.task)
        if a.debug_nan_at_step is not None and p["global_step"] == a.debug_nan_at_step:
            loss = loss * float("nan")
        check = loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(check)  # every rank stops together
        value = float(check) / self.world
        if not math.isfinite(value):
            raise NonFiniteLoss(f"the training loss became {value} at epoch {epoch + 1}, step {step + 1} "
                                f"(global step {p['global_step'] + 1})")
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return value

    def epoch(self, epoch: int) -> None:
        a, p = self.args, self.progress
        skip = p["step_in_epoch"]
        _set_epoch(self.train, epoch)
        self.sampler.set_epoch(epoch, skip * a.batch_size)
        loader = DataLoader(self.train, batch_size=a.batch_size, sampler=self.sampler, drop_last=True,
                            num_workers=a.workers, pin_memory=self.device.type == "cuda")
        self.model.train()
        bar = tqdm(total=a.steps, initial=skip, desc=f"epoch {epoch + 1}/{a.epochs}", unit="step",
                   disable=a.quiet or not self.main, dynamic_ncols=True, leave=False)
        start = time.perf_counter()
        for step, (x, y) in enumerate(loader, start=skip):
            value = self.step(x, y, epoch, step)
            if self.sync_calls == [0] and self.main:
                print("warning: --sync-bn has no effect: this backend normalises without calling the "
                      "SyncBatchNorm modules", file=sys.stderr)
                self.sync_calls = None
            p["global_step"] += 1
            p["step_in_epoch"] = step + 1
            p["loss_sum"] += value
            p["loss_count"] += 1
            rate = (step + 1 - skip) * a.batch_size * self.world / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{p['loss_sum'] / p['loss_count']:.4f}", img_s=f"{rate:.1f}", refresh=False)
            bar.update()
            if a.debug_exit_at_step is not None and p["global_step"] == a.debug_exit_at_step:
                raise KeyboardInterrupt("--debug-exit-at-step")
            every = a.save_every_steps and p["global_step"] % a.save_every_steps == 0
            if every or time.monotonic() - self.last_save > 60 * a.save_every_minutes:
                self.save()
        bar.close()
        self.epoch_time = time.perf_counter() - start
        self.images_per_s = (a.steps - skip) * a.batch_size * self.world / max(self.epoch_time, 1e-9)

    @torch.no_grad()
    def recalibrate_bn(self, epoch: int) -> None:
        """Precise BatchNorm: set the running statistics to the population statistics of
        `--precise-bn` training images (no augmentation), in batches of up to 16, under the current
        weights. The running averages of training lag behind weights that change quickly, and with
        the paper's batch of 2 they average small-batch variances, which miss the differences
        between images (staining): eval-mode predictions then fall far below train-mode ones."""
        a = self.args
        if not a.precise_bn:
            return
        bns = [m for m in self.model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
        batch = min(a.precise_bn, 16)
        sampler = EpochSampler(len(self.train), math.ceil(a.precise_bn / batch) * batch,
                               _mix(a.seed, epoch, 1), self.rank, self.world)
        loader = DataLoader(self.train, batch_size=batch, sampler=sampler, num_workers=a.workers)
        self.model.train()
        for k, (x, _) in enumerate(loader, start=1):
            for m in bns:
                m.momentum = 1.0 / k  # running = mean of the k batch statistics so far
            x = x.to(self.device)
            with self.autocast():
                self.model(x.contiguous(memory_format=torch.channels_last) if a.channels_last else x)
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum

    @torch.no_grad()
    def validate(self) -> tuple[dict, list]:
        a = self.args
        if self.world > 1:  # evaluate every shard with rank 0's BatchNorm statistics
            for buf in self.model.buffers():
                dist.broadcast(buf, 0)
        meters, loss_sum, n, kept = evaluate_loader(
            self.model, self.val_loader, a.task, self.device, a.tile_size or a.image_size or 512,
            keep=4 if self.main else 0,
            rand=self.rand, autocast=self.autocast())
        states = [torch.from_numpy(np.append(m.state(), [loss_sum, n])) for m in meters]
        if self.world > 1:
            for s in states:
                dist.all_reduce(s)
        result = {}
        for meter, s in reversed(list(zip(meters, states))):
            result.update(meter.compute(s[:-2].numpy()))
        result["val_loss"] = float(states[0][-2] / max(float(states[0][-1]), 1))
        return result, kept

    def fit(self) -> int:
        a, p = self.args, self.progress
        key = "psnr" if a.task == "super-resolution" else "iou"
        for epoch in range(p["epoch"], a.epochs):
            self.epoch(epoch)
            self.recalibrate_bn(epoch)
            metrics, kept = self.validate()
            record = {"epoch": epoch + 1, "global_step": p["global_step"],
                      "train_loss": p["loss_sum"] / max(p["loss_count"], 1), **metrics,
                      "lr": self.sched.get_last_lr()[0], "epoch_time_s": round(self.epoch_time, 3),
                      "images_per_s": round(self.images_per_s, 2)}
            best = p["best"] is None or metrics[key] > p["best"]
            if best:
                p["best"], p["best_epoch"] = metrics[key], epoch + 1
            p.update(epoch=epoch + 1, step_in_epoch=0, loss_sum=0.0, loss_count=0)
            if self.main:
                self.records.append(record)
                tio.append_metrics(self.out, record)
                self.save(best=best)
                plot_curves(self.records, self.out / "curves.png", a.task)
                if kept:
                    plot_samples(*(torch.stack(z) for z in zip(*kept)), self.out / "samples.png", a.task)
                print(_epoch_line(record, a.task, best), flush=True)
        return 0


def _epoch_line(r: dict, task: str, best: bool) -> str:
    if task == "super-resolution":
        scores = f"PSNR {r['psnr']:.2f} dB (bicubic {r['psnr_bicubic']:.2f})"
    else:
        scores = f"Dice {r['dice']:.4f}  IoU {r['iou']:.4f}" + (f"  Rand F {r['rand_f']:.4f}" if "rand_f" in r else "")
    return (f"epoch {r['epoch']}: train loss {r['train_loss']:.4f}  val loss {r['val_loss']:.4f}  {scores}  "
            f"({r['epoch_time_s']:.0f} s, {r['images_per_s']:.0f} img/s){'  * best' if best else ''}")


def run(args) -> int:
    """Train with parsed options; returns the exit code."""
    rank, world, device = _setup_distributed(args)
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
