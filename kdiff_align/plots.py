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
