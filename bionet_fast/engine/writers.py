"""Output writers of evaluate and predict: masks, probability maps, super-resolved images."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
import torch
from PIL import Image


def _safe(name: str) -> str:
    return name.replace("[", "_").replace("]", "")


def write_outputs(folder: str | Path, name: str, out: torch.Tensor, task: str = "segmentation",
                  prob_format: str = "png") -> list[Path]:
    """Write one output (K, H, W): segmentation -> NAME_mask.png + NAME_prob.png/.tif;
    super-resolution -> NAME_sr.png. Returns the paths written."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    name = _safe(name)
    a = out.detach().float().cpu().numpy()
    if task == "super-resolution":
        rgb = np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8)
        rgb = rgb[0] if rgb.shape[0] == 1 else np.moveaxis(rgb, 0, -1)
        path = folder / f"{name}_sr.png"
        Image.fromarray(rgb).save(path)
        return [path]
    mask = (a[0] > 0.5).astype(np.uint8) * 255 if a.shape[0] == 1 else a.argmax(0).astype(np.uint8)
    paths = [folder / f"{name}_mask.png"]
    Image.fromarray(mask).save(paths[0])
    if prob_format == "png" and a.shape[0] == 1:
        paths.append(folder / f"{name}_prob.png")
        Image.fromarray(np.rint(np.clip(a[0], 0, 1) * 65535).astype(np.uint16)).save(paths[1])
    else:
        paths.append(folder / f"{name}_prob.tif")
        tifffile.imwrite(paths[1], a.astype(np.float32))
    return paths


def write_stack(folder: Path, name: str, outs: torch.Tensor, task: str) -> None:
    """(N, K, H, W) of a TIFF stack -> multi-page NAME_mask.tif and NAME_prob.tif (or NAME_sr.tif)."""
    folder.mkdir(parents=True, exist_ok=True)
    a = outs.float().cpu().numpy()
    if task == "super-resolution":
        tifffile.imwrite(folder / f"{name}_sr.tif", np.rint(np.clip(a, 0, 1) * 255).astype(np.uint8))
        return
    mask = (a[:, 0] > 0.5).astype(np.uint8) * 255 if a.shape[1] == 1 else a.argmax(1).astype(np.uint8)
    tifffile.imwrite(folder / f"{name}_mask.tif", mask)
    tifffile.imwrite(folder / f"{name}_prob.tif", a.astype(np.float32))
