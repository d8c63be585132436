"""Labelled PNG image grids (rows = prompts or models, columns = seeds or prompts)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..artefacts import atomic_write
from ..plots import PALETTE, text_width
from ..plots import font as _font


def image_grid(images: torch.Tensor, rows: int, cols: int, row_labels: Sequence[str] | None = None,
               col_labels: Sequence[str] | None = None, scale: int = 2, pad: int = 2) -> Image.Image:
    """Tile ``images`` [rows * cols, 3, H, W] in [0, 1] (row-major) with optional text labels."""
    if images.ndim != 4 or images.shape[0] != rows * cols:
        raise ValueError(f"image_grid: expected {rows}x{cols}={rows * cols} images [N, 3, H, W], got {tuple(images.shape)}")
    arr = (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)
    h, w = arr.shape[1] * scale, arr.shape[2] * scale
    font = _font()
    left = (max(text_width(s, font) for s in row_labels) + 8) if row_labels else 0
    top = 14 if col_labels else 0
    W = left + cols * (w + pad) + pad
    H = top + rows * (h + pad) + pad
    canvas = Image.new("RGB", (W, H), PALETTE["white"])
    draw = ImageDraw.Draw(canvas)
    for r in range(rows):
        y = top + pad + r * (h + pad)
        if row_labels:
            draw.text((4, y + h // 2 - 5), row_labels[r], fill=PALETTE["ink"], font=font)
        for c in range(cols):
            x = left + pad + c * (w + pad)
            tile = Image.fromarray(arr[r * cols + c]).resize((w, h), Image.NEAREST)
            canvas.paste(tile, (x, y))
    if col_labels:
        for c, s in enumerate(col_labels):
            draw.text((left + pad + c * (w + pad) + 2, 2), s, fill=PALETTE["ink"], font=font)
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save ``image`` as PNG atomically (creating folders); returns the path."""
    path = Path(path)
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))
    return path
