"""PNG plots of evaluation sweeps (matplotlib, Agg backend): metric vs w, metric vs steps, sample grids.
Figures are built by *_figure functions (tested for readability by layout_problems) and saved by the others."""

from __future__ import annotations

import textwrap
from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..sampling.grid import DPI, W_CAPTION, _figure, _legend, _plt, _suptitle, grid_image, scatter_grid

PANEL = 3.2       # inches per line-plot panel
W_AXIS = "guidance w (paper's; cfg scale s = 1 + w)"


def save_figure(fig, path: str | Path) -> Path:
    """Saves fig as a PNG at its own size and closes it."""
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def layout_problems(fig) -> list[str]:
    """What of fig, once drawn, is unreadable: text or a legend outside the canvas, a figure legend over a plotting
    area or a label, an axes legend outside its axes, two labels on top of each other. Empty: every label is whole
    and on the canvas."""
    from matplotlib.text import Text
    fig.canvas.draw()
    r = fig.canvas.get_renderer()
    canvas = fig.bbox

    def inside(b, box, tol=1.0):
        return b.x0 >= box.x0 - tol and b.y0 >= box.y0 - tol and b.x1 <= box.x1 + tol and b.y1 <= box.y1 + tol

    problems = []
    tight = fig.get_tightbbox(r).transformed(fig.dpi_scale_trans)
    if not inside(tight, canvas):
        problems.append(f'the drawn content {tight.bounds} does not fit the canvas {canvas.bounds}')
    ticks = {id(t) for ax in fig.axes for axis in (ax.xaxis, ax.yaxis)
             for tick in list(axis.majorTicks) + list(axis.minorTicks) for t in (tick.label1, tick.label2)}
    for t in fig.findobj(Text):
        if id(t) in ticks or not t.get_visible() or not t.get_text().strip():
            continue
        if not inside(t.get_window_extent(r), canvas):
            problems.append(f'text {t.get_text()!r} is clipped by the canvas')
    for ax in fig.axes:
        for axis in (ax.xaxis, ax.yaxis):
            box = axis.get_tightbbox(r) if ax.get_visible() and axis.get_visible() else None
            if box is not None and not inside(box, canvas):
                problems.append(f'tick labels of {ax.get_title()!r} are clipped by the canvas')
        legend = ax.get_legend()
        if legend is not None and not inside(legend.get_window_extent(r), ax.bbox):
            problems.append(f'the legend of {ax.get_title()!r} sticks out of its axes')
    in_legends = {id(t) for legend in fig.legends for t in legend.findobj(Text)}
    labels = [t for t in fig.findobj(Text)
              if id(t) not in ticks | in_legends and t.get_visible() and t.get_text().strip()]
    others = [t.get_window_extent(r) for t in labels]
    for i, a in enumerate(labels):
        for b, box in zip(labels[i + 1:], others[i + 1:]):
            if others[i].overlaps(box):
                problems.append(f'text {a.get_text()!r} overlaps {b.get_text()!r}')
    for legend in fig.legends:
        box = legend.get_window_extent(r)
        if not inside(box, canvas):
            problems.append('a figure legend is clipped by the canvas')
        if any(box.overlaps(ax.bbox) for ax in fig.axes if ax.get_visible()) or any(map(box.overlaps, others)):
            problems.append('a figure legend lies over a plotting area or a label')
    return problems


def aggregate(rows: Sequence[Mapping[str, Any]], metric: str, group: str) -> dict[tuple, tuple[float, float, int]]:
    """(group, sampler, steps, w) -> (mean, standard deviation over the rows, count), e.g. over training seeds."""
    values: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if metric in r:
            values[(r[group], r['sampler'], r['steps'], r['w'])].append(float(r[metric]))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in values.items()}


