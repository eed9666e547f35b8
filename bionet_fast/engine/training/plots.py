"""Training plots: curves.png (loss and metrics per epoch) and samples.png (image | truth | prediction).

A leaf module (matplotlib with the non-interactive Agg backend; nothing of bionet_fast).
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np
import torch


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # no display needed (servers, CI)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | Path, dpi: int = 110) -> None:
    from ...utils.files import atomic_write

    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png"))


def plot_curves(records: Sequence[dict], path: str | Path, task: str = "segmentation") -> None:
    """records: metrics.jsonl lines ({"epoch", "train_loss", "val_loss", "dice", "iou", ...}).
    Left: training and validation loss; right: Dice and IoU (or PSNR beside the bicubic PSNR)."""
    plt = _pyplot()
    epochs = [r["epoch"] for r in records]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key, label in (("train_loss", "training loss"), ("val_loss", "validation loss")):
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            ax_loss.plot(epochs, values, marker="o", ms=3, label=label)
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_metric):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("MSE" if task == "super-resolution" else "cross-entropy")
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    ax_loss.legend()
    keys = (("psnr", "PSNR (BiO-Net)"), ("psnr_bicubic", "PSNR (bicubic)")) if task == "super-resolution" \
        else (("dice", "Dice"), ("iou", "IoU"), ("rand_f", "Rand F-score"))
    for key, label in keys:
        values = [r.get(key) for r in records]
        if any(v is not None for v in values):
            ax_metric.plot(epochs, values, marker="o", ms=3, label=label)
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel("dB" if task == "super-resolution" else "score")
    if task != "super-resolution":
        ax_metric.set_ylim(0, 1)
    ax_metric.set_title("validation")
    ax_metric.grid(alpha=0.3)
    ax_metric.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, path)
    plt.close(fig)


def _to_hwc(t: torch.Tensor) -> np.ndarray:
    """(C, H, W) in [0, 1] -> (H, W) for one channel, (H, W, 3) for three."""
    a = t.detach().float().clamp(0, 1).cpu().numpy()
    return a[0] if a.shape[0] == 1 else np.moveaxis(a[:3], 0, -1)


def plot_samples(images: torch.Tensor, truths: torch.Tensor, preds: torch.Tensor, path: str | Path,
                 task: str = "segmentation", titles: Sequence[str] | None = None) -> None:
    """One row per sample: image | truth | prediction.

    images (N, C, H, W) in [0, 1]; segmentation: truths (N, 1, H, W) {0, 1} or label maps,
    preds (N, K, H, W) probabilities (one class: the nucleus probability is shown, with the 0.5
    contour of the truth drawn over it); super-resolution: truths and preds (N, C, H, W) images
    and the image column is the bicubic input.
    """
    plt = _pyplot()
    n = images.shape[0]
    names = titles or (("bicubic input", "original", "BiO-Net") if task == "super-resolution"
                       else ("image", "truth", "prediction (probability)"))
    fig, axes = plt.subplots(n, 3, figsize=(7.5, 2.5 * n), squeeze=False)
    for i in range(n):
        img, truth, pred = images[i], truths[i], preds[i]
        if task != "super-resolution" and pred.shape[0] > 1:
            pred = pred.argmax(0, keepdim=True).float() / max(pred.shape[0] - 1, 1)
            truth = truth.float() / max(float(truth.max()), 1.0)
        cmap = "gray" if task == "super-resolution" or img.shape[0] == 1 else None
        axes[i, 0].imshow(_to_hwc(img), cmap=cmap if img.shape[0] == 1 else None)
        axes[i, 1].imshow(_to_hwc(truth), cmap=cmap if truth.shape[0] == 1 else None, vmin=0, vmax=1)
        axes[i, 2].imshow(_to_hwc(pred), cmap=("magma" if task != "super-resolution" else cmap)
                          if pred.shape[0] == 1 else None, vmin=0, vmax=1)
        if task != "super-resolution" and truth.shape[0] == 1:
            axes[i, 2].contour(_to_hwc(truth), levels=[0.5], colors="cyan", linewidths=0.6)
        for j in range(3):
            axes[i, j].set_xticks([])
            axes[i, j].set_yticks([])
            if i == 0:
                axes[i, j].set_title(names[j], fontsize=9)
    fig.tight_layout()
    _save(fig, path, dpi=100)
    plt.close(fig)
