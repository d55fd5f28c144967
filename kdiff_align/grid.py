"""Labelled sample grids: rows = classes, columns = w (the paper's), as PIL images."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image, ImageDraw


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, H, W, C] (gray images stay one channel)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def image_grid(images: torch.Tensor, rows: int, cols: int, *, scale: int = 1, pad: int = 1,
               row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               title: str | None = None) -> Image.Image:
    """Lays out rows x cols images (row-major, [-1, 1]) with optional row/column labels and a title."""
    if images.shape[0] != rows * cols:
        raise ValueError(f'image_grid needs rows x cols = {rows * cols} images, got {images.shape[0]}')
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    mode = 'L' if c == 1 else 'RGB'
    tiles = [Image.fromarray(p.squeeze(-1).numpy() if c == 1 else p.numpy(), mode) for p in pixels]
    if scale > 1:
        tiles = [t.resize((w * scale, h * scale), Image.NEAREST) for t in tiles]
        h, w = h * scale, w * scale
    left = 8 * max((len(s) for s in row_labels), default=0) + 6 if row_labels else 0
    top = (14 if col_labels else 0) + (14 if title else 0)
    width = left + cols * (w + pad) + pad
    if title:
        width = max(width, int(ImageDraw.Draw(Image.new('RGB', (1, 1))).textlength(title)) + 4)
    grid = Image.new('RGB', (width, top + rows * (h + pad) + pad), 'white')
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((2, 1), title, fill='black')
    for i, tile in enumerate(tiles):
        r, k = divmod(i, cols)
        grid.paste(tile.convert('RGB'), (left + pad + k * (w + pad), top + pad + r * (h + pad)))
    if col_labels:
        for k, label in enumerate(col_labels):
            draw.text((left + pad + k * (w + pad) + 1, top - 13), label, fill='black')
    if row_labels:
        for r, label in enumerate(row_labels):
            draw.text((2, top + pad + r * (h + pad) + h // 2 - 5), label, fill='black')
    return grid


def default_scale(size: Sequence[int]) -> int:
    """An upscaling factor that makes small images (digits: 8x8) visible: about 32 px per tile."""
    return max(1, 32 // max(size))
