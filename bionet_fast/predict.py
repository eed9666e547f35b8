"""Segment new images, up to whole slides, with a trained BiO-Net.

    python -m bionet_fast.predict --checkpoint runs/bionet-t5 IMAGE_OR_FOLDER... --out DIR
    torchrun --nproc_per_node 4 -m bionet_fast.predict --checkpoint RUN SLIDES/ --out DIR   # many slides

Accepts PNG, JPEG, BMP, TIFF / BigTIFF / OME-TIFF / SVS / NDPI (pyramids: --level or --mpp), other
whole-slide formats through tiffslide or openslide-python (pip install 'bionet_fast[slides]'), and
folders of them. Images of any size are processed in overlapping windows, blended, and read and
written a row of windows at a time: memory is set by the window and the image width, not the slide.
For each image NAME writes:
  PNG / JPEG / BMP inputs:
    NAME_mask.png   the nuclei mask, 0 = background, 255 = nucleus (probability > --threshold: the
                    model's, from its config.json, 0.5 unless set)
                    (several classes: the class index of every pixel)
    NAME_prob.png   the nucleus probability as a 16-bit grey PNG (0..65535 = 0..1), or NAME_prob.tif
                    (float32; several classes: an ImageJ hyperstack, one channel per class)
  TIFF and whole-slide inputs (tiled BigTIFF, zlib, the input's pixel size carried over):
    NAME_mask.tif   uint8 mask as above
    NAME_prob.tif   uint16 probability (0..65535 = 0..1; float32 with --prob-format tiff), one grey
                    page per class
  --instances       NAME_labels.tif: nuclei labels (holes filled, touching nuclei separated: --split),
                    uint16 below 65,536 nuclei, else uint32
  --geojson         NAME.geojson: one polygon per nucleus with QuPath's measurement names and, for
                    K classes, a classification (QuPath: drag and drop onto the image)
  --measurements    NAME_nuclei.csv: label, centroid, area, regionprops shape and intensity columns
  --rois            NAME_rois.zip: ImageJ ROIs (Fiji's ROI Manager)
Pixel size: each image is read at the model's pixel size (config.json, from its training data, or
--mpp): the next finer pyramid level, resampled; the outputs are in the slide's level-0 pixels
and pixel size, so they overlay the original. An image without a pixel size is predicted as it is.
Multi-page TIFF stacks give NAME_mask.tif (Z grey pages) / NAME_prob.tif (ImageJ ZCYX); a TIFF
whose pages differ in size gives one output page per input page.
Outputs appear under their names only when complete; a rerun skips images whose outputs are all
there (--overwrite redoes them). Under torchrun (or RANK / WORLD_SIZE set) the images are split
across the processes, each image done by exactly one.
For a super-resolution model the input is the low-resolution image; it is upsampled --sr-scale
times (bicubic) and refined: NAME_sr.png.
"""
from __future__ import annotations

if __name__ == "__main__":  # this program's own process only, before torch loads (never on import)
    from ._process import configure_cli_process

    configure_cli_process()

import argparse
import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._cli import (AT_LEAST_1, FRACTION, PROBABILITY, WINDOW, add_engine_arguments, check_numbers, check_writable,
                   inference_options, model_target, model_threshold)
from .data.readers import IMAGE_EXTS, TIFF_EXTS, match_channels, read_image, read_stack, to_float
from .engine.prediction.engines import inference_setup
from .engine.prediction.inference import TASKS, infer, load_for_inference, window_predictor
from .engine.prediction.pixel_size import min_area_pixels, open_for_prediction, parse_min_area
from .engine.precision import PRECISIONS
from .engine.prediction.slide import SLIDE_EXTS, file_mpp
from .engine.prediction.split import SPLITS, SplitOptions, require_split_libs, resolve_split
from .engine.prediction.streaming import StreamOptions
from .engine.prediction.names import safe_name
from .engine.prediction.predict_batch import (BatchReport, ImageClaim, check_tiff, drop_earlier_outputs, folder_error,
                                   shard_of)
from .engine.prediction.whole_slide import OutputOptions, expected_outputs, predict_image
from .engine.prediction.writers import write_outputs, write_pages, write_stack

INPUT_EXTS = IMAGE_EXTS + SLIDE_EXTS + (".btf",)


def collect_images(inputs: list[str]) -> list[Path]:
    """Files as given; folders expanded to their image files (sorted); a file named twice counts
    once. Raises for missing paths."""
    files: list[Path] = []
    for item in inputs:
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in p.iterdir() if f.suffix.lower() in INPUT_EXTS and not f.name.startswith("."))
            if not found:
                raise ValueError(f"folder {p} holds no images ({', '.join(INPUT_EXTS)})")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such image file or folder")
    seen: set[Path] = set()
    return [f for f in files if not (f.resolve() in seen or seen.add(f.resolve()))]


