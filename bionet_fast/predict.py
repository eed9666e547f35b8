"""Segment new images with a trained BiO-Net.

    python -m bionet_fast.predict --checkpoint runs/bionet-t5 IMAGE_OR_FOLDER... --out DIR

Accepts PNG, JPEG, BMP and TIFF files of any size (whole 1000x1000 MoNuSeg tiles or larger: they
are processed in overlapping tiles and blended), and folders of them. For each image NAME writes:
  NAME_mask.png   the nuclei mask, 0 = background, 255 = nucleus (probability > 0.5)
                  (several classes: the class index of every pixel)
  NAME_prob.png   the nucleus probability as a 16-bit grey PNG (0..65535 = 0..1), or NAME_prob.tif
                  (float32, one page per class) with --prob-format tiff
Multi-page TIFF stacks give multi-page NAME_mask.tif / NAME_prob.tif.
For a super-resolution model the input is the low-resolution image; it is upsampled --sr-scale
times (bicubic) and refined: NAME_sr.png.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._cli import inference_options
from .engine.inference import TASKS, infer, load_for_inference
from .engine.writers import write_outputs, write_stack
from .data.readers import IMAGE_EXTS, TIFF_EXTS, match_channels, read_image, read_stack, to_float



def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted). Raises for missing paths."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in IMAGE_EXTS and not f.name.startswith("."))
            if not found:
                raise ValueError(f"folder {p} holds no images ({', '.join(IMAGE_EXTS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    return files


def _read_pages(path: Path, in_channels: int) -> list[torch.Tensor]:
    """Every page of an image file as float (C, H, W) in [0, 1] with the model's channel count."""
    pages = read_stack(path) if path.suffix.lower() in TIFF_EXTS else read_image(path)[None]
    return [torch.from_numpy(np.ascontiguousarray(match_channels(to_float(p), in_channels, path)
                                                  .transpose(2, 0, 1))) for p in pages]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bionet_fast.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the --out folder of a training run (or an official .pt checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the masks and probability maps")
    p.add_argument("--prob-format", choices=("png", "tiff"), default="png",
                   help="probability maps as 16-bit PNG (default) or float32 TIFF")
    p.add_argument("--tile-size", type=int,
                   help="images are processed in overlapping tiles of this side (default: the training "
                        "--image-size, else 512); smaller uses less memory")
    p.add_argument("--overlap", type=float, default=0.25, help="tile overlap fraction (default 0.25)")
    p.add_argument("--task", choices=TASKS,
                   help="default: the task the checkpoint was trained for")
    p.add_argument("--sr-scale", type=int, help="super-resolution factor (default: the training one)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, device, task, scale, tile = load_for_inference(inference_options(args))
        files = collect_images(args.images)
        out = Path(args.out)
        written = 0
        for path in files:
            pages = _read_pages(path, model.config.in_channels)
            results = []
            for x in pages:
                x = x[None].to(device)
                if task == "super-resolution":
                    x = F.interpolate(x, scale_factor=scale, mode="bicubic", align_corners=False).clamp(0, 1)
                results.append(infer(model, x, task, tile, args.overlap)[0])
            if len(results) == 1:
                write_outputs(out, path.stem, results[0], task, args.prob_format)
            else:
                write_stack(out, path.stem, torch.stack(results), task)
            written += 1
            print(f"{path} -> {out / path.stem}_*")
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote predictions of {written} image(s) to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
