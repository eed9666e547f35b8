"""Why does a trained BiONet's answer depend on the inference window? (issue 16, case 14)

    OMP_NUM_THREADS=1 python -m bench.window_size RUN_DIR [--n 12] [--size 128] [--batch-bn] [--diagnose]

Prints, for a saved run (a folder with config.json + model.safetensors):
  (a) pooled Dice on `n` held-out synthetic images (the trainer's validation images when size is
      128) at windows 64, 128, ... up to the whole image, with the BatchNorms in eval mode (running
      statistics) and, with --batch-bn, in "batch" mode (each window normalised with its own
      statistics, running statistics untouched);
  (b) with --diagnose: per iteration, the relative difference between the deep features (decoder outputs fed back
      as backward skips) of a crop-sized window and the same region cut from a whole-image forward,
      in the window's interior and at its border;
      and the same for the output logits;
  (c) with --diagnose: per BatchNorm, in forward order, how far its input's statistics on 64-pixel
      crops, whole 128 images and a 256 image are from its running statistics.
"""
from __future__ import annotations

import argparse

import torch

from bionet_fast import BiONet
from bionet_fast.blocks import no_stats_update
from bionet_fast.blocks import reference
from bionet_fast.blocks.reference import RefOps
from bionet_fast.data.training import synthetic_heldout
from bionet_fast.engine.prediction.inference import infer
from bionet_fast.metrics import SegmentationMeter


def dice(model: BiONet, images: list, window: int, batch_bn: bool) -> float:
    """Pooled Dice over (image (C, S, S), mask (1, S, S)) pairs at `window`; batch_bn: BatchNorms
    normalise each window with its own statistics (train mode, running statistics frozen)."""
    meter = SegmentationMeter(1)
    for x, y in images:
        if batch_bn:
            with no_stats_update(), torch.no_grad():
                model.train()
                prob = torch.cat([_windows(model, x[None], window)])
        else:
            prob = infer(model, x[None], "segmentation", window)
        meter.update(prob, y[None])
    model.eval()
    return meter.compute()["dice"]


def _windows(model: BiONet, x: torch.Tensor, window: int) -> torch.Tensor:
    """Non-overlapping windows one at a time (batch statistics per window): (1, C, S, S) -> probs."""
    out = torch.zeros(1, 1, *x.shape[-2:])
    for i in range(0, x.shape[-2], window):
        for j in range(0, x.shape[-1], window):
            out[..., i:i + window, j:j + window] = torch.sigmoid(model(x[..., i:i + window, j:j + window]))
    return out


@torch.no_grad()
def features(model: BiONet, x: torch.Tensor) -> tuple[list, torch.Tensor]:
    """Per iteration, the decoder features of level 0 (B, c0, H/2, W/2) (eval mode), and the logits."""
    ops, cfg = RefOps(), model.config
    model.eval()
    x0 = model._stem(ops, x)
    backs, feats, out = None, [], None
    for i in range(cfg.iterations):
        out, backs = model._iteration(ops, i, x0, backs)
        feats.append([b for b in backs if b is not None])
    return feats, model._head(ops, out)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm().clamp_min(1e-12))


