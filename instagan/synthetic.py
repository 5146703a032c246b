"""A generated two-domain instance data set with exact masks: ellipses (domain a) vs rectangles (domain b).

Each image has several instances of random size, colour and position on a textured background; instances may
overlap (a later one occludes an earlier one, and masks are the visible parts). Deterministic: image `index` of
`domain` depends only on (seed, domain, index), never on how many images are made.

    img, masks = make_image("a", index=3, size=64)      # uint8 (H, W, 3), bool (K, H, W)
    batch = make_batch("b", n=4, size=64, ins=(1, 6))  # tensors in instagan.masks conventions
"""

from __future__ import annotations

import numpy as np
import torch

from instagan import masks as M

DOMAINS = ("a", "b")
SHAPES = {"a": "ellipse", "b": "rectangle"}


def _rng(seed: int, domain: str, index: int) -> np.random.Generator:
    return np.random.default_rng([seed, DOMAINS.index(domain), index])


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """Smooth colour gradient plus low-frequency stripes and a little noise: texture without instance-like blobs."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(60, 190, size=3)
    slope = rng.uniform(-50, 50, size=(2, 3))
    freq, phase, angle = rng.uniform(2, 6), rng.uniform(0, 2 * np.pi), rng.uniform(0, np.pi)
    stripes = 18 * np.sin(2 * np.pi * freq * (np.cos(angle) * xx + np.sin(angle) * yy) + phase)
    img = base + slope[0] * xx[..., None] + slope[1] * yy[..., None] + stripes[..., None]
    img += rng.normal(0, 6, size=img.shape)
    return img


def _shape_mask(rng: np.random.Generator, kind: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
    ry, rx = rng.uniform(0.08, 0.22, size=2) * size
    cy, cx = rng.uniform(0.15, 0.85, size=2) * size
    if kind == "ellipse":
        return ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    return (np.abs(yy - cy) <= ry) & (np.abs(xx - cx) <= rx)


def make_image(domain: str, index: int, size: int = 64, seed: int = 0, ins: tuple[int, int] = (1, 6),
               min_area: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One image of `domain` with between ins[0] and ins[1] instances (fewer only if occlusion hides one).

    Returns img uint8 (size, size, 3) and masks bool (K, size, size), the visible part of each instance,
    K >= 1. Instances smaller than `min_area` pixels after occlusion (default: 1% of the image) are dropped.
    """
    if domain not in DOMAINS:
        raise ValueError(f"unknown domain {domain!r}, expected one of {DOMAINS}")
    rng = _rng(seed, domain, index)
    min_area = max(4, size * size // 100) if min_area is None else min_area
    img = _background(rng, size)
    count = int(rng.integers(ins[0], ins[1] + 1))
    visible: list[np.ndarray] = []
    for _ in range(count):
        shape = _shape_mask(rng, SHAPES[domain], size)
        colour = rng.uniform(0, 255, size=3)
        shade = 1.0 + 0.15 * np.sin(np.linspace(0, np.pi, size))[None, :, None]
        img = np.where(shape[..., None], colour * shade, img)
        visible = [v & ~shape for v in visible] + [shape]
    kept = [v for v in visible if v.sum() >= min_area]
    if not kept:  # every instance occluded away: keep the last (fully visible) one
        kept = [visible[-1]]
    return np.clip(img, 0, 255).astype(np.uint8), np.stack(kept)


def to_tensors(img: np.ndarray, masks: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, 3), bool (K, H, W) -> image (3, H, W) in [-1, 1], masks (K, H, W) in {-1, 1}."""
    x = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    return x, torch.from_numpy(masks).float() * 2 - 1


def make_batch(domain: str, n: int, size: int = 64, seed: int = 0, ins: tuple[int, int] = (1, 6),
               start: int = 0) -> dict[str, torch.Tensor]:
    """Images start .. start + n - 1 of `domain` as one padded batch (see `instagan.masks.collate`)."""
    return M.collate([to_tensors(*make_image(domain, start + i, size, seed, ins)) for i in range(n)])
