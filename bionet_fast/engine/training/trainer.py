"""One training run of a BiO-Net: the loss, the (torchrun) distributed setup and the Trainer (model,
Adam with Keras-style LR decay, AMP, DDP, augmentation, precise BatchNorm, validation, saving and
resuming). The command line around it is :mod:`bionet_fast.train`.
"""
from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ...data.training import EpochSampler, mix_seed, set_dataset_epoch, uniform_sizes
from ...models import create_model

from .. import checkpoint_io as tio
from ..cuda_graph import GraphedTrainStep, GraphStepOptions, say_stderr
from .divergence import Diverged, NonFiniteLoss, check_grads, check_model, check_value, output_guard  # noqa: F401
from .finetune import FineTuning, run_inference_info
from .train_notes import changed_accumulation_note
from ..prediction.inference import evaluate_loader, inference_window, pick_device
from ..prediction.instance_eval import object_meter
from .train_config import TrainConfig
from .plots import plot_curves, plot_samples


# Precise BatchNorm runs its images as one batch: at most this many pixels (64 crops of 256x256;
# 16 whole 512x512 images), which bounds its memory (no gradients are kept).
PRECISE_BN_PIXELS = 64 * 256 * 256


def precise_bn_images(requested: int, size) -> int:
    """How many `size` (H, W) images precise BatchNorm uses: `requested`, at most PRECISE_BN_PIXELS."""
    return max(1, min(requested, PRECISE_BN_PIXELS // max(int(size[0]) * int(size[1]), 1)))


@torch.no_grad()
def set_batch_statistics(model: nn.Module, x: torch.Tensor) -> None:
    """Set every BatchNorm's running statistics to those of one train-mode forward of the batch x
    (B, C, H, W): afterwards model.eval()(x) equals the train-mode output on x (but for the
    unbiased variance). The model is left in train mode."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in bns]
    model.train()
    for m in bns:
        m.reset_running_stats()  # num_batches_tracked too: momentum=None averages restart from here
        m.momentum = 1.0  # running statistics = this batch's
    try:
        model(x)
    finally:
        for m, momentum in zip(bns, momenta):
            m.momentum = momentum


def loss_fn(logits: torch.Tensor, target: torch.Tensor, task: str) -> torch.Tensor:
    """BCE with logits (one class), cross-entropy on label maps (several), MSE (super-resolution)."""
    logits = logits.float()
    if task == "super-resolution":
        return F.mse_loss(logits, target)
    if logits.shape[1] == 1:
        return F.binary_cross_entropy_with_logits(logits, target)
    return F.cross_entropy(logits, target[:, 0].long())


def setup_distributed(device_name: str = "auto") -> tuple[int, int, torch.device]:
    """(rank, world size, device) from torchrun's environment (1 process without it); joins the
    process group (NCCL on CUDA, gloo on the CPU) when there are several."""
    world, rank = int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("RANK", 0))
    local = int(os.environ.get("LOCAL_RANK", 0))
    device = pick_device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local if world > 1 else torch.cuda.current_device())
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world, device


class Trainer:
    """One training run: model, optimizer, Keras-style LR decay, AMP, DDP, validation, saves."""

    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device, train: Dataset,
                 val: Dataset):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.out, self.train, self.main = Path(cfg.out), train, rank == 0
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        shape = (dict(multiplier=cfg.multiplier, depth=cfg.depth, backward_skips=cfg.backward_skips,
                      integrate=cfg.integrate, padding_mode=cfg.padding_mode) if cfg.arch == "bionet" else {})  # BiO-Net's own options
        self.model = create_model(cfg.arch, in_channels=cfg.in_channels, classes=cfg.classes,
                                  iterations=cfg.t, bn_momentum=cfg.bn_momentum, **shape,
                                  checkpoint_iters=cfg.checkpoint_iters, backend=cfg.backend).to(device)
        # --initial-checkpoint (architecture checked here, before training), accumulation, clipping, EMA
        self.finetune = FineTuning(cfg, self.model)
        self.sync_calls = None
        if cfg.sync_bn and world > 1:
            self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            # The blocks may call F.batch_norm with a BatchNorm's parameters rather than the module:
            # count the module calls to tell the user if the statistics are really synchronised.
            self.sync_calls = [0]
            sync = next(m for m in self.model.modules() if isinstance(m, torch.nn.SyncBatchNorm))
            sync.register_forward_hook(lambda *_: self.sync_calls.__setitem__(0, self.sync_calls[0] + 1))
        if cfg.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        decay = cfg.lr_decay
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda step: 1.0 / (1.0 + decay * step))
        fp16 = cfg.amp and cfg.amp_dtype == "float16"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16 and device.type == "cuda")
        self.autocast = lambda: torch.autocast(device.type, dtype=getattr(torch, cfg.amp_dtype),
                                               enabled=cfg.amp)
        self.net = torch.compile(self.model) if cfg.compile else self.model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            # static_graph: the same parameters are used every step, but not all of them (without INT,
            # the last UP BatchNorm of the non-final iterations feeds nothing).
            self.net = torch.nn.parallel.DistributedDataParallel(self.net, device_ids=ids, static_graph=True)
        self.graph = None
        if cfg.cuda_graph:
            self.graph = GraphedTrainStep(self.net, self.opt,
                                          lambda logits, y: loss_fn(logits, y, cfg.task), device,
                                          GraphStepOptions.of(cfg, world),
                                          say=say_stderr if rank == 0 else None)
        self.augment = None
        if not cfg.no_augment:
            from ...data.augment import Augment  # torch only (affine_grid + grid_sample)

            self.augment = Augment(mask_mode="bilinear" if cfg.task == "super-resolution" else "nearest")
        self.sampler = EpochSampler(len(train), cfg.steps * cfg.batch_size, cfg.seed, rank, world)
        shard = Subset(val, list(range(rank, len(val), world))) if world > 1 else val
        same = uniform_sizes(val)  # every item, not the first few: mixed sizes go one at a time
        base = val.dataset if isinstance(val, Subset) else val
        self.rand = getattr(base, "fmt", None) == "tiff-stack" and cfg.task == "segmentation"  # EM stacks
        # instance labels (annotations, label maps): AJI, PQ and object F1 beside Dice
        self.objects = getattr(base, "has_instances", False) and cfg.task == "segmentation"
        self.val_loader = DataLoader(shard, batch_size=cfg.batch_size if same else 1,
                                     num_workers=min(cfg.workers, 2))
        self.progress = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "best": None, "best_epoch": None,
                         "loss_sum": 0.0, "loss_count": 0}
        self.records: list[dict] = []
        self.last_save = time.monotonic()
        self.saved: dict | None = None  # the progress of the last save
        self.pending_save = False  # a mid-epoch save is due (made at the next step)

    @property
    def args(self) -> TrainConfig:
        """The former name of :attr:`cfg`."""
        return self.cfg

    # -- persistence --
    def resume(self) -> None:
        self.progress = tio.load_training_state(self.out, self.model, self.opt, self.sched, self.scaler,
                                                ema=self.finetune.ema)  # the EMA of the same generation
        self._accumulation_changed()
        # --lr / --lr-decay given with --resume take effect: the restored scheduler holds the old base
        # rate. Same rates: the same float as the scheduler's own (base * lambda(step)), bit for bit.
        self.sched.base_lrs = [self.cfg.lr] * len(self.opt.param_groups)
        for group in self.opt.param_groups:
            group["initial_lr"] = self.cfg.lr
            group["lr"] = self.cfg.lr * self.sched.lr_lambdas[0](self.sched.last_epoch)
        self.sched._last_lr = [g["lr"] for g in self.opt.param_groups]
        self.saved = dict(self.progress)
        self.records = tio.truncate_metrics(self.out, self.progress["epoch"]) if self.main else []

    def _accumulation_changed(self) -> None:
        """A resume with another --grad-accum-steps: an unfinished cycle's gradients are dropped, said."""
        saved = tio.read_json(self.out / tio.ARGS_JSON, "the run's options") if (self.out / tio.ARGS_JSON).is_file() else {}
        old = int(saved.get("grad_accum_steps") or 1)
        note = changed_accumulation_note(old, self.finetune.accum, self.progress["global_step"])
        if note is None:
            return
        self.opt.zero_grad(set_to_none=True)
        if self.main:
            print(note, file=sys.stderr)

    def _buffers(self) -> dict[str, torch.Tensor]:
        return {n: b.detach().clone() for n, b in self.model.named_buffers()}

    def _swap_buffers(self, new: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        old = self._buffers()
        with torch.no_grad():
            for n, b in self.model.named_buffers():
                b.copy_(new[n])
        return old

    def _accumulated(self) -> dict[str, torch.Tensor]:
        """The gradients summed so far in an unfinished --grad-accum-steps cycle: what a resume at
        the current global step needs ({} at the start of a cycle)."""
        if self.finetune.starts_cycle(self.progress["global_step"]):
            return {}
        return {n: q.grad.detach().clone() for n, q in self.model.named_parameters() if q.grad is not None}

    def save(self, best: bool = False, buffers: dict | None = None, grads: dict | None = None) -> None:
        """Save the state (with `buffers` as the BatchNorm statistics and `grads` as the accumulated
        gradients, if given; else the current ones); a state holding a NaN/inf is never written
        (Diverged)."""
        if not self.main:
            return
        current = self._swap_buffers(buffers) if buffers is not None else None
        try:
            check_model(self.model, f"before the save at global step {self.progress['global_step']}")
            tio.save_tensors(self.out / tio.LAST_WEIGHTS, self.model.state_dict(), {"format": "pt"})
            if best:  # the validated model (the EMA's with --model-ema) and its inference block
                best_model = self.finetune.eval_model(self.model)
                best_model.inference_info = run_inference_info(
                    self.cfg, self.records[-1] if self.records else None, self.cfg.train_data or "synthetic")
                best_model.save_pretrained(self.out)
            if self.finetune.ema is not None:
                self.finetune.ema.save(self.out)
            tio.save_training_state(self.out, self.model, self.opt, self.sched, self.scaler, self.progress,
                                    self._accumulated() if grads is None else grads,
                                    ema=None if self.finetune.ema is None else self.finetune.ema.state_tensors())
        finally:
            if current is not None:
                self._swap_buffers(current)
        self.last_save = time.monotonic()
        self.saved = dict(self.progress)

    # -- one step --
    def _graphing(self) -> bool:
        """Whether --cuda-graph replays the steps (not: no CUDA, DDP, a failed capture ...)."""
        return self.graph is not None and self.graph.enabled

    def step(self, x: torch.Tensor, y: torch.Tensor, epoch: int, step: int) -> float:
        a, p = self.cfg, self.progress
        x, y = x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)
        if self.augment is not None:
            gen = torch.Generator().manual_seed(mix_seed(a.seed, epoch, step, self.rank))
            x, y = self.augment(x, y, generator=gen)
        if a.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        poison = a.debug_nan_at_step is not None and p["global_step"] == a.debug_nan_at_step
        where = f"at epoch {epoch + 1}, step {step + 1} (global step {p['global_step'] + 1})"
        # A mid-epoch save is made here, one step late: the state after the previous update is only
        # called good once its own loss (this forward) is finite. The forward updates the BatchNorm
        # running statistics, so the saved ones are those from before it.
        pending = self.main and self.pending_save and not self._graphing()
        before = self._buffers() if pending else None
        grads_before = self._accumulated() if pending else None  # this step's backward adds to them
        # --cuda-graph: the whole step replayed (None: this batch runs eagerly below). Its loss is
        # checked after its update, still before any save (engine/cuda_graph.py).
        graphed = self.graph.step(x, y) if self.graph is not None and not poison else None
        loss = graphed
        if graphed is None:
            with self.autocast():
                logits = self.net(x)
            loss = loss_fn(logits, y, a.task)
        if poison:
            loss = loss * float("nan")
        check = loss.detach().clone()
        if self.world > 1:
            dist.all_reduce(check)  # every rank stops together
        value = float(check) / self.world
        check_value(value, "training loss", where)
        if graphed is None:
            if self.finetune.starts_cycle(p["global_step"]):  # --grad-accum-steps: sum over the cycle
                self.opt.zero_grad(set_to_none=True)
            self.scaler.scale(loss / self.finetune.loss_scale()).backward()
            if not self.scaler.is_enabled():  # float16's scaler skips steps with inf gradients itself
                check_grads(self.model, where)
        if pending:  # after the backward: it needs the statistics buffers as they were in the forward
            self.save(buffers=before, grads=grads_before)
        self.pending_save = False
        stepping = graphed is not None or self.finetune.ends_cycle(p["global_step"])
        if graphed is None and stepping:
            self.finetune.clip_gradients(self.model, self.opt, self.scaler)
            self.scaler.step(self.opt)
            self.scaler.update()
        if stepping:  # the LR schedule and the EMA count optimizer steps
            self.finetune.after_step(self.model)
            self.sched.step()
        return value

    def epoch(self, epoch: int) -> None:
        a, p = self.cfg, self.progress
        skip = p["step_in_epoch"]
        set_dataset_epoch(self.train, epoch)
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
            if a.debug_kill_at_step is not None and p["global_step"] == a.debug_kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)  # as `kill -9`: no handler, no cleanup
            every = a.save_every_steps and p["global_step"] % a.save_every_steps == 0
            if every or time.monotonic() - self.last_save > 60 * a.save_every_minutes:
                self.pending_save = True  # made at the next step, once this state's loss is finite
                if self._graphing():  # the graphed step updates before its loss is known
                    check_model(self.model, f"after global step {p['global_step']}")
                    self.save()
        self.pending_save = False  # the epoch's own save (after validation) replaces it
        bar.close()
        self.epoch_time = time.perf_counter() - start
        self.images_per_s = (a.steps - skip) * a.batch_size * self.world / max(self.epoch_time, 1e-9)

    @torch.no_grad()
    def recalibrate_bn(self, epoch: int) -> None:
        """Precise BatchNorm: set every running statistic to the statistics of ONE train-mode forward
        of `--precise-bn` training images (no augmentation) in a single batch (fewer when they pass
        PRECISE_BN_PIXELS). Eval mode then reproduces that forward exactly on those images: each
        BatchNorm sees the inputs the upstream ones produced with the same statistics. Averaging
        the statistics of several smaller batches does not (each batch normalised its layers with
        its own statistics), and the recurrence amplifies the mismatch iteration after iteration:
        held-out Dice 0.71 with four batches of 16 vs 0.87 with one batch of 64 and 0.88 with 256 (the
        same weights, t=5; issue 16, case 14). The running averages of training are worse still."""
        a = self.cfg
        if not a.precise_bn:
            return
        n = precise_bn_images(a.precise_bn, self.train[0][0].shape[-2:])
        sampler = EpochSampler(len(self.train), n, mix_seed(a.seed, epoch, 1), self.rank, self.world)
        x, _ = next(iter(DataLoader(self.train, batch_size=n, sampler=sampler, num_workers=a.workers)))
        x = x.to(self.device)
        with self.autocast():  # the EMA's statistics with --model-ema
            set_batch_statistics(self.finetune.eval_model(self.model),
                                 x.contiguous(memory_format=torch.channels_last) if a.channels_last else x)

    @torch.no_grad()
    def validate(self) -> tuple[dict, list]:
        a = self.cfg
        model = self.finetune.eval_model(self.model)  # the EMA weights with --model-ema
        if self.world > 1:  # evaluate every shard with rank 0's BatchNorm statistics
            for buf in model.buffers():
                dist.broadcast(buf, 0)
        where = f"in the validation after epoch {self.progress['epoch'] + 1}"
        guard = output_guard(model, where)  # before any metric sees a NaN
        try:
            meters, loss_sum, n, kept = evaluate_loader(
                model, self.val_loader, a.task, self.device, inference_window(a) or 512,
                keep=4 if self.main else 0, objects=object_meter(target=a.target) if self.objects else None,
                rand=self.rand, autocast=self.autocast(), target=a.target)
        finally:
            guard.remove()
        states = [torch.from_numpy(np.append(m.state(), [loss_sum, n])) for m in meters]
        if self.world > 1:
            for s in states:
                dist.all_reduce(s)
        result = {}
        for meter, s in reversed(list(zip(meters, states))):
            result.update(meter.compute(s[:-2].numpy()))
        result["val_loss"] = float(states[0][-2] / max(float(states[0][-1]), 1))
        check_value(result["val_loss"], "validation loss", where)
        return result, kept

    def fit(self) -> int:
        a, p = self.cfg, self.progress
        key = "psnr" if a.task == "super-resolution" else "iou"
        for epoch in range(p["epoch"], a.epochs):
            self.epoch(epoch)
            self.recalibrate_bn(epoch)
            check_model(self.model, f"after epoch {epoch + 1} and its BatchNorm re-estimation")
            metrics, kept = self.validate()
            record = {"epoch": epoch + 1, "global_step": p["global_step"],
                      "train_loss": p["loss_sum"] / max(p["loss_count"], 1), **metrics,
                      "lr": float(self.sched.get_last_lr()[0]), "epoch_time_s": round(self.epoch_time, 3),
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
        scores += f"  AJI {r['aji']:.4f}  PQ {r['pq']:.4f}" if "aji" in r else ""
    return (f"epoch {r['epoch']}: train loss {r['train_loss']:.4f}  val loss {r['val_loss']:.4f}  {scores}  "
            f"({r['epoch_time_s']:.0f} s, {r['images_per_s']:.0f} img/s){'  * best' if best else ''}")