def output_names(files: list[Path]) -> list[str]:
    """One output name per input, never two alike: the file's stem, or where stems collide
    (a/im0.png, b/im0.png) the path from the colliding files' common folder joined by "__", with
    the extension added if that still collides (im0.png, im0.tif)."""
    stems = [f.stem for f in files]  # (then sanitised as the writers do: engine.names.safe_name)
    names = list(stems)
    for stem in set(stems):
        group = [i for i, s in enumerate(stems) if s == stem]
        if len(group) < 2:
            continue
        common = Path(os.path.commonpath([str(files[i].resolve().parent) for i in group]))
        for i in group:
            rel = files[i].resolve().relative_to(common)
            names[i] = "__".join(rel.with_suffix("").parts)
        if len({names[i] for i in group}) < len(group):
            for i in group:
                names[i] += "_" + files[i].suffix.lstrip(".").lower()
    names = [safe_name(n) for n in names]  # compared as written: x[1] and x_1 both write x_1_*
    clash = sorted({n for n in names if names.count(n) > 1})
    if clash:
        raise ValueError(f"inputs would share the output name(s) {', '.join(clash)}: rename one of "
                         f"{', '.join(str(f) for f, n in zip(files, names) if n in clash)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bionet_fast.predict", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files or folders of images")
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="the --out folder of a training run (or an official .pt checkpoint)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the masks and probability maps")
    p.add_argument("--prob-format", choices=("png", "tiff"), default="png",
                   help="probability maps as 16-bit PNG / uint16 TIFF (default) or float32 TIFF")
    p.add_argument("--tile-size", type=int,
                   help="window side (default: the model's, from its config.json: 512 for reflect-padded BiO-Nets, "
                        "the training crop for zero-padded ones, else 512)")
    p.add_argument("--overlap", type=float, default=0.25, help="window overlap fraction in [0, 1) (default 0.25)")
    p.add_argument("--batch-size", type=int, default=4, help="windows per model call (default 4)")
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on CUDA and on CPUs with native bf16 "
                   "(AVX512-BF16 / AMX), else fp32; bf16/fp16 run channels_last")
    p.add_argument("--level", type=int, help="predict this pyramid level as it is (0 = full resolution; outputs "
                                             "still in level-0 coordinates)")
    p.add_argument("--mpp", type=float, help="predict at this many micrometres per pixel (the next finer pyramid "
                                             "level, resampled; default: the model's pixel size from its "
                                             "config.json, else each image's own)")
    p.add_argument("--tissue-only", action="store_true",
                   help="skip windows without tissue (threshold on a low-resolution thumbnail)")
    p.add_argument("--instances", action="store_true",
                   help="also write NAME_labels.tif (nuclei labels: uint16 below 65,536 nuclei, else uint32)")
    p.add_argument("--geojson", action="store_true", help="also write NAME.geojson (QuPath detections)")
    p.add_argument("--measurements", action="store_true", help="also write NAME_nuclei.csv")
    p.add_argument("--rois", action="store_true", help="also write NAME_rois.zip (ImageJ ROIs; needs roifile)")
    p.add_argument("--min-area", metavar="AREA",
                   help="drop nuclei smaller than this: 10um2, 15px, or a number (um2 where the pixel size "
                        "is known, else level-0 pixels); default 10um2, or 15px without a pixel size")
    p.add_argument("--split", choices=SPLITS, default="auto",
                   help="separate touching nuclei in --instances / --geojson / --measurements: watershed (of the "
                        "distance map), contour (from the interiors of a --target contour model), none (connected "
                        "components); default auto: watershed")
    p.add_argument("--threshold", type=float,
                   help="nucleus where the probability exceeds this (default: the model's, from its config.json; 0.5)")
    p.add_argument("--overwrite", action="store_true", help="redo images whose outputs already exist")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--task", choices=TASKS, help="default: the task the checkpoint was trained for")
    p.add_argument("--sr-scale", type=int, help="super-resolution factor (default: the training one)")
    p.add_argument("--device", default="auto", help="auto (GPU if present), cpu, cuda, cuda:1 ...")
    p.add_argument("--backend", default="auto", choices=("auto", "reference", "triton"))
    p.add_argument("--cuda-graph", action="store_true",
                   help="CUDA: replay a captured forward per window shape (less launch overhead); "
                        "without CUDA: a message, then eager")
    add_engine_arguments(p)
    return p


