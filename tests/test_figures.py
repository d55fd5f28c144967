"""Every figure the project writes reads at a glance: no clipped text, legends off the data and on the canvas,
shared scales, a sensible size, and image grids labelled by class (rows) and w (columns)."""

import numpy as np
import pytest
import torch

from kdiff_align.evaluation import plots
from kdiff_align.evaluation.evaluate import Cell
from kdiff_align.sampling.grid import image_grid, join_images, w_title
from kdiff_align.evaluation.plots import grid_image
from kdiff_align.sd.sample import save_images

TOY = {'model': {'type': 'toy_mlp', 'input_size': [2]}, 'dataset': {'type': 'toy', 'num_classes': 4}}
DIGITS = {'model': {'type': 'image_v1', 'input_size': [8, 8]}, 'dataset': {'type': 'digits', 'num_classes': 10}}
LONG = ('digits: training seed 0, dpmpp_2m, 32 steps, evaluation noise seed 0 (the same noise in every panel); '
        'columns: the guided target w')


def assert_readable(fig, min_px: int = 600) -> None:
    """The one no-clipping check: every drawn text and legend lies whole on the canvas, no legend over the data."""
    problems = plots.layout_problems(fig)
    width = fig.get_figwidth() * fig.dpi
    plots.save_figure(fig, '/dev/null')   # closes it
    assert problems == []
    assert width >= min_px