def compare(model: BiONet, x: torch.Tensor, crop: int) -> None:
    """A crop-sized window at the centre of x (1, C, S, S) vs the same region of the whole forward."""
    s = x.shape[-1]
    o = (s - crop) // 2 // model.size_multiple * model.size_multiple  # keep the pooling phase
    fw, lw = features(model, x[..., o:o + crop, o:o + crop])
    ff, lf = features(model, x)
    print(f"window {crop} at offset {o} of a {s} image; rel. difference window vs whole "
          "(deepest / shallowest backward-skip feature; interior = the window minus a quarter each side)")
    for i, (a_lv, b_lv) in enumerate(zip(fw, ff)):
        row = []
        for a, b in ((a_lv[-1], b_lv[-1]), (a_lv[0], b_lv[0])):
            scale = s // b.shape[-1]
            oo, cc = o // scale, crop // scale
            bb = b[..., oo:oo + cc, oo:oo + cc]
            q = max(cc // 4, 1) if cc >= 4 else 0
            inner = rel(a[..., q:cc - q, q:cc - q], bb[..., q:cc - q, q:cc - q]) if q else float("nan")
            row.append(f"{tuple(a.shape[-2:])}: all {rel(a, bb):.3f} interior {inner:.3f}")
        print(f"  iteration {i}: " + " | ".join(row))
    q = crop // 4
    lfc = lf[..., o:o + crop, o:o + crop]
    print(f"  logits: all {rel(lw, lfc):.3f} interior {rel(lw[..., q:-q, q:-q], lfc[..., q:-q, q:-q]):.3f}")


@torch.no_grad()
def bn_drift(model: BiONet, batches: dict) -> None:
    """Per BatchNorm (forward order), in eval mode: how far the statistics of its input on each batch
    are from its running statistics: mean over channels of |batch mean - running mean| / running std
    and of |log(batch var / running var)|."""
    rows = {}
    names = {m: n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    order: list = []

    def hook(mod, x):
        x = x.double()
        m, v = x.mean((0, 2, 3)), x.var((0, 2, 3))
        rm, rv = mod.running_mean.double(), mod.running_var.double() + mod.eps
        # medians over channels: a dead channel (running var ~ 0) would make a mean infinite
        d = ((m - rm).abs() / rv.sqrt()).median().item(), (v / rv).log().abs().median().item()
        if names[mod] not in order:
            order.append(names[mod])
        rows.setdefault(names[mod], {})[current[0]] = d

    current, plain = [None], reference.batch_norm

    def spy(x, bn):  # RefOps calls the functional batch_norm, so module hooks would not fire
        hook(bn, x)
        return plain(x, bn)

    model.eval()
    reference.batch_norm = spy
    try:
        for label, x in batches.items():
            current[0] = label
            model(x)
    finally:
        reference.batch_norm = plain
    print("BatchNorm input vs running statistics (medians over channels of: mean shift in running std | |log var ratio|):")
    print("  " + f"{'layer':28s}" + "".join(f"{k:>22s}" for k in batches))
    for n in order:
        print("  " + f"{n:28s}" + "".join(f"{rows[n][k][0]:11.2f}{rows[n][k][1]:11.2f}" for k in batches))


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run", help="a run folder (config.json + model.safetensors)")
    p.add_argument("--n", type=int, default=12, help="held-out synthetic images (default 12)")
    p.add_argument("--size", type=int, default=128, help="their side (default 128, the validation size)")
    p.add_argument("--batch-bn", action="store_true", help="also score with per-window batch statistics")
    p.add_argument("--diagnose", action="store_true", help="print (b) and (c): features and BN drift")
    a = p.parse_args(argv)
    model = BiONet.from_pretrained(a.run, backend="reference").eval()
    crop = 64
    held, _ = synthetic_heldout(a.n, a.size)
    images = [held[i] for i in range(a.n)]
    windows = [w for w in (crop, 2 * crop, 4 * crop, 8 * crop) if w <= a.size]
    for batch_bn in (False, True) if a.batch_bn else (False,):
        scores = {w: round(dice(model, images, w, batch_bn), 3) for w in windows}
        print(f"Dice, {a.n} images {a.size}x{a.size}, BatchNorm "
              f"{'batch stats' if batch_bn else 'running stats'}, by window: {scores}", flush=True)
    if a.diagnose:
        compare(model, images[0][0][None], crop)
        whole = torch.stack([x for x, _ in images[:8]])
        big, _ = synthetic_heldout(1, 256)
        bn_drift(model, {"crops 64": whole[..., 32:96, 32:96], "whole 128": whole,
                         "whole 256": big[0][0][None]})


if __name__ == "__main__":
    main()
