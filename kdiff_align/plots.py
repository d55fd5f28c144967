"""PNG plots of evaluation sweeps (matplotlib, Agg backend): metric vs w, metric vs steps, sample grids."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch


def _plt():
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt
    return plt


def aggregate(rows: Sequence[Mapping[str, Any]], metric: str, group: str) -> dict[tuple, tuple[float, float, int]]:
    """(group, sampler, steps, w) -> (mean, standard deviation over the rows, count), e.g. over training seeds."""
    values: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        if metric in r:
            values[(r[group], r['sampler'], r['steps'], r['w'])].append(float(r[metric]))
    return {k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0, len(v)) for k, v in values.items()}


def sweep_plots(rows: Sequence[Mapping[str, Any]], metric: str, out_dir: str | Path, *, group: str = 'model',
                groups: Sequence[str] | None = None, floor: float | None = None, stem: str = '',
                log_y: bool = True) -> list[Path]:
    """metric_vs_w (one panel per step count) and metric_vs_steps (one panel per w); mean ± std over repeats;
    solid = first sampler, dashed = second; the floor as a grey line."""
    plt = _plt()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    agg = aggregate(rows, metric, group)
    if not agg:
        return []
    groups = list(groups) if groups else sorted({k[0] for k in agg}, key=str)
    samplers = sorted({k[1] for k in agg}, key=lambda s: (s != 'dpmpp_2m', s))
    steps = sorted({k[2] for k in agg})
    ws = sorted({k[3] for k in agg})
    styles = ['-', '--', ':', '-.']
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    paths = []
    for xname, panels, xs in (('w', steps, ws), ('steps', ws, steps)):
        fig, axes = plt.subplots(1, len(panels), figsize=(3.3 * len(panels), 3.2), squeeze=False, sharey=True)
        for ax, panel in zip(axes[0], panels):
            for gi, g in enumerate(groups):
                for si, s in enumerate(samplers):
                    pts = [(x, agg[(g, s, panel, x) if xname == 'w' else (g, s, x, panel)]) for x in xs
                           if ((g, s, panel, x) if xname == 'w' else (g, s, x, panel)) in agg]
                    if not pts:
                        continue
                    x = [p[0] for p in pts]
                    m = np.array([p[1][0] for p in pts])
                    e = np.array([p[1][1] for p in pts])
                    ax.plot(x, m, styles[si % 4], color=colors[gi % len(colors)], marker='o', ms=3,
                            label=f'{g} ({s})')
                    if e.any():
                        ax.fill_between(x, m - e, m + e, color=colors[gi % len(colors)], alpha=0.15)
            if floor is not None:
                ax.axhline(floor, color='grey', lw=1, ls=':', label='floor')
            ax.set_title(f'steps = {panel}' if xname == 'w' else f'w = {panel:g}')
            ax.set_xlabel("w (paper's; cfg scale = 1 + w)" if xname == 'w' else 'sampling steps')
            if xname == 'steps':
                ax.set_xscale('log', base=2)
            if log_y:
                ax.set_yscale('log')
        axes[0][0].set_ylabel(metric)
        handles, labels = axes[0][0].get_legend_handles_labels()
        fig.legend(handles, labels, loc='lower center', ncol=min(4, len(labels)), fontsize=7, frameon=False)
        fig.tight_layout(rect=(0, 0.04 + 0.03 * ((len(labels) - 1) // 4), 1, 1))
        path = out_dir / f'{stem}{metric}_vs_{xname}.png'
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


def sample_grids(out_dir: str | Path, models: Sequence[str], cells: Sequence[Any], config: Mapping[str, Any],
                 *, dest: str | Path | None = None) -> list[Path]:
    """One PNG per model from the saved previews: the first sampler at the most steps, columns = w, rows = classes
    (images) or one scatter panel per w (toy)."""
    plt = _plt()
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
            key = f'{sampler}-s{steps}-w{w:g}'
            p = out_dir / 'cells' / model / f'{key}.pt'
            if not p.exists():
                break
            previews.append(torch.load(p, weights_only=True))
        if len(previews) != len(chosen):
            continue
        toy = config['model']['type'] == 'toy_mlp'
        fig, axes = plt.subplots(1, len(chosen), figsize=(2.2 * len(chosen), 2.6 if toy else 2.8), squeeze=False)
        for ax, w, pv in zip(axes[0], chosen, previews):
            x, labels = pv['samples'], pv['labels']
            if toy:
                for c in labels.unique():
                    pts = x[labels == c].numpy()
                    ax.scatter(pts[:, 0], pts[:, 1], s=4)
                ax.set_aspect('equal')
            else:
                classes = labels.unique()
                per = min(int((labels == c).sum()) for c in classes)
                tiles = torch.stack([x[labels == c][:per] for c in classes])  # [K, per, C, H, W]
                k, _, ch, h, wd = tiles.shape
                img = tiles.permute(0, 3, 1, 4, 2).reshape(k * h, per * wd, ch).clamp(-1, 1).add(1).div(2)
                ax.imshow(img.squeeze(-1).numpy() if ch == 1 else img.numpy(), cmap='gray', vmin=0, vmax=1,
                          interpolation='nearest')
                ax.set_xticks([])
                ax.set_yticks([])
            ax.set_title(f'w = {w:g}', fontsize=9)
        fig.suptitle(f'{model}: {sampler}, {steps} steps', fontsize=9)
        fig.tight_layout()
        path = dest / f'samples_{model}.png'
        fig.savefig(path, dpi=90)
        plt.close(fig)
        paths.append(path)
    return paths


Series = dict[str, list[tuple[float, float, bool]]]   # name -> [(x, y, marked)]


def line_panels(panels: Mapping[str, Series], path: str | Path, *, xlabel: str, ylabel: str,
                floors: Mapping[str, float] | None = None, log_x: bool = False, log_y: bool = True,
                title: str | None = None, mark_label: str = 'marked') -> Path:
    """One panel per key of panels, one line per series (a fixed colour per series name across panels); marked
    points get a large hollow ring; floors[panel] as a grey dotted line."""
    plt = _plt()
    names = list(dict.fromkeys(name for series in panels.values() for name in series))
    colors = plt.rcParams['axes.prop_cycle'].by_key()['color']
    fig, axes = plt.subplots(1, max(len(panels), 1), figsize=(3.4 * max(len(panels), 1), 3.3), squeeze=False)
    for ax, (panel, series) in zip(axes[0], panels.items()):
        for name, pts in series.items():
            pts = sorted(p for p in pts if np.isfinite(p[1]))
            if not pts:
                continue
            color = colors[names.index(name) % len(colors)]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], '-o', ms=3, color=color, label=name)
            ring = [p for p in pts if p[2]]
            if ring:
                ax.scatter([p[0] for p in ring], [p[1] for p in ring], s=90, facecolors='none', edgecolors=color,
                           linewidths=1.2)
        if floors and panel in floors:
            ax.axhline(floors[panel], color='grey', lw=1, ls=':', label='floor')
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel(xlabel)
        if log_x:
            ax.set_xscale('log', base=2)
        if log_y:
            ax.set_yscale('log')
    axes[0][0].set_ylabel(ylabel)
    handles, labels = axes[0][0].get_legend_handles_labels()
    for ax in axes[0][1:]:   # every series once, wherever it first appears
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    if any(p[2] for series in panels.values() for pts in series.values() for p in pts):
        handles.append(plt.Line2D([], [], marker='o', ms=9, mfc='none', mec='k', ls=''))
        labels.append(mark_label)
    if labels:
        fig.legend(handles, labels, loc='lower center', ncol=min(5, len(labels)), fontsize=7, frameon=False)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout(rect=(0, 0.06 + 0.035 * (max(len(labels) - 1, 0) // 5), 1, 1))
    path = Path(path)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def sample_table(previews: Mapping[str, Mapping[str, Mapping[str, torch.Tensor]]], path: str | Path, *, toy: bool,
                 title: str | None = None, per_class: int = 3) -> Path | None:
    """A grid of saved previews: one row per model, one column per key (e.g. w), the same noise everywhere.
    previews[row][column] = {'samples', 'labels'}; toy: scatter per class; images: per_class samples of each class."""
    plt = _plt()
    rows = [r for r in previews if previews[r]]
    cols = list(dict.fromkeys(c for r in rows for c in previews[r]))
    if not rows or not cols:
        return None
    width = 1.9 if toy else 3.2
    fig, axes = plt.subplots(len(rows), len(cols), figsize=(width * len(cols), (1.9 if toy else 1.2) * len(rows) + 0.4),
                             squeeze=False)
    for i, r in enumerate(rows):
        for j, c in enumerate(cols):
            ax = axes[i][j]
            ax.set_xticks([])
            ax.set_yticks([])
            pv = previews[r].get(c)
            if pv is not None:
                x, labels = pv['samples'], pv['labels']
                if toy:
                    for k in labels.unique():
                        pts = x[labels == k].numpy()
                        ax.scatter(pts[:, 0], pts[:, 1], s=1)
                    ax.set_xlim(-3.5, 3.5)
                    ax.set_ylim(-3.5, 3.5)
                else:
                    classes = labels.unique()
                    tiles = torch.stack([x[labels == k][:per_class] for k in classes])   # [K, per, C, H, W]
                    k, per, ch, h, wd = tiles.shape   # classes across, samples down
                    img = tiles.permute(1, 3, 0, 4, 2).reshape(per * h, k * wd, ch).clamp(-1, 1).add(1).div(2)
                    ax.imshow(img.squeeze(-1).numpy(), cmap='gray', vmin=0, vmax=1, interpolation='nearest')
            if i == 0:
                ax.set_title(c, fontsize=8)
            if j == 0:
                ax.set_ylabel(r, fontsize=8)
    if title:
        fig.suptitle(title, fontsize=7, wrap=True)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
