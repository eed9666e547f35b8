"""Dataset-layout discovery (pairing images with masks) and the training/validation Dataset.

Layouts (``fmt``), checked and paired before any training starts:

* ``folder``: ``ROOT/x/NAME.png`` + ``ROOT/y/NAME.png`` (official MoNuSeg preprocessing), or
  ``ROOT/images/`` + ``ROOT/masks/`` (or ``ROOT/labels/``), or MoNuSeg's training data as
  downloaded, ``ROOT/Tissue Images/NAME.tif`` + ``ROOT/Annotations/NAME.xml``. Image and mask are
  paired by file stem; the mask's extension may differ (``NAME.png`` with ``NAME.tif``, or an
  Aperio ``.xml`` / QuPath ``.geojson`` annotation) and it may be named ``NAME_mask.EXT``.
* ``annotated``: ``ROOT/NAME.tif`` + ``ROOT/NAME.xml`` (MoNuSeg's test data as downloaded) or
  ``ROOT/NAME.EXT`` + ``ROOT/NAME.geojson`` (a QuPath export beside its image), side by side.
* ``tnbc``: ``ROOT/Slide_XX/NAME.png`` + ``ROOT/GT_XX/NAME.png``, paired by folder number XX
  and file stem.
* ``tiff-stack`` (EM): multi-page TIFFs, every page a sample. Either at the top level, where
  a file whose name contains label/labels/mask/masks/membrane/membranes/gt/groundtruth is a
  label stack and every other ``.tif`` an image stack (pairs match by the rest of the name:
  ``stack1_image.tif`` + ``stack1_label.tif``, ISBI's ``train-volume.tif`` +
  ``train-labels.tif``; one image and one label stack always pair), or ``ROOT/x/NAME.tif`` +
  ``ROOT/y/NAME.tif`` (or images/ + masks/ or labels/) paired by stem.
* ``images``: a flat folder of images without masks (prediction, super-resolution).
* ``auto``: ``Slide_XX/`` folders: tnbc; ``x/``, ``images/`` or ``Tissue Images/``: folder
  (tiff-stack if their first TIFF has several pages); top-level images with a same-named .xml or
  .geojson: annotated; top-level TIFFs with a label name: tiff-stack; other top-level images:
  images (only where masks are not required).

Masks: binary masks, class label maps (--classes K), instance label maps (uint16 PNG/TIFF, the
Cellpose/StarDist format) and annotation files (:mod:`bionet_fast.data.annotations`, rasterised
into instance labels). The training target stays the binary (or class) mask; the instance labels
are kept beside it for the object metrics (``return_instances``).

Reading and decoding the files (and what a mask's foreground is) is :mod:`bionet_fast.readers`.

A leaf of the package: it imports only the rest of the data layer (and metrics.label_components).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from .annotations import class_index, read_target, stated_mpp
from .readers import (IMAGE_EXTS, TIFF_EXTS, binarize, count_pages, label_map, match_channels, read_image,
                      read_stack, to_float)

__all__ = ["Sample", "discover", "detect_format", "degrade_bicubic", "SegmentationDataset", "FORMATS", "LAYOUTS"]

FORMATS = ("auto", "folder", "tnbc", "tiff-stack", "annotated", "images")
TASKS = ("segmentation", "super-resolution")
PAIR_DIRS = (("x", "y"), ("images", "masks"), ("images", "labels"), ("Tissue Images", "Annotations"))
NOTE_EXTS = (".xml", ".geojson")  # annotation files found beside images or in a mask folder
MASK_EXTS = IMAGE_EXTS + NOTE_EXTS
LABEL_WORDS = {"label", "labels", "mask", "masks", "membrane", "membranes", "gt", "groundtruth"}
IMAGE_WORDS = {"image", "images", "img", "imgs", "volume", "raw"}
LAYOUTS = """expected one of these layouts:
  folder:     ROOT/x/NAME.png + ROOT/y/NAME.png (official MoNuSeg), or ROOT/images/ + ROOT/masks/ (or labels/),
              or ROOT/Tissue Images/NAME.tif + ROOT/Annotations/NAME.xml (MoNuSeg as downloaded);
              a mask may have another extension (.xml Aperio, .geojson QuPath) or be named NAME_mask.EXT
  annotated:  ROOT/NAME.tif + ROOT/NAME.xml (MoNuSeg test data) or ROOT/NAME.png + ROOT/NAME.geojson
  tnbc:       ROOT/Slide_XX/NAME.png + ROOT/GT_XX/NAME.png
  tiff-stack: ROOT/NAME_image.tif + ROOT/NAME_label.tif multi-page stacks (also *mask*, *membrane*, *gt*;
              train-volume.tif + train-labels.tif), or ROOT/x/NAME.tif + ROOT/y/NAME.tif stacks
  images:     ROOT/*.png without masks (prediction and super-resolution only)"""


@dataclass(frozen=True)
class Sample:
    """One image (and its mask): ``index`` is the page for TIFF stacks, None for plain files."""

    image: Path
    mask: Optional[Path] = None
    index: Optional[int] = None

    @property
    def name(self) -> str:
        """File stem, plus ``[page]`` for a stack slice."""
        return self.image.stem + ("" if self.index is None else f"[{self.index}]")


# --------------------------------------------------------------------------- discovery
def discover(root, fmt: str = "auto", *, require_masks: bool = True) -> list[Sample]:
    """Find and pair the samples of a dataset folder (see the module docstring for layouts).

    Raises FileNotFoundError for a missing folder, ValueError for unpaired files and empty
    datasets; every message names the file or folder and the expected layout.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist; {LAYOUTS}")
    if fmt not in FORMATS:
        raise ValueError(f"unknown dataset format {fmt!r}; choose one of {', '.join(FORMATS)}")
    if fmt == "auto":
        fmt = detect_format(root, require_masks=require_masks)
    if fmt == "images" and require_masks:
        raise ValueError(f"{root}: the images layout has no masks; segmentation needs masks "
                         f"({LAYOUTS})")
    finder = {"folder": _find_folder, "tnbc": _find_tnbc, "tiff-stack": _find_stacks, "annotated": _find_annotated,
              "images": lambda r, _: [Sample(p) for p in _list_images(r)]}[fmt]
    samples = finder(root, require_masks)
    if not samples:
        raise ValueError(f"{root}: empty dataset, no images found ({fmt} layout); {LAYOUTS}")
    return samples


def detect_format(root, require_masks: bool = True) -> str:
    """Name the layout of ``root`` (one of FORMATS minus auto), or raise ValueError."""
    root = Path(root)
    if any(d.is_dir() and re.fullmatch(r"Slide_\w+", d.name) for d in root.iterdir()):
        return "tnbc"
    for img_dir, _ in PAIR_DIRS:  # a missing mask folder is reported by the finder
        if (root / img_dir).is_dir():
            tiffs = [p for p in _list_images(root / img_dir) if p.suffix.lower() in TIFF_EXTS]
            return "tiff-stack" if tiffs and count_pages(tiffs[0]) > 1 else "folder"
    stems = {p.stem for p in _list_images(root)}
    if any(p.stem in stems for p in _list_images(root, NOTE_EXTS)):
        return "annotated"
    if any(_is_label_name(p) for p in _list_images(root, TIFF_EXTS)):
        return "tiff-stack"
    if _list_images(root) and not require_masks:
        return "images"
    found = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
    raise ValueError(f"{root}: could not recognise the dataset layout (found: {found}); {LAYOUTS}")


def _list_images(folder: Path, exts=IMAGE_EXTS) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in exts and not p.name.startswith("."))


def _pair_dirs(root: Path, layout: str, require_masks: bool) -> tuple[Path, Optional[Path]]:
    for img_dir, mask_dir in PAIR_DIRS:
        if (root / img_dir).is_dir():
            if (root / mask_dir).is_dir():
                return root / img_dir, root / mask_dir
            if not any((root / m).is_dir() for i, m in PAIR_DIRS if i == img_dir):
                if require_masks:
                    raise FileNotFoundError(f"mask folder {root / mask_dir} does not exist "
                                            f"({layout} layout); {LAYOUTS}")
                return root / img_dir, None
    raise FileNotFoundError(f"{root}: no image folder x/ or images/ ({layout} layout); {LAYOUTS}")


def _pair_files(images: list[Path], mask_dir: Path, layout: str, exts=MASK_EXTS) -> list[Sample]:
    """Pair each image with ``mask_dir/STEM.*`` or ``mask_dir/STEM_mask.*``; both directions."""
    masks: dict[str, Path] = {}
    for m in _list_images(mask_dir, exts):
        key = m.stem[:-5] if m.stem.endswith("_mask") else m.stem
        if key in masks:
            raise ValueError(f"ambiguous masks {masks[key]} and {m} for image {key} ({layout} layout)")
        masks[key] = m
    samples = []
    for img in images:
        if img.stem not in masks:
            raise ValueError(f"image {img} has no mask: looked for {mask_dir / img.stem}.* and "
                             f"{mask_dir / img.stem}_mask.* ({layout} layout); {LAYOUTS}")
        samples.append(Sample(img, masks.pop(img.stem)))
    if masks:
        m = next(iter(masks.values()))
        raise ValueError(f"mask {m} has no image: looked for "
                         f"{images[0].parent if images else '(empty image folder)'}/"
                         f"{next(iter(masks))}.* ({layout} layout); {LAYOUTS}")
    return samples


def _find_folder(root: Path, require_masks: bool) -> list[Sample]:
    img_dir, mask_dir = _pair_dirs(root, "folder", require_masks)
    images = _list_images(img_dir)
    if mask_dir is None:
        return [Sample(p) for p in images]
    if not images and not _list_images(mask_dir):
        return []
    return _pair_files(images, mask_dir, "folder")


def _find_annotated(root: Path, require_masks: bool) -> list[Sample]:
    """ROOT/NAME.EXT images, each with ROOT/NAME.xml or ROOT/NAME.geojson beside it."""
    images, notes = _list_images(root), {}
    for note in _list_images(root, NOTE_EXTS):
        if note.stem in notes:
            raise ValueError(f"ambiguous annotations {notes[note.stem]} and {note} (annotated layout)")
        notes[note.stem] = note
    samples = []
    for img in images:
        if img.stem not in notes and require_masks:
            raise ValueError(f"image {img} has no annotation: looked for {root / img.stem}.xml and "
                             f"{root / img.stem}.geojson (annotated layout); {LAYOUTS}")
        samples.append(Sample(img, notes.pop(img.stem, None)))
    if notes:
        note = next(iter(notes.values()))
        raise ValueError(f"annotation {note} has no image: looked for {root / note.stem}.* "
                         f"(annotated layout); {LAYOUTS}")
    return samples


def _find_tnbc(root: Path, require_masks: bool) -> list[Sample]:
    slides = {m.group(1): d for d in sorted(root.iterdir())
              if d.is_dir() and (m := re.fullmatch(r"Slide_(\w+)", d.name))}
    gts = {m.group(1): d for d in sorted(root.iterdir())
           if d.is_dir() and (m := re.fullmatch(r"GT_(\w+)", d.name))}
    if not slides:
        raise FileNotFoundError(f"{root}: no Slide_XX folders (tnbc layout); {LAYOUTS}")
    for key in gts.keys() - slides.keys():
        raise ValueError(f"mask folder {gts[key]} has no image folder {root / f'Slide_{key}'} "
                         f"(tnbc layout); {LAYOUTS}")
    samples = []
    for key, slide in slides.items():
        if key not in gts:
            if require_masks:
                raise FileNotFoundError(f"image folder {slide} has no mask folder "
                                        f"{root / f'GT_{key}'} (tnbc layout); {LAYOUTS}")
            samples += [Sample(p) for p in _list_images(slide)]
        else:
            samples += _pair_files(_list_images(slide), gts[key], "tnbc")
    return samples


def _is_label_name(path: Path) -> bool:
    return bool(LABEL_WORDS & set(re.split(r"[-_. ]+", path.stem.lower())))


def _stack_key(path: Path) -> str:
    words = re.split(r"[-_. ]+", path.stem.lower())
    return "_".join(w for w in words if w and w not in LABEL_WORDS | IMAGE_WORDS)


def _find_stacks(root: Path, require_masks: bool) -> list[Sample]:
    if any((root / i).is_dir() for i, _ in PAIR_DIRS):
        img_dir, mask_dir = _pair_dirs(root, "tiff-stack", require_masks)
        images = _list_images(img_dir, TIFF_EXTS)
        pairs = (_pair_files(images, mask_dir, "tiff-stack", TIFF_EXTS) if mask_dir
                 else [Sample(p) for p in images])
    else:
        pairs = _pair_top_level_stacks(root, require_masks)
    samples = []
    for pair in pairs:
        n = count_pages(pair.image)
        if pair.mask is not None and count_pages(pair.mask) != n:
            raise ValueError(f"image stack {pair.image} has {n} pages but label stack {pair.mask} "
                             f"has {count_pages(pair.mask)} (tiff-stack layout)")
        samples += [Sample(pair.image, pair.mask, k) for k in range(n)]
    return samples


def _pair_top_level_stacks(root: Path, require_masks: bool) -> list[Sample]:
    tiffs = _list_images(root, TIFF_EXTS)
    labels = [p for p in tiffs if _is_label_name(p)]
    images = [p for p in tiffs if not _is_label_name(p)]
    if len(images) == 1 and len(labels) == 1:
        return [Sample(images[0], labels[0])]
    by_key = {_stack_key(p): p for p in labels}
    pairs = []
    for img in images:
        label = by_key.pop(_stack_key(img), None)
        if label is None and require_masks:
            raise ValueError(f"image stack {img} has no label stack: looked for {root}/"
                             f"{_stack_key(img) or '*'}*label*.tif (or mask, membrane, gt) "
                             f"(tiff-stack layout); {LAYOUTS}")
        pairs.append(Sample(img, label))
    if by_key:
        raise ValueError(f"label stack {next(iter(by_key.values()))} has no image stack in {root} "
                         f"(tiff-stack layout); {LAYOUTS}")
    return pairs


# ----------------------------------------------------------------------------- dataset
def degrade_bicubic(hr: torch.Tensor, scale: int) -> torch.Tensor:
    """Super-resolution input: (..., C, H, W) in [0, 1] downsampled by ``scale`` (bicubic,
    antialiased) and upsampled back to (H, W) (bicubic), clamped to [0, 1]."""
    shape = hr.shape
    x = hr.reshape(-1, *shape[-3:])
    low = F.interpolate(x, size=(max(shape[-2] // scale, 1), max(shape[-1] // scale, 1)),
                        mode="bicubic", align_corners=False, antialias=True)
    up = F.interpolate(low, size=shape[-2:], mode="bicubic", align_corners=False)
    return up.clamp_(0.0, 1.0).reshape(shape)



def _compact(labels: Optional[np.ndarray]) -> Optional[np.ndarray]:
    """Instance labels cached as uint16 where their ids fit (half the memory of int32)."""
    if labels is None or labels.max(initial=0) > np.iinfo(np.uint16).max:
        return labels
    return labels.astype(np.uint16)


def _tiles(length: int, size: int) -> list[int]:
    """Top/left corners of tiles of ``size`` covering ``length`` (the last tile is flush)."""
    if length <= size:
        return [0]
    return sorted(set(range(0, length - size + 1, size)) | {length - size})


def _crop(arr: np.ndarray, y: int, x: int, size: int) -> np.ndarray:
    """size x size crop of (H, W, ...) at (y, x), reflect-padding sides shorter than size."""
    pad = [(0, max(size - arr.shape[0], 0)), (0, max(size - arr.shape[1], 0))]
    if pad[0][1] or pad[1][1]:
        arr = np.pad(arr, pad + [(0, 0)] * (arr.ndim - 2), mode="reflect")
    return arr[y:y + size, x:x + size]


class SegmentationDataset(Dataset):
    """Images (and masks) of a dataset folder, validated eagerly and cached in memory.

    Item: ``(image, target)``, image float32 (C, H, W) in [0, 1]; segmentation: target float32
    (1, H, W) in {0, 1}, or the class indices 0..classes-1 with ``classes`` > 1 (label-map masks);
    super-resolution: image = :func:`degrade_bicubic` of the original, target = the original
    (C, H, W). With ``image_size`` S, training items are random S x S crops
    (reflect-padded where smaller) drawn from a generator seeded by (seed, epoch, index), so
    runs are reproducible whatever the DataLoader workers; call :meth:`set_epoch` every epoch.
    Validation items (``train=False``) are the S x S tiles covering every image (the last tile
    of a row/column flush with the edge, so tiles may overlap); without ``image_size``, whole
    images. ``cache=False`` re-reads files in ``__getitem__`` (they are still validated once).

    Instances: ``has_instances`` is True when any mask holds instance labels (an annotation file
    or an instance label map); with ``return_instances`` the items of such a dataset are
    ``(image, target, instances)``, instances int32 (H, W) (cropped as the target; a binary mask of
    that dataset gives its 4-connected components). ``class_names``: with ``classes`` > 1 and
    annotation files, the class names in index order (index 1 first), sorted. ``mpp``: the pixel
    size (µm) the Aperio XML annotations state (their median), else None.
    """

    def __init__(self, root, fmt: str = "auto", *, in_channels: int = 3,
                 image_size: Optional[int] = None, task: str = "segmentation", sr_scale: int = 2,
                 train: bool = True, cache: bool = True, seed: int = 0, classes: int = 1,
                 return_instances: bool = False):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
        if image_size is not None and image_size < 1 or sr_scale < 1:
            raise ValueError(f"image_size and sr_scale must be >= 1, got {image_size}, {sr_scale}")
        self.root, self.task, self.train, self.cache = Path(root), task, train, cache
        self.in_channels, self.image_size, self.sr_scale = in_channels, image_size, sr_scale
        self.seed, self.epoch, self.classes = int(seed), 0, int(classes)
        seg = task == "segmentation"
        self.fmt = detect_format(self.root, seg) if fmt == "auto" and self.root.is_dir() else fmt
        self.samples = discover(self.root, self.fmt, require_masks=seg)
        self.class_index = class_index([s.mask for s in self.samples if s.mask], classes) if classes > 1 and seg else {}
        self.class_names = list(self.class_index)
        self.has_instances, self.return_instances = False, return_instances
        self.mpp = stated_mpp(s.mask for s in self.samples)  # µm per pixel, where Aperio XML states it
        self.shapes: list[tuple[int, int]] = []  # (H, W) of every sample
        self._arrays = self._load_all()
        self.items = [(i, 0, 0) for i in range(len(self.samples))]
        if image_size and not train:
            self.items = [(i, y, x) for i, (h, w) in enumerate(self.shapes)
                          for y in _tiles(h, image_size) for x in _tiles(w, image_size)]

    def _read(self, s: Sample, stacks: Optional[dict] = None
              ) -> tuple[np.ndarray, Optional[np.ndarray], Optional[np.ndarray]]:
        """Raw arrays of one sample: image (H, W, C) as stored, mask uint8 (H, W) or None, instance
        labels int32 (H, W) or None."""
        want_mask = s.mask is not None and self.task == "segmentation"
        if s.index is None:
            img = read_image(s.image)
            if not want_mask:
                return img, None, None
            return (img, *read_target(s.mask, img.shape[:2], self.classes, self.class_index))
        if stacks is None:  # one page only (cache=False)
            img = read_stack(s.image, s.index)[0]
            return img, (self._labels(read_stack(s.mask, s.index)[0], s.mask) if want_mask else None), None
        for p in (s.image, s.mask) if want_mask else (s.image,):
            if p not in stacks:
                if len(stacks) > 1:  # keep at most one image and one label stack
                    stacks.clear()
                stacks[p] = read_stack(p) if p == s.image else self._labels(read_stack(p), p)
        return stacks[s.image][s.index], (stacks[s.mask][s.index] if want_mask else None), None

    def _labels(self, mask: np.ndarray, path: Path) -> np.ndarray:
        """A mask array -> {0, 1} (one class) or the label map (classes > 1, values checked)."""
        return label_map(mask, self.classes, path) if self.classes > 1 else binarize(mask)

    def _load_all(self) -> Optional[list[tuple[np.ndarray, Optional[np.ndarray]]]]:
        """Read and check every sample (sizes, channels), before any training; fills
        ``self.shapes`` and returns the arrays (None without ``cache``)."""
        arrays, stacks, channels = [], {}, set()
        for s in self.samples:
            img, mask, inst = self._read(s, stacks)
            self.has_instances |= inst is not None
            if mask is not None and mask.shape != img.shape[:2]:
                where = "" if s.index is None else f" (page {s.index})"
                raise ValueError(
                    f"image {s.image}{where} is {img.shape[1]}x{img.shape[0]} but its mask "
                    f"{s.mask} is {mask.shape[1]}x{mask.shape[0]}: image and mask must have the "
                    f"same size ({self.fmt} layout)")
            match_channels(np.zeros((1, 1, img.shape[2]), np.float32), self.in_channels, s.image)
            self.shapes.append(img.shape[:2])
            channels.add(img.shape[2])
            if self.cache:
                arrays.append((img, mask, _compact(inst)))
        self._source_channels = sorted(channels)
        return arrays if self.cache else None

    def set_epoch(self, epoch: int) -> None:
        """Select the random crops of ``epoch`` (training only)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, ...]:
        i, y, x = self.items[idx]
        img, mask, inst = self._arrays[i] if self._arrays is not None else self._read(self.samples[i])
        want_inst = self.return_instances and self.has_instances and mask is not None
        if want_inst and inst is None:
            from ..metrics import label_components  # a binary mask among instance maps: its components

            inst = label_components(mask > 0)
        s = self.image_size
        if s and self.train:
            rng = np.random.default_rng([self.seed & (2**64 - 1), self.epoch, idx])
            y = int(rng.integers(0, max(img.shape[0] - s, 0) + 1))
            x = int(rng.integers(0, max(img.shape[1] - s, 0) + 1))
        if s:
            img, mask = _crop(img, y, x, s), None if mask is None else _crop(mask, y, x, s)
            inst = _crop(inst, y, x, s) if want_inst else None
        img = match_channels(to_float(img), self.in_channels, self.samples[i].image)
        image = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
        if self.task == "super-resolution":
            return degrade_bicubic(image, self.sr_scale), image
        target = torch.from_numpy(mask[None].astype(np.float32))
        if want_inst:
            return image, target, torch.from_numpy(inst.astype(np.int32))
        return image, target

    def describe(self) -> str:
        """One line, e.g. ``37 images from /x (folder layout), 512x512, RGB``."""
        stacks = self.samples[0].index is not None
        what = f"{len(self.samples)} {'slices' if stacks else 'images'}"
        if stacks:
            n = len({s.image for s in self.samples})
            what += f" of {n} stack{'s' * (n > 1)}"
        sizes = sorted({(w, h) for h, w in self.shapes}, key=lambda s: s[0] * s[1])
        size = "x".join(map(str, sizes[0]))
        if len(sizes) > 1:
            size = f"sizes {size} to {'x'.join(map(str, sizes[-1]))}"
        names = {1: "gray", 2: "gray+alpha", 3: "RGB", 4: "RGBA"}
        chans = "/".join(names.get(c, f"{c}-channel") for c in self._source_channels)
        if self._source_channels != [self.in_channels]:
            chans += f" -> {self.in_channels} channel{'s' * (self.in_channels > 1)}"
        line = f"{what} from {self.root} ({self.fmt} layout), {size}, {chans}"
        if self.has_instances:
            line += ", instance labels"
        if self.task == "super-resolution":
            line += f", super-resolution x{self.sr_scale}"
        if self.image_size:
            kind = "random crops" if self.train else f"{len(self)} tiles"
            line += f", {kind} of {self.image_size}x{self.image_size}"
        return line
