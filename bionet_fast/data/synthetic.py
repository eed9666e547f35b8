"""Synthetic H&E-like nuclei images with exact masks: a data set that needs no download.

Images are rendered with the Beer-Lambert stain model that H&E colour deconvolution inverts
(Ruifrok & Johnston 2001): each pixel's optical density is ``h * H + e * E``, where ``H`` and
``E`` are the hematoxylin (blue-purple) and eosin (pink) stain vectors and ``h``, ``e`` are
stain concentrations; the RGB value is ``I0 * 10**-OD``. Eosin is a smooth tissue-like field,
hematoxylin is a faint counterstain plus the nuclei: ellipses with random size (semi-axes
about 2-12 px, independent of ``size``: the magnification is fixed, so larger images hold more
nuclei), orientation, perturbed boundaries (low harmonics of the polar radius), clusters of
touching and overlapping nuclei, chromatin speckle and pale (vesicular) centres. Red blood
cells (eosin-dense discs) are distractors that are not in the mask. Stain vectors, stain
strength, blur and noise vary per image. ``instances=True`` returns instance labels instead of the
mask (where nuclei overlap, a pixel belongs to the nucleus whose centre it is relatively nearest:
the smallest normalised radius ``rho / boundary``); ``density`` and ``children`` make crowded,
clustered fields (the defaults are the training data).

A leaf module: numpy and torch only. Rendering is vectorised over chunks of images (each chunk
has its own seeded generator, so the first k images do not depend on ``n``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["make_synthetic_nuclei", "SyntheticNucleiDataset"]

_CHUNK = 16  # images rendered together; also the unit of seeding
# Stain optical densities per unit concentration (R, G, B): the Macenko reference H&E matrix.
_H_VEC = np.array([0.5626, 0.7201, 0.4062])  # hematoxylin
_E_VEC = np.array([0.2159, 0.8012, 0.5581])  # eosin
_LUMA = np.array([0.299, 0.587, 0.114])
_MAX_AXIS = 12.0  # largest nucleus semi-axis in pixels
_WIN = int(np.ceil(_MAX_AXIS * 1.35)) + 2  # half-width of each nucleus' drawing window


def make_synthetic_nuclei(
    n: int, size: int = 128, seed: int = 0, channels: int = 3, instances: bool = False,
    density: float = 1.0, children: float = 0.6,
) -> tuple[np.ndarray, np.ndarray]:
    """Render ``n`` H&E-like images and their nucleus masks.

    Returns ``images`` uint8 (n, size, size, channels) (channels 3: RGB, 1: luminance) and
    ``masks`` uint8 (n, size, size) in {0, 1}, or with ``instances`` int32 instance labels
    (n, size, size), 0 = background, 1..m per image (``labels > 0`` is the mask). ``density``
    multiplies the number of freely placed nuclei, ``children`` is the mean number of nuclei
    attached to (touching or overlapping) each of them (defaults 1.0 and 0.6: the training data).
    Deterministic for a given ``seed``; image ``i`` is the same for every ``n > i``.
    """
    if n < 0 or size < 8:
        raise ValueError(f"need n >= 0 and size >= 8, got n={n}, size={size}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (gray) or 3 (RGB), got {channels}")
    if density <= 0 or children < 0:
        raise ValueError(f"need density > 0 and children >= 0, got {density}, {children}")
    seed = int(seed) & (2**64 - 1)  # numpy seeds must be >= 0; negative ones wrap
    chunks = [_render_chunk(np.random.default_rng([seed, c]), size, density, children)
              for c in range(-(-n // _CHUNK))]
    if not chunks:
        return (np.zeros((0, size, size, channels), np.uint8),
                np.zeros((0, size, size), np.int32 if instances else np.uint8))
    rgb = np.concatenate([c[0] for c in chunks])[:n]
    labels = np.concatenate([c[1] for c in chunks])[:n]
    if channels == 1:
        rgb = np.clip(np.rint(rgb @ _LUMA), 0, 255).astype(np.uint8)[..., None]
    if not instances:
        return rgb, (labels > 0).astype(np.uint8)
    for i in range(len(labels)):  # ids 1..m within each image, in drawing order
        ids, inv = np.unique(labels[i], return_inverse=True)
        labels[i] = inv.reshape(labels[i].shape) if ids[0] == 0 else inv.reshape(labels[i].shape) + 1
    return rgb, labels


def _render_chunk(rng: np.random.Generator, size: int, density: float = 1.0,
                  children: float = 0.6) -> tuple[np.ndarray, np.ndarray]:
    """Render ``_CHUNK`` images: uint8 RGB (B, S, S, 3) and int32 nucleus ids (B, S, S), 0 = none."""
    b = _CHUNK
    nuclei = _sample_nuclei(rng, b, size, density, children)
    h_nuc, masks = _rasterize(nuclei, b, size)
    rbc = _sample_rbc(rng, b, size)
    e_rbc, _ = _rasterize(rbc, b, size)

    strength_h = rng.uniform(0.75, 1.25, (b, 1, 1))
    speckle = _speckle(rng, b, size)
    h = h_nuc * strength_h * (1.0 + 0.3 * speckle).clip(0.3)
    h += rng.uniform(0.02, 0.08, (b, 1, 1)) * (1.0 + 0.4 * _smooth_noise(rng, b, size, 16))

    e = rng.uniform(0.15, 0.45, (b, 1, 1)) * (1.0 + 0.3 * _smooth_noise(rng, b, size, 4))
    e = e * (1.0 + 0.15 * _smooth_noise(rng, b, size, 20)) + 0.6 * e_rbc
    # Pale gaps in the tissue (lumen, fat, tears) in about half the images.
    gaps = np.clip(_smooth_noise(rng, b, size, 3) * 1.5 - 1.8, 0.0, 1.0)
    gaps *= rng.random((b, 1, 1)) < 0.5
    h, e = h * (1.0 - 0.8 * gaps), e * (1.0 - 0.8 * gaps)

    sigma = rng.uniform(0.4, 1.0, b)
    h, e = _blur(np.clip(h, 0, None), sigma), _blur(np.clip(e, 0, None), sigma)
    return _to_rgb(rng, h, e).astype(np.uint8), masks


def _sample_nuclei(rng: np.random.Generator, b: int, size: int, density: float = 1.0,
                   children: float = 0.6) -> dict[str, np.ndarray]:
    """Nucleus parameters, one row per nucleus: image id, centre, semi-axes, angle, shape, stain.

    Some of each image's nuclei ("seeds") are placed uniformly; the others (``children`` per seed
    on average) are attached to a random seed of the same image at about the sum of
    their radii, which makes clusters of touching and overlapping nuclei.
    """
    area = (size / 128.0) ** 2 * density
    counts = rng.poisson(rng.uniform(8.0, 20.0, b) * area)
    seeds = np.repeat(np.arange(b), counts)
    k = max(int(np.ceil(children)), 1)  # k = 1 for the default 0.6: the same draws as always
    children = np.repeat(np.arange(b), rng.binomial(counts * k, children / k))
    img = np.concatenate([seeds, children])
    n_seed, n = len(seeds), len(seeds) + len(children)

    a = np.exp(rng.uniform(np.log(3.0), np.log(_MAX_AXIS), n))
    minor = a * rng.uniform(0.5, 1.0, n)
    centre = rng.uniform(-4.0, size + 4.0, (n, 2))
    if len(children):
        # A random seed of the same image for each child (images without seeds keep theirs uniform).
        first = np.concatenate([[0], np.cumsum(counts)[:-1]])
        pick = first[children] + np.floor(rng.random(len(children)) * counts[children]).astype(int)
        has_seed = counts[children] > 0
        phi = rng.uniform(0, 2 * np.pi, len(children))
        dist = (a[pick] + a[n_seed:]) * rng.uniform(0.65, 1.1, len(children))
        step = dist[:, None] * np.stack([np.cos(phi), np.sin(phi)], 1)
        centre[n_seed:] = np.where(has_seed[:, None], centre[pick] + step, centre[n_seed:])
    amps = rng.uniform(0.0, 1.0, (n, 4)) * np.array([0.12, 0.08, 0.05, 0.03])
    harmonics = amps * np.exp(1j * rng.uniform(0, 2 * np.pi, (n, 4)))
    return dict(img=img, cx=centre[:, 0], cy=centre[:, 1], a=a, b=minor,
                theta=rng.uniform(0, np.pi, n), harmonics=harmonics,
                stain=rng.uniform(0.55, 1.25, n), pale=rng.uniform(0.0, 0.6, n) ** 2)


def _sample_rbc(rng: np.random.Generator, b: int, size: int) -> dict[str, np.ndarray]:
    """Red blood cells: small round eosin-dense discs (distractors, not in the mask)."""
    counts = rng.poisson(rng.uniform(0.0, 3.0, b) * (size / 128.0) ** 2)
    n = int(counts.sum())
    r = rng.uniform(2.5, 4.0, n)
    return dict(img=np.repeat(np.arange(b), counts), cx=rng.uniform(0, size, n),
                cy=rng.uniform(0, size, n), a=r, b=r * rng.uniform(0.8, 1.0, n),
                theta=rng.uniform(0, np.pi, n), harmonics=np.zeros((n, 4), complex),
                stain=rng.uniform(0.6, 1.2, n), pale=np.full(n, 0.3))


def _rasterize(obj: dict[str, np.ndarray], b: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw perturbed ellipses into (B, S, S) stain maps; returns (stain, int32 object ids: 1 + the
    object's row in ``obj``, 0 outside every object).

    Each object is evaluated in a fixed (2W+1)^2 window around its centre, all objects at once.
    The boundary is ``rho = 1 + Re(sum_k c_k z^k)`` in ellipse-normalised polar coordinates
    (``z = exp(i phi)``, k = 2..5); the stain is anti-aliased over one pixel, the mask is the
    exact inside test. Overlapping objects add their stain (overlaps look darker).
    """
    off = np.arange(-_WIN, _WIN + 1, dtype=np.float32)
    px = np.floor(obj["cx"])[:, None, None] + off[None, None, :]  # (N, 1, 2W+1)
    py = np.floor(obj["cy"])[:, None, None] + off[None, :, None]  # (N, 2W+1, 1)
    dx, dy = px - obj["cx"][:, None, None], py - obj["cy"][:, None, None]
    cos, sin = np.cos(obj["theta"])[:, None, None], np.sin(obj["theta"])[:, None, None]
    un = (dx * cos + dy * sin) / obj["a"][:, None, None]
    vn = (dy * cos - dx * sin) / obj["b"][:, None, None]
    rho = np.sqrt(un * un + vn * vn) + 1e-6
    z = ((un + 1j * vn) / rho).astype(np.complex64)
    zk, pert = z * z, 0.0
    for k in range(4):
        pert = pert + (obj["harmonics"][:, k, None, None] * zk).real
        zk = zk * z
    boundary = 1.0 + pert
    scale = np.sqrt(obj["a"] * obj["b"])[:, None, None]  # pixels per normalised radius unit
    cover = np.clip((boundary - rho) * scale + 0.5, 0.0, 1.0)
    profile = 1.0 - obj["pale"][:, None, None] * (1.0 - np.minimum(rho / boundary, 1.0) ** 2)
    weight = cover * profile * obj["stain"][:, None, None]
    valid = (px >= 0) & (px < size) & (py >= 0) & (py < size) & (cover > 0)
    flat = (obj["img"][:, None, None] * size + py) * size + px
    flat = np.broadcast_to(flat, valid.shape)[valid].astype(np.int64)
    n_px = b * size * size
    stain = np.bincount(flat, weights=weight[valid], minlength=n_px)
    # Instance ids: where objects overlap, the one with the smallest rho / boundary wins.
    inside = (rho < boundary)[valid]
    depth = (rho / boundary)[valid][inside]
    obj_id = np.broadcast_to(np.arange(1, len(rho) + 1)[:, None, None], valid.shape)[valid][inside]
    where = flat[inside]
    order = np.lexsort((depth, where))
    first = np.ones(len(order), bool)
    first[1:] = where[order][1:] != where[order][:-1]
    ids = np.zeros(n_px, np.int32)
    ids[where[order][first]] = obj_id[order][first]
    return stain.reshape(b, size, size), ids.reshape(b, size, size)


