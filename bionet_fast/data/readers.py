"""Image and mask file reading: decoding to arrays, mask binarisation, scaling to [0, 1] and
matching the model's channel count.

Files: PNG/JPEG/BMP through Pillow, TIFF (single- or multi-page) through tifffile, its compressed
TIFFs (LZW as MoNuSeg's, JPEG, JPEG 2000) decoded by imagecodecs (a dependency); every reader
returns (..., H, W, C) arrays in the dtype stored, and an unreadable file is a ValueError naming it.

Masks: foreground = value > 0 (0/255, 0/1 and label maps alike; for EM membrane stacks the
foreground is whatever is non-zero), RGB masks: any colour channel > 0, alpha ignored; JPEG
masks (lossy) are thresholded at half the range instead. With K > 1 classes a mask is a label map
(values 0..K-1 kept as they are; a larger value is an error naming the file).

A leaf module: it imports nothing of bionet_fast.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
import tifffile
from PIL import Image

__all__ = ["read_image", "read_mask", "read_stack", "count_pages", "binarize", "label_map", "to_float",
           "match_channels",
           "IMAGE_EXTS", "TIFF_EXTS"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp")
TIFF_EXTS = (".tif", ".tiff")
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def read_image(path) -> np.ndarray:
    """Read a PNG/JPEG/BMP (Pillow) or single-page TIFF (tifffile) as (H, W, C), dtype as stored
    (uint8, uint16, float32...). Palette images become RGB(A), 1-bit images 0/255."""
    return _single_page(_read(Path(path), keep_palette=False), path)


def read_stack(path, page: Optional[int] = None) -> np.ndarray:
    """Read every page of a (multi-page) TIFF as (N, H, W, C), or only ``page`` as (1, H, W, C)."""
    return _read(Path(path), keep_palette=True, page=page)


def read_mask(path, classes: int = 1) -> np.ndarray:
    """Read a mask as uint8 (H, W): classes 1: {0, 1}, foreground = label > 0 (see module docstring);
    classes K > 1: the label map itself, values 0..K-1 (:func:`label_map`)."""
    path = Path(path)
    arr = _single_page(_read(path, keep_palette=True), path)
    if classes > 1:
        return label_map(arr, classes, path)
    return binarize(arr, lossy=path.suffix.lower() in (".jpg", ".jpeg"))


def label_map(mask: np.ndarray, classes: int, path) -> np.ndarray:
    """(..., H, W, C) label map -> uint8 (..., H, W) of class indices 0..classes-1 (alpha dropped;
    a colour mask must be gray: all channels equal). A value >= classes is a ValueError naming
    the file, the largest value and the fix (checked before any training)."""
    if mask.shape[-1] in (2, 4):
        mask = mask[..., :-1]
    if mask.shape[-1] > 1 and not (mask == mask[..., :1]).all():
        raise ValueError(f"{path}: a colour mask cannot be a label map for --classes {classes}; save the class "
                         "indices (0..K-1) as a gray image")
    labels = mask[..., 0]
    if not np.issubdtype(labels.dtype, np.integer) and not np.array_equal(labels, np.round(labels)):
        raise ValueError(f"{path}: label map values must be whole class indices 0..{classes - 1}")
    top = labels.max(initial=0)
    if labels.min(initial=0) < 0 or top >= classes:
        hint = ("a 0/255 binary mask: use --classes 1" if top == 255 and classes < 255 else
                f"pass --classes {int(top) + 1} or fix the mask")
        raise ValueError(f"{path}: mask value {top} is not a class index below --classes {classes} ({hint})")
    return labels.astype(np.uint8 if classes <= 256 else np.int32)


def _single_page(arr: np.ndarray, path) -> np.ndarray:
    if arr.shape[0] != 1:
        raise ValueError(f"{path} is a multi-page TIFF stack of {arr.shape[0]} pages: "
                         "use the tiff-stack layout (--format tiff-stack)")
    return arr[0]


def binarize(mask: np.ndarray, lossy: bool = False) -> np.ndarray:
    """(..., H, W, C) mask -> uint8 (..., H, W) in {0, 1}; alpha dropped, any channel counts."""
    if mask.shape[-1] in (2, 4):
        mask = mask[..., :-1]
    thresh = 0
    if lossy and np.issubdtype(mask.dtype, np.integer):
        thresh = np.iinfo(mask.dtype).max // 2
    return (mask > thresh).any(-1).astype(np.uint8)


def to_float(img: np.ndarray, maximum: Optional[float] = None) -> np.ndarray:
    """Scale to float32 in [0, 1]: uint8 / 255, uint16 / 65535, bool as is, other integer types
    by the image maximum; float images are clipped, or divided by their maximum if it exceeds 1.
    `maximum`: the whole image's maximum when `img` is a part of it (a streamed band)."""
    if img.dtype == np.uint8 or img.dtype == np.uint16:
        return img.astype(np.float32) / np.float32(np.iinfo(img.dtype).max)
    out = np.nan_to_num(img.astype(np.float32))
    top = float(out.max(initial=0)) if maximum is None else maximum
    if img.dtype != np.bool_ and (np.issubdtype(img.dtype, np.integer) or top > 1):
        out /= max(top, 1e-12)
    return np.clip(out, 0.0, 1.0)


