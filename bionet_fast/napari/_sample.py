"""Sample data: a synthetic H&E tile from the embedded generator (data.synthetic), and its true
nuclei mask (hidden)."""
from __future__ import annotations

SAMPLE_SIZE, SAMPLE_SEED = 256, 0


def synthetic_he(size: int = SAMPLE_SIZE, seed: int = SAMPLE_SEED) -> list[tuple]:
    """[(rgb (size, size, 3) uint8, image kwargs, "image"), (mask (size, size) uint8, ..., "labels")]."""
    from ..data.synthetic import make_synthetic_nuclei

    images, masks = make_synthetic_nuclei(1, size, seed=seed)
    return [(images[0], {"name": "synthetic H&E", "rgb": True}, "image"),
            (masks[0], {"name": "synthetic H&E true nuclei", "visible": False}, "labels")]