def _smooth_noise(rng: np.random.Generator, b: int, size: int, grid: int) -> np.ndarray:
    """Zero-mean, roughly unit-variance noise (B, S, S) with ``grid`` bumps per side (bilinear)."""
    low = rng.standard_normal((b, grid + 1, grid + 1))
    t = np.linspace(0.0, grid, size)
    i0 = np.minimum(np.floor(t).astype(int), grid - 1)
    frac = t - i0
    frac = frac * frac * (3.0 - 2.0 * frac)  # smoothstep: no creases along the grid lines
    interp = np.zeros((size, grid + 1))
    interp[np.arange(size), i0] = 1.0 - frac
    interp[np.arange(size), i0 + 1] = frac
    return interp @ low @ interp.T


def _speckle(rng: np.random.Generator, b: int, size: int) -> np.ndarray:
    """Fine chromatin texture: white noise blurred over ~1 px, scaled to unit variance (B, S, S)."""
    return _blur(rng.standard_normal((b, size, size)), np.full(b, 0.7)) / 0.4


def _blur(x: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    """Separable Gaussian blur (5 taps, reflect padding) of x (B, S, S), one sigma per image."""
    taps = np.exp(-0.5 * (np.arange(-2, 3)[None, :] / sigma[:, None]) ** 2)
    taps = (taps / taps.sum(1, keepdims=True))[:, :, None, None]  # (B, 5, 1, 1)
    for axis in (1, 2):
        pad = [(0, 0)] * 3
        pad[axis] = (2, 2)
        xp = np.pad(x, pad, mode="reflect")
        n = x.shape[axis]
        x = sum(taps[:, j] * np.take(xp, np.arange(j, j + n), axis=axis) for j in range(5))
    return x


def _to_rgb(rng: np.random.Generator, h: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Beer-Lambert: stain maps (B, S, S) -> RGB (B, S, S, 3) in [0, 255], with per-image
    stain-vector jitter, illumination and sensor noise."""
    b = h.shape[0]
    h_vec = _H_VEC + rng.normal(0.0, 0.05, (b, 3))
    e_vec = _E_VEC + rng.normal(0.0, 0.05, (b, 3))
    h_vec = np.abs(h_vec) / np.linalg.norm(h_vec, axis=1, keepdims=True)
    e_vec = np.abs(e_vec) / np.linalg.norm(e_vec, axis=1, keepdims=True)
    od = h[..., None] * h_vec[:, None, None] + e[..., None] * e_vec[:, None, None] + 0.02
    light = rng.uniform(230.0, 255.0, (b, 1, 1, 1))
    rgb = light * np.power(10.0, -od)
    rgb += rng.normal(0.0, 1.0, rgb.shape) * rng.uniform(1.0, 5.0, (b, 1, 1, 1))
    return np.clip(np.rint(rgb), 0.0, 255.0)


class SyntheticNucleiDataset(Dataset):
    """In-memory synthetic nuclei data set (see :func:`make_synthetic_nuclei`).

    Item ``i`` is ``(image, mask)``: image float32 (C, S, S) in [0, 1], mask float32 (1, S, S)
    in {0, 1} (``target="contour"``: in {0, 1, 2}, background / interior / boundary, see
    data.targets); with ``instances`` ``(image, mask, labels)``, labels int32 (S, S), one id per
    nucleus (for the object metrics). Use different seeds for the training and the held-out split.
    """

    def __init__(self, n: int, size: int = 128, seed: int = 0, channels: int = 3, instances: bool = False,
                 target: str = "mask"):
        images, labels = make_synthetic_nuclei(n, size=size, seed=seed, channels=channels, instances=True)
        if target == "contour":  # class maps: 0 background, 1 interior, 2 boundary
            from .targets import contour_target

            masks = np.stack([contour_target(m) for m in labels]) if len(labels) else np.zeros(labels.shape, np.uint8)
        else:
            masks = (labels > 0).astype(np.uint8)
        self.images = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # uint8 (N, C, S, S)
        self.masks = torch.from_numpy(masks)[:, None]  # uint8 (N, 1, S, S)
        self.labels = torch.from_numpy(labels) if instances else None  # int32 (N, S, S)
        self.size, self.seed, self.channels, self.has_instances = size, seed, channels, instances

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if self.labels is not None:
            return self.images[i].float() / 255.0, self.masks[i].float(), self.labels[i]
        return self.images[i].float() / 255.0, self.masks[i].float()

    def describe(self) -> str:
        """One-line summary, e.g. ``400 synthetic H&E-like images (seed 0), 128x128, RGB``."""
        kind = "RGB" if self.channels == 3 else "gray"
        return (f"{len(self)} synthetic H&E-like images (seed {self.seed}), "
                f"{self.size}x{self.size}, {kind}")