def sweep_figures(rows: Sequence[Mapping[str, Any]], metric: str, *, group: str = 'model',
                  groups: Sequence[str] | None = None, floor: float | None = None,
                  log_y: bool = True) -> dict[str, Any]:
    """{'w': metric vs w (one panel per step count), 'steps': metric vs steps (one panel per w)}; mean ± std over
    repeats; one colour per group, solid = first sampler, dashed = second; the floor as a grey line."""
    plt = _plt()
    agg = aggregate(rows, metric, group)
    if not agg:
        return {}
    groups = list(groups) if groups else sorted({k[0] for k in agg}, key=str)
    samplers = sorted({k[1] for k in agg}, key=lambda s: (s != 'dpmpp_2m', s))
    steps = sorted({k[2] for k in agg})
    ws = sorted({k[3] for k in agg})
    styles = ['-', '--', ':', '-.']
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    figures = {}
    for xname, panels, xs in (('w', steps, ws), ('steps', ws, steps)):
        fig, axes = _figure(1, len(panels), PANEL * len(panels) + 2.2, 3.6, sharey=True, sharex=True)
        for ax, panel in zip(axes[0], panels):
            for gi, g in enumerate(groups):
                for si, s in enumerate(samplers):
                    keys = [(x, (g, s, panel, x) if xname == 'w' else (g, s, x, panel)) for x in xs]
                    pts = [(x, agg[k]) for x, k in keys if k in agg]
                    if not pts:
                        continue
                    x = [p[0] for p in pts]
                    m = np.array([p[1][0] for p in pts])
                    e = np.array([p[1][1] for p in pts])
                    ax.plot(x, m, styles[si % 4], color=colors[gi % len(colors)], marker='o', ms=3,
                            label=f'{g} ({s})' if len(samplers) > 1 else str(g))
                    if e.any():
                        ax.fill_between(x, m - e, m + e, color=colors[gi % len(colors)], alpha=0.15)
            if floor is not None:
                ax.axhline(floor, color='grey', lw=1, ls=':', label='floor')
            ax.set_title(f'{panel} steps' if xname == 'w' else f'w = {panel:g}', fontsize=10)
            if xname == 'steps':
                ax.set_xscale('log', base=2)
            if log_y:
                ax.set_yscale('log')
        fig.supxlabel(W_AXIS if xname == 'w' else 'sampling steps', fontsize=10)
        axes[0][0].set_ylabel(metric)
        _legend(fig, *axes[0][0].get_legend_handles_labels())
        what = (f'{metric} vs guidance w' if xname == 'w' else f'{metric} vs sampling steps; w is the paper\'s '
                'guidance weight (cfg scale s = 1 + w)')
        _suptitle(fig, what + (' (mean ± std over repeats)' if any(v[2] > 1 for v in agg.values()) else ''))
        figures[xname] = fig
    return figures