# Every numeric option, checked before any work by _cli.check_numbers (the message names the flag).
NUMBERS = dict(tile_size=WINDOW, overlap=FRACTION,
               batch_size=AT_LEAST_1,
               level=(lambda v: v >= 0, "a pyramid level >= 0"),
               mpp=(lambda v: v > 0, "micrometres per pixel > 0, e.g. 0.5"),
               sr_scale=(lambda v: v >= 1, "an integer factor >= 1"), threshold=PROBABILITY, threads=AT_LEAST_1)


def validate(args: argparse.Namespace) -> None:
    """Every numeric argument checked before any work: a ValueError naming the flag and the fix."""
    check_numbers(args, NUMBERS)
    if args.min_area is not None:
        parse_min_area(args.min_area)
    if args.level is not None and args.mpp is not None:
        raise ValueError("--level and --mpp both given: pick the level by one of them")


def _shard(files: list[Path], names: list[str]) -> tuple[list[tuple[Path, str]], int, int]:
    """This process' share of the images under torchrun (RANK / WORLD_SIZE): every WORLD_SIZE-th."""
    rank, world = shard_of()
    return [fn for i, fn in enumerate(zip(files, names)) if i % world == rank], rank, world


def _device(name: str) -> str:
    local = os.environ.get("LOCAL_RANK")
    if local is not None and name == "auto" and torch.cuda.is_available():
        return f"cuda:{int(local) % torch.cuda.device_count()}"
    return name


def _tiff_kind(path: Path) -> str:
    """'slide' (one plane, or a pyramid / SVS / NDPI / OME: its first series), 'stack' (planes of
    one size), or 'pages' (pages of different sizes: every page is predicted)."""
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        if len(series.levels) > 1 or tif.is_svs or tif.is_ndpi or tif.is_ome:
            return "slide"
        if len({(p.imagelength, p.imagewidth) for p in tif.pages}) > 1:
            return "pages"
        planes = int(np.prod([n for n, a in zip(series.shape, series.axes) if a not in "YXS"]))
        return "stack" if planes > 1 else "slide"


def _as_input(page: np.ndarray, in_channels: int, path: Path) -> torch.Tensor:
    """(H, W, C) stored page -> float (1, in_channels, H, W)."""
    x = match_channels(to_float(page.reshape(*page.shape[:2], -1)), in_channels, path)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))[None]


class _Job:
    """What every image of a run shares: the model, its predictor, the options."""

    def __init__(self, args, model, device, task, scale, tile):
        self.args, self.model, self.device, self.task, self.scale, self.tile = args, model, device, task, scale, tile
        setup = inference_setup(model, device, args.engine, args.precision, args.threads, args.cuda_graph)
        self.autocast, self.channels_last, self.forward = setup.autocast, setup.channels_last, setup.forward
        self.predictor = window_predictor(model, task, self.autocast, self.channels_last, self.forward)
        self.stream = StreamOptions(tile, args.overlap, args.batch_size, tissue_only=args.tissue_only,
                                    progress=not args.no_progress)
        self.threshold = model_threshold(model, args.threshold)
        target = model_target(model)
        split = SplitOptions(resolve_split(args.split, target))
        if args.instances or args.geojson or args.measurements or args.rois:
            require_split_libs(split)  # a missing scikit-image named before any image is read
        self.outputs = OutputOptions(args.prob_format, args.instances, args.geojson, args.measurements, 0,
                                     self.threshold, args.rois, class_names(model, target), split, target)
        info = getattr(model, "inference_info", None)
        self.mpp = args.mpp or getattr(info, "mpp", None)  # predict at the training data's pixel size
        self.precision, self.setup = setup.precision, setup

    def _warn_once(self, message: str, **kwargs) -> None:
        """The first image without a pixel size is named; the others are not (a folder of PNGs)."""
        if not getattr(self, "_warned", False):
            print(message + " (said once; other such images are predicted the same way)", **kwargs)
            self._warned = True

    def kind(self, path: Path) -> str:
        if self.task == "super-resolution":
            return "sr"
        if path.suffix.lower() in TIFF_EXTS:
            return _tiff_kind(path)
        return "slide" if path.suffix.lower() in SLIDE_EXTS + (".btf",) else "image"

    def expected(self, path: Path, name: str) -> list[str]:
        kind = self.kind(path)
        if kind in ("slide", "image"):
            return expected_outputs(name, kind == "slide", self.outputs, self.model.config.classes)
        if kind == "sr":
            return [f"{name}_sr.png"]
        return [f"{name}_mask.tif", f"{name}_prob.tif"]

    def run(self, path: Path, name: str, out: Path) -> list[Path]:
        kind = self.kind(path)
        cfg = self.model.config
        if kind in ("slide", "image"):
            reader, geometry = open_for_prediction(path, self.mpp, self.args.level, warn=self._warn_once)
            try:
                outputs = replace(self.outputs, min_area=min_area_pixels(self.args.min_area, geometry))
                return predict_image(reader, self.predictor, cfg.in_channels, cfg.classes, self.model.size_multiple,
                                     self.stream, outputs, out, name, self.device, geometry)
            finally:
                reader.close()
        if kind == "pages":
            import tifffile

            with tifffile.TiffFile(path) as tif:
                outs = [self._infer(_as_input(p.asarray(), cfg.in_channels, path))[0].numpy() for p in tif.pages]
            print(f"note: {path} has {len(outs)} pages of different sizes; each is predicted", file=sys.stderr)
            return write_pages(out, name, outs, file_mpp(path), self.threshold)
        pages = read_stack(path) if path.suffix.lower() in TIFF_EXTS else read_image(path)[None]
        results = []
        for page in pages:
            x = _as_input(page, cfg.in_channels, path)
            if kind == "sr":
                x = F.interpolate(x, scale_factor=self.scale, mode="bicubic", align_corners=False).clamp(0, 1)
            results.append(self._infer(x)[0])
        if kind == "sr" and len(results) == 1:
            return write_outputs(out, name, results[0], self.task)
        return write_stack(out, name, torch.stack(results), self.task, file_mpp(path), self.threshold)

    def _infer(self, x: torch.Tensor) -> torch.Tensor:
        return infer(self.model, x.to(self.device), self.task, self.tile, self.args.overlap,
                     sw_batch_size=self.args.batch_size, autocast=self.autocast,
                     channels_last=self.channels_last, out_device="cpu", forward=self.forward)