def _read(path: Path, keep_palette: bool, page: Optional[int] = None) -> np.ndarray:
    """Any supported file -> (pages, H, W, C); unreadable -> ValueError naming the file."""
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such image file")
    try:
        tiff = path.suffix.lower() in TIFF_EXTS
        arr = _read_tiff(path, page) if tiff else _read_pil(path, keep_palette)
    except Exception as exc:  # decoders raise many types (OSError, ValueError, struct.error...)
        fix = ("pip install imagecodecs (tifffile decodes LZW, JPEG and JPEG 2000 TIFFs with it)"
               if "imagecodecs" in str(exc) else "expected a PNG, JPEG, BMP or TIFF file")
        raise ValueError(f"{path}: unreadable image ({type(exc).__name__}: {exc}); {fix}") from exc
    if arr.ndim != 4 or arr.shape[1] == 0 or arr.shape[2] == 0:
        raise ValueError(f"{path}: unreadable image (unexpected shape {arr.shape})")
    return arr


def _read_pil(path: Path, keep_palette: bool) -> np.ndarray:
    with Image.open(path) as im:
        if im.mode == "1":
            im = im.convert("L")
        elif im.mode in ("P", "PA") and not keep_palette:
            im = im.convert("RGBA" if im.mode == "PA" or "transparency" in im.info else "RGB")
        elif im.mode in ("P", "PA"):
            im = im.getchannel(0)  # palette indices are the labels
        elif im.mode not in ("L", "LA", "RGB", "RGBA", "F") and not im.mode.startswith("I"):
            im = im.convert("RGB")  # CMYK, YCbCr, LAB, HSV
        arr = np.array(im)  # a writable copy
    if arr.dtype == np.int32 and arr.size and 0 <= arr.min() and arr.max() <= 65535:
        arr = arr.astype(np.uint16)  # 16-bit PNGs may open in Pillow's 32-bit "I" mode
    return arr.reshape(1, *arr.shape[:2], -1)


def _read_tiff(path: Path, page: Optional[int] = None) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        axes = tif.series[0].axes
        if page is None:
            arr = tif.series[0].asarray()
        else:  # one plane only: its axes are the series' trailing ones
            arr = tif.asarray(key=page)
            axes = axes[-arr.ndim:]
    if "S" in axes:  # samples (colour channels), possibly planar
        arr = np.moveaxis(arr, axes.index("S"), -1)
        return arr.reshape(-1, *arr.shape[-3:])
    return arr.reshape(-1, *arr.shape[-2:], 1)


def count_pages(path: Path) -> int:
    """Number of image planes in a TIFF (without decoding them)."""
    try:
        with tifffile.TiffFile(path) as tif:
            series = tif.series[0]
            return int(np.prod([n for n, a in zip(series.shape, series.axes) if a not in "YXS"]))
    except Exception as exc:
        raise ValueError(f"{path}: unreadable TIFF stack ({type(exc).__name__}: {exc})") from exc


def match_channels(img: np.ndarray, in_channels: int, path) -> np.ndarray:
    """(H, W, C) float -> (H, W, in_channels): alpha dropped, gray repeated to 3, RGB to gray by
    luminance (ITU-R 601); any other mismatch is a ValueError naming the fix."""
    c = img.shape[-1]
    if c in (2, 4) and in_channels != c:
        img, c = img[..., :-1], c - 1
    if c == in_channels:
        return img
    if c == 1 and in_channels == 3:
        return np.repeat(img, 3, axis=-1)
    if c == 3 and in_channels == 1:
        return (img @ _LUMA)[..., None]
    raise ValueError(f"{path} has {img.shape[-1]} channels but the model takes {in_channels}; "
                     f"pass --in-channels {c}")

