"""Image conversions and sample grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) float in [-1, 1] -> (B, H, W, C) uint8."""
    x = ((x.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


DISPLAY_CELL = 128  # px: the grids a run writes show each sample at least this large (32x32 -> 4x)


def upscale(images: np.ndarray, factor: int) -> np.ndarray:
    """(N, H, W, C) -> (N, factor*H, factor*W, C), nearest neighbour: every pixel a factor x factor block."""
    return images if factor == 1 else images.repeat(factor, axis=1).repeat(factor, axis=2)


def grid(images: np.ndarray, cols: int, pad: int = 2, cell: int | None = None) -> np.ndarray:
    """(N, H, W, C) uint8 -> one (rows*(H+pad)+pad, cols*(W+pad)+pad, C) uint8 mosaic. `cell`: upscale each image
    by the smallest integer factor that makes it at least `cell` pixels high first (the padding stays `pad`)."""
    if cell:
        images = upscale(images, max(1, -(-cell // images.shape[1])))
    n, h, w, c = images.shape
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), 255, np.uint8)
    for k in range(n):
        r, q = divmod(k, cols)
        out[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = images[k]
    return out


def to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_png(image: np.ndarray, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    to_pil(image).save(path)
    return path