def sweep_plots(rows: Sequence[Mapping[str, Any]], metric: str, out_dir: str | Path, *, group: str = 'model',
                groups: Sequence[str] | None = None, floor: float | None = None, stem: str = '',
                log_y: bool = True) -> list[Path]:
    """<stem><metric>_vs_w.png and <stem><metric>_vs_steps.png of sweep_figures."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures = sweep_figures(rows, metric, group=group, groups=groups, floor=floor, log_y=log_y)
    return [save_figure(fig, out_dir / f'{stem}{metric}_vs_{x}.png') for x, fig in figures.items()]


def sample_grids(out_dir: str | Path, models: Sequence[str], cells: Sequence[Any], config: Mapping[str, Any],
                 *, dest: str | Path | None = None, per: int = 4) -> list[Path]:
    """samples_<model>.png from the saved previews: the first sampler at the most steps, rows = classes, columns = w
    (per samples each; toy: one scatter panel per w)."""
    out_dir = Path(out_dir)
    dest = Path(dest) if dest else out_dir
    if not cells:
        return []
    sampler, steps = cells[0].sampler, max(c.steps for c in cells if c.sampler == cells[0].sampler)
    chosen = sorted({c.w for c in cells if c.sampler == sampler and c.steps == steps})
    paths = []
    for model in models:
        previews = []
        for w in chosen:
            p = out_dir / 'cells' / model / f'{sampler}-s{steps}-w{w:g}.pt'
            if not p.exists():
                break
            previews.append(torch.load(p, weights_only=True))
        if len(previews) != len(chosen):
            continue
        classes = previews[0]['labels'].unique().tolist()
        toy = config['model']['type'] == 'toy_mlp'
        n = min(int((pv['labels'] == c).sum()) for pv in previews for c in classes)
        n = n if toy else min(n, per)
        samples = torch.stack([torch.stack([pv['samples'][pv['labels'] == c][:n] for pv in previews])
                               for c in classes])   # [classes, w, n, ...]
        image = grid_image(samples, config, classes, chosen,
                           f'{model}: {sampler}, {steps} steps; columns: {W_CAPTION}')
        path = dest / f'samples_{model}.png'
        image.save(path)
        paths.append(path)
    return paths


Series = dict[str, list[tuple[float, float, bool]]]   # name -> [(x, y, marked)]


def line_panels_figure(panels: Mapping[str, Series], *, xlabel: str, ylabel: str,
                       floors: Mapping[str, float] | None = None, log_x: bool = False, log_y: bool = True,
                       title: str | None = None, mark_label: str = 'marked'):
    """One panel per key of panels, one line per series (a fixed colour per series name across panels); marked
    points get a large hollow ring; floors[panel] as a grey dotted line; one legend for all panels."""
    plt = _plt()
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    n = max(len(panels), 1)
    fig, axes = _figure(1, n, PANEL * n + 2.4, 3.8)
    handles: dict[str, Any] = {}
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for name, pts in series.items():
            pts = sorted(p for p in pts if np.isfinite(p[1]))
            if not pts:
                continue
            color = colors[names.index(name) % len(colors)]
            handles.setdefault(name, ax.plot([p[0] for p in pts], [p[1] for p in pts], '-o', ms=3, color=color)[0])
            ring = [p for p in pts if p[2]]
            if ring:
                ax.scatter([p[0] for p in ring], [p[1] for p in ring], s=90, facecolors='none', edgecolors=color,
                           linewidths=1.2)
        if floors and panel in floors:
            handles.setdefault('floor', ax.axhline(floors[panel], color='grey', lw=1, ls=':'))
        ax.set_title(textwrap.fill(panel, 32), fontsize=10)
        if log_x:
            ax.set_xscale('log', base=2)
        if log_y:
            ax.set_yscale('log')
    fig.supxlabel(xlabel, fontsize=10)
    axes[0][0].set_ylabel(ylabel)
    if any(p[2] for series in panels.values() for pts in series.values() for p in pts):
        handles[mark_label] = plt.Line2D([], [], marker='o', ms=9, mfc='none', mec='k', ls='')
    _legend(fig, list(handles.values()), list(handles))
    _suptitle(fig, title)
    return fig


def line_panels(panels: Mapping[str, Series], path: str | Path, *, xlabel: str, ylabel: str,
                floors: Mapping[str, float] | None = None, log_x: bool = False, log_y: bool = True,
                title: str | None = None, mark_label: str = 'marked') -> Path:
    """line_panels_figure saved as a PNG."""
    return save_figure(line_panels_figure(panels, xlabel=xlabel, ylabel=ylabel, floors=floors, log_x=log_x,
                                          log_y=log_y, title=title, mark_label=mark_label), path)


def sample_table_figure(previews: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]], *, toy: bool,
                        title: str | None = None, per_class: int = 3):
    """A grid of saved previews: one row per model, one column per key (e.g. w), the same noise everywhere.
    previews[row][column] = {'samples', 'labels'}; toy: scatter per class; images: per_class samples (down) of
    each class (across)."""
    rows = [r for r in previews if previews[r]]
    cols = list(dict.fromkeys(c for r in rows for c in previews[r]))
    if not rows or not cols:
        return None
    if toy:
        return scatter_grid({r: {c: (pv['samples'], pv['labels']) for c, pv in previews[r].items()} for r in rows},
                            title=title, panel=2.2)
    labels = next(iter(previews[rows[0]].values()))['labels']
    aspect = len(labels.unique()) / min(per_class, int((labels == labels[0]).sum()))   # panel width / height
    fig, axes = _figure(len(rows), len(cols), 3.0 * len(cols) + 0.09 * max(map(len, rows)) + 0.3,
                        (3.0 / aspect + 0.25) * len(rows) + 1.0)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            pv = previews[r].get(c)
            if pv is not None:
                x, labels = pv['samples'], pv['labels']
                tiles = torch.stack([x[labels == k][:per_class] for k in labels.unique()])   # [K, per, C, H, W]
                k, per, ch, h, wd = tiles.shape   # classes across, samples down
                img = tiles.permute(1, 3, 0, 4, 2).reshape(per * h, k * wd, ch).clamp(-1, 1).add(1).div(2)
                ax.imshow(img.squeeze(-1).numpy(), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
            if i == 0:
                ax.set_title(c, fontsize=10)
            if j == 0:
                ax.set_ylabel(r, fontsize=9, rotation=0, ha='right', va='center')
    _suptitle(fig, (title + '; ' if title else '') + f'each panel: classes 0, 1, ... across, {per_class} samples '
              'of each down', fontsize=9)
    return fig


def sample_table(previews: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]], path: str | Path, *, toy: bool,
                 title: str | None = None, per_class: int = 3) -> Path | None:
    """sample_table_figure saved as a PNG (None when there is nothing to show)."""
    fig = sample_table_figure(previews, toy=toy, title=title, per_class=per_class)
    return None if fig is None else save_figure(fig, path)
