"""Labelled sample grids: rows = classes (or prompts), columns = w (the paper's), as PIL images; toy 2-D
samples as matplotlib scatter panels (the figure kit evaluation/plots.py builds on)."""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

W_CAPTION = "w = the paper's guidance weight (cfg scale s = 1 + w)"


def w_title(w: float) -> str:
    """One w in the paper's convention with the host's cfg scale written out: 'w = 4 (cfg scale s = 1 + w = 5)'."""
    return f'w = {w:g} (cfg scale s = 1 + w = {1 + w:g})'


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """[-1, 1] images [N, C, H, W] -> uint8 [N, H, W, C] (gray images stay one channel)."""
    return ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def font(size: int = 14) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's bundled font at size px (the small bitmap font where Pillow has no FreeType)."""
    try:
        return ImageFont.load_default(size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_size(f, text: str) -> tuple[int, int, int, int]:
    return f.getbbox(text or ' ')   # left, top, right, bottom relative to the drawing origin


def _wrap(f, text: str, width: int) -> list[str]:
    """text in lines no wider than width px (a single longer word keeps its own line)."""
    lines: list[str] = []
    for para in text.split('\n'):
        line = ''
        for word in para.split(' '):
            trial = f'{line} {word}' if line else word
            if line and _text_size(f, trial)[2] > width:
                lines.append(line)
                line = word
            else:
                line = trial
        lines.append(line)
    return lines


def image_grid(images: torch.Tensor, rows: int, cols: int, *, scale: int = 1, pad: int = 2,
               row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               title: str | None = None, font_size: int | None = None, min_width: int = 480) -> Image.Image:
    """rows x cols images (row-major, [-1, 1]) with row labels on the left, column labels on top and a title
    wrapped to the width. col_labels: one per column, or one per group of equal columns (e.g. one per w with n
    samples each). Tiles are upscaled (nearest) until every label fits its row or column group."""
    if images.shape[0] != rows * cols:
        raise ValueError(f'image_grid needs rows x cols = {rows * cols} images, got {images.shape[0]}')
    if col_labels and cols % len(col_labels):
        raise ValueError(f'image_grid: {len(col_labels)} column labels do not divide {cols} columns')
    pixels = to_uint8(images)
    n, h, w, c = pixels.shape
    f = font(font_size or max(14, min(h, w) * scale // 20))
    line = _text_size(f, 'Ag')[3] + 4
    span = cols // len(col_labels) if col_labels else 1
    label_w = max((_text_size(f, s)[2] for s in col_labels or []), default=0) + 6
    scale = max(scale, math.ceil((label_w - (span - 1) * pad) / (span * w)), math.ceil(line / h) if row_labels else 1)
    tiles = [Image.fromarray(p.squeeze(-1).numpy() if c == 1 else p.numpy(), 'L' if c == 1 else 'RGB')
             for p in pixels]
    if scale > 1:
        tiles = [t.resize((w * scale, h * scale), Image.NEAREST) for t in tiles]
        h, w = h * scale, w * scale
    m = 8   # margin
    left = m + max(_text_size(f, s)[2] for s in row_labels) + m if row_labels else m
    gap = 8 if span > 1 else 0   # between column groups
    grid_w = cols * (w + pad) - pad + (cols // span - 1) * gap
    width = max(left + grid_w + m, min_width if title else 0)
    lines = _wrap(f, title, width - 2 * m) if title else []
    width = max([width] + [_text_size(f, s)[2] + 2 * m for s in lines])
    top = m + len(lines) * line + (line if col_labels else 0) + (m // 2 if lines or col_labels else 0)
    grid = Image.new('RGB', (width, top + rows * (h + pad) - pad + m), 'white')
    draw = ImageDraw.Draw(grid)
    for i, text in enumerate(lines):
        draw.text((m, m + i * line - _text_size(f, text)[1] + 2), text, fill='black', font=f)
    for i, tile in enumerate(tiles):
        r, k = divmod(i, cols)
        grid.paste(tile.convert('RGB'), (left + k * (w + pad) + k // span * gap, top + r * (h + pad)))
    for k, label in enumerate(col_labels or []):
        l, t, rt, b = _text_size(f, label)
        centre = left + k * (span * (w + pad) + gap) + (span * (w + pad) - pad) / 2
        draw.text((centre - (l + rt) / 2, top - m // 2 - b - 2), label, fill='black', font=f)
    for r, label in enumerate(row_labels or []):
        l, t, rt, b = _text_size(f, label)
        draw.text((left - m - rt, top + r * (h + pad) + h / 2 - (t + b) / 2), label, fill='black', font=f)
    return grid


def join_images(panels: Sequence[Image.Image], title: str | None = None, gap: int = 16) -> Image.Image:
    """Panels side by side, top-aligned, under a title wrapped to the width."""
    f = font(14)
    line = _text_size(f, 'Ag')[3] + 4
    width = sum(p.width for p in panels) + gap * (len(panels) - 1)
    lines = _wrap(f, title, width - 16) if title else []
    width = max([width] + [_text_size(f, s)[2] + 16 for s in lines])
    top = 8 + len(lines) * line if lines else 0
    out = Image.new('RGB', (width, top + max(p.height for p in panels)), 'white')
    draw = ImageDraw.Draw(out)
    for i, text in enumerate(lines):
        draw.text((8, 8 + i * line - _text_size(f, text)[1]), text, fill='black', font=f)
    x = 0
    for panel in panels:
        out.paste(panel, (x, top))
        x += panel.width + gap
    return out


def default_scale(size: Sequence[int]) -> int:
    """An upscaling factor that makes small images (digits: 8x8) readable: about 48 px per tile."""
    return max(1, 48 // max(size))


def shorten(text: str, width: int = 40) -> str:
    """text cut to width characters at a word boundary, with '...' where cut (long prompts as row labels)."""
    return textwrap.shorten(text, width, placeholder='...') or text[:width]


DPI = 100


MIN_WIDTH = 6.4   # inches: 640 px at DPI


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    return plt


def _figure(rows: int, cols: int, width: float, height: float, **kw):
    """A constrained-layout figure of rows x cols axes, at least MIN_WIDTH wide."""
    return _plt().subplots(rows, cols, figsize=(max(width, MIN_WIDTH), height), dpi=DPI, squeeze=False,
                           layout='constrained', **kw)


def _suptitle(fig, text: str | None, fontsize: float = 10) -> None:
    """A figure title wrapped to the figure's width."""
    if text:
        chars = max(20, int(fig.get_figwidth() * 72 / (0.6 * fontsize)))
        fig.suptitle(textwrap.fill(text, chars), fontsize=fontsize)


def _legend(fig, handles, labels, title: str | None = None, **kw) -> None:
    """One legend for the figure, right of the panels, never over the data."""
    if labels:
        fig.legend(handles, labels, loc='outside right center', fontsize=8, title=title, title_fontsize=8, **kw)


def figure_image(fig):
    """fig as a PIL RGB image (the figure is closed)."""
    from PIL import Image
    buf = io.BytesIO()
    fig.savefig(buf, format='png', dpi=DPI)
    _plt().close(fig)
    buf.seek(0)
    return Image.open(buf).convert('RGB')


def _class_colors(labels) -> dict:
    plt = _plt()
    cmap = plt.get_cmap('tab10' if len(labels) <= 10 else 'tab20')
    return {c: cmap(i % cmap.N) for i, c in enumerate(labels)}


def scatter_grid(cells: Mapping[str, Mapping[str, tuple[torch.Tensor, torch.Tensor]]], *, title: str | None = None,
                 legend: bool = True, panel: float = 2.6):
    """Toy 2-D samples: cells[row][column] = (points [N, 2], class labels [N]); every panel on the same x/y
    scale, one colour per class (the legend), row names on the left, column names on top."""
    rows = list(cells)
    cols = list(dict.fromkeys(c for r in rows for c in cells[r]))
    panel = max(panel, min(4.0, (MIN_WIDTH - 1.0) / len(cols)))   # few panels: larger ones, not blank space
    names = 0.09 * max(len(r) for r in rows)   # inches for the row names
    fig, axes = _figure(len(rows), len(cols), panel * len(cols) + names + (1.0 if legend else 0.2),
                        panel * len(rows) + 0.9, sharex=True, sharey=True)
    classes = sorted({int(c) for r in rows for x, lab in cells[r].values() for c in lab.unique()})
    colors = _class_colors(classes)
    everything = np.concatenate([x.reshape(-1, 2).float().numpy() for r in rows for x, _ in cells[r].values()])
    lo, hi = everything.min(0), everything.max(0)
    centre, half = (lo + hi) / 2, max(float((hi - lo).max()) / 2 * 1.05, 1e-3)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            if c in cells[r]:
                x, lab = cells[r][c]
                for k in classes:
                    pts = x[lab == k].float().numpy()
                    ax.scatter(pts[:, 0], pts[:, 1], s=3, color=colors[k], label=str(k), rasterized=True)
            ax.set_xlim(centre[0] - half, centre[0] + half)
            ax.set_ylim(centre[1] - half, centre[1] + half)
            ax.set_aspect('equal', adjustable='box')
            ax.tick_params(labelsize=8)
            if i == 0 and c:
                ax.set_title(c, fontsize=10)
            if j == 0 and r:
                ax.set_ylabel(r, fontsize=9, rotation=0, ha='right', va='center')
    if legend:
        handles = [_plt().Line2D([], [], marker='o', ls='', color=colors[k]) for k in classes]
        _legend(fig, handles, [str(k) for k in classes], title='class')
    _suptitle(fig, title)
    return fig


def grid_image(samples: torch.Tensor, config: Mapping[str, Any], classes: Sequence[int], ws: Sequence[float],
               title: str | None = None) -> Image.Image:
    """A PIL image of sample_grid's output [classes, w, n, ...]: rows = classes, columns = w (n samples per w);
    toy 2-D samples as one scatter panel per w, coloured by class."""
    rows, n_w, n = samples.shape[:3]
    conditional = bool(config['dataset']['num_classes'])
    if config['model']['type'] == 'toy_mlp':
        labels = torch.tensor(list(classes)).repeat_interleave(n)
        cells = {'': {f'w = {w:g}' if conditional else '': (samples[:, k].reshape(-1, 2), labels)
                      for k, w in enumerate(ws)}}
        return figure_image(scatter_grid(cells, title=title, legend=conditional))
    images = samples.reshape(rows * n_w * n, *samples.shape[3:])
    return image_grid(images, rows, n_w * n, scale=default_scale(samples.shape[-2:]),
                      row_labels=[f'class {c}' for c in classes] if conditional else None,
                      col_labels=[f'w = {w:g}' for w in ws] if conditional else None, title=title)
