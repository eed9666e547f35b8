"""The paper's training augmentation, on batched tensors on the training device.

Random rotation, shift, shear, zoom and horizontal/vertical flips, the same transform for an
image and its mask, a different one for every sample of the batch. The parameters follow
Keras' ``ImageDataGenerator`` (the official BiO-Net code calls it with rotation_range=15,
width/height_shift_range=0.05, shear_range=50, zoom_range=0.2 and both flips; its PyTorch port
uses the same ranges through imgaug):

* ``rotation``: angle uniform in [-rotation, rotation] degrees;
* ``shift``: translation uniform in [-shift, shift] times the height (rows) / width (columns);
* ``shear``: shear angle uniform in [-shear, shear] **degrees**, Keras' shear matrix
  ``[[1, -sin s], [0, cos s]]`` in (row, column) coordinates;
* ``zoom``: Keras semantics, row and column scale factors drawn independently from
  [1 - zoom, 1 + zoom] (factors below 1 zoom in); the paper's "zoom within [0, 0.2]" is this;
* ``hflip`` / ``vflip``: each with probability 1/2, exact (``torch.flip``).

Keras composes ``rotation @ shift @ shear @ zoom`` about the image centre and uses it to map
each output pixel to the input point it samples; so does :func:`keras_matrices`. Images are
resampled bilinearly, masks with nearest neighbour (they stay binary), both through torch's
``affine_grid`` + ``grid_sample`` (what ``kornia.geometry.transform.warp_affine`` does inside, without
the dependency). Outside the input, both repeat the image by
reflection (``padding="reflection"``; Keras' own default is "nearest", i.e. ``"border"``; the
official code used zeros, ``"zeros"``).

All random numbers come from ``torch.rand`` on the CPU with the given generator (or the global
one), so a seeded run is reproducible on every device. Masks stay binary.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

__all__ = ["Augment", "keras_matrices", "sampling_grid"]


def keras_matrices(params: dict[str, torch.Tensor], height: int, width: int) -> torch.Tensor:
    """Output-to-input sampling matrices (B, 3, 3) in (x, y) pixel coordinates.

    ``params``: tensors of shape (B,): ``theta``, ``shear`` (radians), ``tx``, ``ty`` (pixels,
    along rows and columns), ``zx``, ``zy`` (row and column scale), as Keras'
    ``apply_affine_transform``; the transform is taken about the image centre.
    """
    theta, shear = params["theta"].double(), params["shear"].double()
    b = theta.shape[0]
    eye = torch.eye(3, dtype=torch.float64).repeat(b, 1, 1)
    rot, shift, shr, zoom = eye.clone(), eye.clone(), eye.clone(), eye.clone()
    rot[:, 0, 0], rot[:, 0, 1] = torch.cos(theta), -torch.sin(theta)
    rot[:, 1, 0], rot[:, 1, 1] = torch.sin(theta), torch.cos(theta)
    shift[:, 0, 2], shift[:, 1, 2] = params["tx"].double(), params["ty"].double()
    shr[:, 0, 1], shr[:, 1, 1] = -torch.sin(shear), torch.cos(shear)
    zoom[:, 0, 0], zoom[:, 1, 1] = params["zx"].double(), params["zy"].double()
    rc = rot @ shift @ shr @ zoom  # (row, col) coordinates, as Keras
    centre = eye.clone()
    centre[:, 0, 2], centre[:, 1, 2] = (height - 1) / 2, (width - 1) / 2
    uncentre = eye.clone()
    uncentre[:, 0, 2], uncentre[:, 1, 2] = -(height - 1) / 2, -(width - 1) / 2
    rc = centre @ rc @ uncentre
    swap = torch.tensor([[0.0, 1, 0], [1, 0, 0], [0, 0, 1]], dtype=torch.float64)
    return swap @ rc @ swap  # (x, y) = (col, row)


def sampling_grid(to_input: torch.Tensor, height: int, width: int, device: torch.device) -> torch.Tensor:
    """The grid_sample grid (B, H, W, 2) of output-to-input pixel matrices (B, 3, 3) in (x, y).

    grid_sample with align_corners=True maps -1 and 1 to the centres of the first and last pixels,
    so pixel -> normalised is x_n = 2 x / (W - 1) - 1: the normalised matrix is N @ M @ N^-1,
    computed in float64 and rounded once."""
    norm = torch.eye(3, dtype=torch.float64)
    norm[0, 0], norm[1, 1] = 2.0 / max(width - 1, 1), 2.0 / max(height - 1, 1)
    norm[0, 2] = norm[1, 2] = -1.0
    theta = norm @ to_input @ torch.linalg.inv(norm)
    return F.affine_grid(theta[:, :2].to(device, torch.float32), [theta.shape[0], 1, height, width],
                         align_corners=True)


class Augment:
    """Random affine + flips applied identically to images (B, C, H, W) and masks (B, K, H, W).

    See the module docstring for the parameter semantics (Keras ranges; shear in degrees).
    ``mask_mode``: "nearest" for masks (they stay binary), "bilinear" when the second tensor is
    an image (super-resolution targets).
    """

    def __init__(self, rotation: float = 15.0, shift: float = 0.05, shear: float = 50.0,
                 zoom: float = 0.2, hflip: bool = True, vflip: bool = True,
                 padding: str = "reflection", mask_mode: str = "nearest"):
        if min(rotation, shift, shear, zoom) < 0 or zoom >= 1:
            raise ValueError("augmentation ranges must be >= 0 and zoom < 1, got "
                             f"rotation={rotation}, shift={shift}, shear={shear}, zoom={zoom}")
        if padding not in ("zeros", "border", "reflection"):
            raise ValueError(f"padding must be zeros, border or reflection, got {padding!r}")
        if mask_mode not in ("nearest", "bilinear"):
            raise ValueError(f"mask_mode must be nearest or bilinear, got {mask_mode!r}")
        self.rotation, self.shift, self.shear, self.zoom = rotation, shift, shear, zoom
        self.hflip, self.vflip, self.padding, self.mask_mode = hflip, vflip, padding, mask_mode

    def __repr__(self) -> str:
        return (f"Augment(rotation={self.rotation}, shift={self.shift}, shear={self.shear}, "
                f"zoom={self.zoom}, hflip={self.hflip}, vflip={self.vflip}, "
                f"padding={self.padding!r}, mask_mode={self.mask_mode!r})")

    @property
    def has_affine(self) -> bool:
        return any(v > 0 for v in (self.rotation, self.shift, self.shear, self.zoom))

    def sample(self, batch: int, height: int, width: int,
               generator: Optional[torch.Generator] = None) -> dict[str, torch.Tensor]:
        """Draw the parameters of ``batch`` transforms (CPU tensors of shape (B,))."""
        u = torch.rand(8, batch, generator=generator, dtype=torch.float64) * 2 - 1  # U(-1, 1)
        return {
            "theta": u[0] * math.radians(self.rotation),
            "tx": u[1] * self.shift * height,
            "ty": u[2] * self.shift * width,
            "shear": u[3] * math.radians(self.shear),
            "zx": 1 + u[4] * self.zoom,
            "zy": 1 + u[5] * self.zoom,
            "hflip": (u[6] > 0) & self.hflip,
            "vflip": (u[7] > 0) & self.vflip,
        }

    def apply(self, images: torch.Tensor, masks: torch.Tensor,
              params: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Apply given parameters (from :meth:`sample`) to images (B, C, H, W), masks (B, K, H, W)."""
        height, width = images.shape[-2:]
        if self.has_affine:
            grid = sampling_grid(keras_matrices(params, height, width), height, width, images.device)
            images = F.grid_sample(images, grid.to(images.dtype), mode="bilinear",
                                   padding_mode=self.padding, align_corners=True)
            warped = F.grid_sample(masks.float(), grid, mode=self.mask_mode, padding_mode=self.padding,
                                   align_corners=True)
            masks = warped.to(masks.dtype)
        images, masks = _flip(images, masks, params["hflip"], -1)
        return _flip(images, masks, params["vflip"], -2)

    def __call__(self, images: torch.Tensor, masks: torch.Tensor,
                 generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Augment a batch: images (B, C, H, W) float, masks (B, K, H, W) -> same shapes."""
        if images.ndim != 4 or masks.ndim != 4 or images.shape[0] != masks.shape[0] \
                or images.shape[-2:] != masks.shape[-2:]:
            raise ValueError(f"expected images (B, C, H, W) and masks (B, K, H, W) of the same "
                             f"batch and size, got {tuple(images.shape)} and {tuple(masks.shape)}")
        params = self.sample(images.shape[0], *images.shape[-2:], generator=generator)
        return self.apply(images, masks, params)


def _flip(images: torch.Tensor, masks: torch.Tensor, which: torch.Tensor,
          dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flip the samples selected by the bool tensor ``which`` (B,) along ``dim``."""
    if not bool(which.any()):
        return images, masks
    sel = which.to(images.device).view(-1, 1, 1, 1)
    return (torch.where(sel, images.flip(dim), images),
            torch.where(sel.to(masks.device), masks.flip(dim), masks))