def class_names(model, target: str = "mask") -> list[str] | None:
    """Names of the classes 0..K-1 of a K-class model (a classification per nucleus), or None (one
    class, or a contour model, whose 3 channels are parts of a nucleus, not kinds of them)."""
    k = model.config.classes if target == "mask" else 1
    return ["Background"] + [f"Class {i}" for i in range(1, k)] if k > 1 else None


def _predict_one(job: _Job, path: Path, name: str, out: Path, args, report: BatchReport) -> str:
    """One image under its lock (engine.predict_batch): "written", "skipped" or "busy"."""
    check_tiff(path)  # 0-size pages, missing tiles: named from the header, before any write
    expected = job.expected(path, name)
    claim = ImageClaim(out, name)
    if not claim.take():
        report.skip_busy(path, claim.owner)
        return "busy"
    try:
        if not args.overwrite and all((out / f).is_file() for f in expected):
            print(f"{path}: outputs complete, skipped (--overwrite to redo)")
            return "skipped"
        job.run(path, name, out)
    finally:
        claim.release()
    print(f"{path} -> {out / name}_*")
    return "written"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        validate(args)
        shard_of()  # RANK / WORLD_SIZE checked before any work
        files = collect_images(args.images)
        out = check_writable(Path(args.out), "--out")
        files, dropped = drop_earlier_outputs(files, out)
        if dropped:
            print(f"note: {dropped} file(s) in {out} are earlier outputs (NAME_mask, NAME_prob ...): not predicted "
                  "again", file=sys.stderr)
        if not files:
            raise ValueError(f"no images left to predict: every input in {out} is an earlier output")
        names = output_names(files)
        args.device = _device(args.device)
        model, device, task, scale, tile = load_for_inference(inference_options(args))
        if tile < model.size_multiple:
            raise ValueError(f"--tile-size {tile}: the model needs windows of at least {model.size_multiple} "
                             f"pixels (a multiple of 2**(depth+1)); use e.g. --tile-size {4 * model.size_multiple}")
        job = _Job(args, model, device, task, scale, tile)
        mine, rank, world = _shard(files, names)
        report = BatchReport()
        done = {"written": 0, "skipped": 0, "busy": 0}
        for path, name in mine:
            try:
                done[_predict_one(job, path, name, out, args, report)] += 1
            except Exception as err:  # noqa: BLE001 - one bad file is reported, the batch goes on
                if folder_error(err, out):
                    raise OSError(f"cannot write into --out {out}: {err}; free space or choose another "
                                  "--out") from err
                report.fail(path, err)
        written, skipped = done["written"], done["skipped"]
    except (FileNotFoundError, ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    share = f" (process {rank} of {world}: {len(mine)} of {len(files)} images)" if world > 1 else ""
    print(f"wrote predictions of {written} image(s) to {out}" + (f", skipped {skipped} complete" if skipped else "")
          + share + f"; {job.setup.describe()}")
    if report.summary():
        print(report.summary(), file=sys.stderr)
    return report.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