def assert_labelled_grid(img, rows: int, groups: int, min_tile: int = 40) -> None:
    """A grid of mid-grey tiles: each of rows has a label on its left, each of groups of columns one above it,
    nothing dark touches the canvas edge (no text runs off it) and tiles are at least min_tile px."""
    a = np.asarray(img.convert('L')).astype(int)
    ink = a < 90
    tile = a == 128   # columns and rows mostly tile (not the odd grey pixel of anti-aliased text)
    xs, ys = [(c > c.max() / 2).nonzero()[0] for c in (tile.sum(0), tile.sum(1))]
    x0, x1, y0, y1 = xs.min(), xs.max() + 1, ys.min(), ys.max() + 1
    assert img.width > x1 - x0 and img.height > y1 - y0        # labels added around the raw grid
    assert not (ink[0].any() or ink[-1].any() or ink[:, 0].any() or ink[:, -1].any())
    for r in range(rows):
        band = ink[y0 + r * (y1 - y0) // rows:y0 + (r + 1) * (y1 - y0) // rows, :x0]
        assert band.any(), f'row {r} has no label'
    for g in range(groups):
        band = ink[:y0, x0 + g * (x1 - x0) // groups:x0 + (g + 1) * (x1 - x0) // groups]
        assert band.any(), f'column group {g} has no label'
    assert (y1 - y0) / rows >= min_tile


def sweep_rows(steps):
    return [{'model': m, 'sampler': s, 'steps': st, 'w': w, 'energy': 0.1 + w * (i + 1) / st}
            for i, m in enumerate(['baseline', 'aligned']) for s in ['dpmpp_2m', 'euler'] for st in steps
            for w in [0, 1, 2, 4]]


@pytest.mark.slow
@pytest.mark.parametrize('steps', [[25], [4, 8, 16]])
def test_sweep_figures_are_readable_with_one_legend_for_every_line(steps):
    figures = plots.sweep_figures(sweep_rows(steps), 'energy', floor=0.05)
    assert set(figures) == {'w', 'steps'}
    for fig in figures.values():
        [legend] = fig.legends
        assert [t.get_text() for t in legend.get_texts()] == [
            'aligned (dpmpp_2m)', 'aligned (euler)', 'baseline (dpmpp_2m)', 'baseline (euler)', 'floor']
        assert len({ax.get_ylim() for ax in fig.axes}) == 1
    assert 's = 1 + w' in figures['w'].get_supxlabel()
    for fig in figures.values():
        assert_readable(fig)


def test_line_panels_figure_is_readable_with_many_series_and_marks():
    names = ['standard CFG', 'aligned', 'standard CFG at equal FLOPs', 'GFT', 'model-guidance', 'distilled']
    panels = {f'FD at accuracy >= {a}': {n: [(2 ** k, 1 / (k + i + 1), k == 2) for k in range(1, 6)]
                                         for i, n in enumerate(names)} for a in (0.5, 0.9)}
    fig = plots.line_panels_figure(panels, xlabel='NFE per sample (counted)', ylabel='FD (classifier features)',
                                   floors={'FD at accuracy >= 0.5': 0.05}, log_x=True, title=LONG,
                                   mark_label='equal-NFE pair')
    assert [t.get_text() for t in fig.legends[0].get_texts()] == names + ['floor', 'equal-NFE pair']
    assert_readable(fig)


def toy_samples(n_w: int, n: int = 30) -> torch.Tensor:
    x = torch.randn(4, n_w, n, 2, generator=torch.Generator().manual_seed(0))
    return x * torch.arange(1, n_w + 1).view(1, n_w, 1, 1) + torch.arange(4).view(4, 1, 1, 1)   # scales differ


@pytest.mark.slow
@pytest.mark.parametrize('ws', [[1.0], [0.0, 1.0, 4.0]])
def test_toy_scatter_shares_its_scale_names_the_classes_and_says_s_is_1_plus_w(ws):
    x = toy_samples(len(ws))
    labels = torch.arange(4).repeat_interleave(x.shape[2])
    title = f'step 100, {w_title(ws[-1])}'
    fig = plots.scatter_grid({'': {f'w = {w:g}': (x[:, k].reshape(-1, 2), labels) for k, w in enumerate(ws)}},
                             title=title)
    assert len({(ax.get_xlim(), ax.get_ylim()) for ax in fig.axes}) == 1
    lo, hi = fig.axes[0].get_xlim()
    assert lo <= float(x[..., 0].min()) and hi >= float(x[..., 0].max())   # every point inside the shared frame
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ['0', '1', '2', '3']
    assert fig.legends[0].get_title().get_text() == 'class'
    assert f'cfg scale s = 1 + w = {1 + ws[-1]:g}' in fig.get_suptitle()
    assert_readable(fig)
    assert grid_image(x, TOY, [0, 1, 2, 3], ws, title).width >= 600


def preview(toy: bool, gen: torch.Generator, per: int = 3) -> dict:
    """A saved preview as evaluate writes it: toy points of 4 classes or mid-grey 8x8 digits of 10 classes."""
    if toy:
        return {'samples': torch.randn(40 * per, 2, generator=gen),
                'labels': torch.arange(4).repeat_interleave(10 * per)}
    return {'samples': torch.zeros(10 * per, 1, 8, 8), 'labels': torch.arange(10).repeat_interleave(per)}


@pytest.mark.slow
@pytest.mark.parametrize('toy', [True, False])
def test_sample_table_figure_is_readable(toy):
    gen = torch.Generator().manual_seed(0)
    rows = ['standard CFG', 'aligned', 'standard CFG at equal FLOPs']
    fig = plots.sample_table_figure({r: {f'w = {w:g}': preview(toy, gen) for w in (0, 1, 3)} for r in rows},
                                    toy=toy, title=LONG)
    assert [ax.get_ylabel() for ax in fig.axes[::3]] == rows
    if toy:
        assert len({(ax.get_xlim(), ax.get_ylim()) for ax in fig.axes}) == 1
    assert_readable(fig)


def test_digits_grid_labels_classes_and_w_and_upscales_the_tiles():
    samples = torch.zeros(3, 2, 2, 1, 8, 8)   # mid-grey: [classes, w, n, C, H, W]
    img = grid_image(samples, DIGITS, [0, 1, 2], [0.0, 1.5], "dpmpp_2m, 25 steps; columns: w = the paper's "
                     'guidance weight (cfg scale s = 1 + w)')
    assert_labelled_grid(img, rows=3, groups=2)
    assert img.width >= 400


def test_image_grid_widens_tiles_for_long_column_labels_and_wraps_the_title():
    img = image_grid(torch.zeros(2, 1, 8, 8), 1, 2, col_labels=['w = 0.125 (s = 1.125)', 'w = 7'],
                     row_labels=['class 9'], title=LONG, min_width=300)
    assert_labelled_grid(img, rows=1, groups=2, min_tile=8)
    assert img.width < 700   # the title wrapped, not one long line
    joined = join_images([img, img], title=LONG * 2)
    assert_labelled_grid(joined, rows=1, groups=1, min_tile=8)
    assert joined.width < 2 * img.width + 100 and joined.height > img.height + 2 * 14   # two more title lines


def test_evaluate_sample_grids_label_rows_by_class_and_columns_by_w(tmp_path):
    from PIL import Image

    gen = torch.Generator().manual_seed(0)
    for model, config in (('digits', DIGITS), ('toy', TOY)):
        for w in (0, 1, 3):
            path = tmp_path / 'cells' / model / f'euler-s8-w{w:g}.pt'
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save(preview(model == 'toy', gen, per=8), path)
        [path] = plots.sample_grids(tmp_path, [model], [Cell('euler', 8, float(w)) for w in (0, 1, 3)], config)
        img = Image.open(path)
        if model == 'digits':
            assert_labelled_grid(img, rows=10, groups=3)
        assert img.width >= 600


def test_sd_strip_labels_each_prompt_row_and_titles_w(tmp_path):
    from PIL import Image

    out = tmp_path / 'sd.png'
    prompts = ['a photograph of a cat sitting on a sunny windowsill, highly detailed', 'a dog']
    save_images(torch.full((4, 3, 32, 32), 0.5), out, nrow=2, title=f'dpmpp_2m, 25 steps, {w_title(4)}',
                row_labels=prompts)
    assert_labelled_grid(Image.open(out), rows=2, groups=1, min_tile=32)
    save_images(torch.full((3, 3, 32, 32), 0.5), out, nrow=2, row_labels=prompts)   # white fills the last row
    assert Image.open(out).height > 2 * 32
