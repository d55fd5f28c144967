"""The README's first command (`make demo`): train the embedded digits configs on CPU and draw a sample grid.

Trains configs/digits_aligned.json (and configs/digits_baseline.json, standard CFG training with the same model,
data and budget, for a side-by-side) on scikit-learn's digits, then writes runs/demo/grid.png: rows = classes
0-9, columns = several w (the paper's; cfg scale = 1 + w), the same noise in every column of a row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from ..env import HelpFormatter


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m kdiff_align.demo', description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument('--steps', type=int, default=1500, help='training steps per run')
    p.add_argument('--batch-size', type=int, default=64, help='the batch size')
    p.add_argument('--w', type=float, nargs='+', default=[0., 1., 2., 4.],
                   help="grid columns: guidance w (paper's; cfg scale = 1 + w)")
    p.add_argument('--n', type=int, default=2, help='samples per class and w in the grid')
    p.add_argument('--eval-n', type=int, default=30, help='samples per class and w for the printed metrics (0: none)')
    p.add_argument('--no-baseline', action='store_true', help='train only the aligned config')
    p.add_argument('--out-dir', default='runs/demo', help='where the runs and the grid go (replaced)')
    p.add_argument('--threads', type=int, default=os.cpu_count() or 1, help='torch CPU threads')
    p.add_argument('--seed', type=int, default=0, help='the random seed')
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from ..env import cli_defaults
    cli_defaults()  # before k-diffusion is imported
    args = _parse(argv)
    if args.steps < 1 or args.batch_size < 1 or args.n < 1 or args.eval_n < 0 or any(w < 0 for w in args.w):
        print('error: --steps, --batch-size and --n must be >= 1, --eval-n >= 0 and every --w >= 0', file=sys.stderr)
        return 2
    import torch

    from ..config import align_section, load_config
    from ..sampling.grid import W_CAPTION, default_scale, image_grid, join_images
    from ..sampling.sample import sample_grid
    from ..training.trainer import TrainOptions, train

    torch.set_num_threads(max(1, args.threads))
    out = Path(args.out_dir)
    runs = [('digits_aligned', 'aligned')] + ([] if args.no_baseline else [('digits_baseline', 'standard CFG')])
    start = time.time()
    print(f'== kdiff-align demo: trains {len(runs)} model(s) for {args.steps} steps each, then samples'
          + (' and scores them' if args.eval_n else '') + '; each phase shows a progress bar with its ETA', flush=True)
    results, panels = [], []
    classes = list(range(10))
    for name, label in runs:
        config = load_config(name)  # a shipped config
        if (out / name).exists():
            shutil.rmtree(out / name)  # the demo's own previous run: start fresh, never auto-resume
        print(f'== training {name} ({label}, w_train = {align_section(config)["w_train"]:g}) for {args.steps} steps '
              f'on {torch.get_num_threads()} CPU thread(s)', flush=True)
        result = train(config, TrainOptions(name=name, out_dir=str(out), batch_size=args.batch_size,
                                            end_step=args.steps, seed=args.seed, demo_every=0, sample_n=0,
                                            save_every=0, num_workers=0, log_every=50))
        from ..storage.checkpoint import load_for_inference
        from ..sampling.sample import build_denoiser
        saved_config, state = load_for_inference(result.run_dir)
        denoiser = build_denoiser(load_config(saved_config), state)
        samples = sample_grid(denoiser, config, classes, args.w, n=args.n, seed=args.seed)
        images = samples.reshape(-1, *samples.shape[3:])
        title = f'{label} (w_train = {align_section(config)["w_train"]:g})'
        panels.append(image_grid(images, len(classes), len(args.w) * args.n, scale=default_scale([8, 8]),
                                 row_labels=[f'class {c}' for c in classes],
                                 col_labels=[f'w = {w:g}' for w in args.w], title=title, min_width=0))
        scores = {}
        if args.eval_n:
            from ..evaluation.metrics import digits_metrics
            from tqdm.auto import tqdm
            labels = torch.tensor(classes).repeat_interleave(args.eval_n)
            for w in tqdm(args.w, desc=f'{name}: sampling {len(labels)} per w to score', unit='w', dynamic_ncols=True):
                # One w at a time, for the bar's ETA: the same noise and samples as all of them in one call.
                many = sample_grid(denoiser, config, classes, [w], n=args.eval_n, seed=args.seed + 1)
                scores[w] = digits_metrics(many[:, 0].reshape(-1, *many.shape[3:]), labels)
        results.append((name, label, config, result, scores))

    grid = join_images(panels, f'scikit-learn digits; rows = classes 0-9, columns: {W_CAPTION}; the same noise '
                       'along each row')
    grid_path = out / 'grid.png'
    grid.save(grid_path)

    total = time.time() - start
    print('\n== kdiff-align demo: scikit-learn digits (real 8x8 images, offline), class-conditional image_v1')
    for name, label, config, result, _ in results:
        loss = 'n/a' if result.loss is None else f'{result.loss:.4f}'
        print(f'  {label:<13} w_train = {align_section(config)["w_train"]:g}: {result.step} steps in '
              f'{result.seconds:.0f} s, final training loss {loss} -> {result.run_dir}/')
        print(f'  {"":<13} checkpoint {result.checkpoint}; export {result.export}; metrics {result.metrics}')
    if len(results) > 1:
        print('  (the two losses are different objectives and are not comparable; compare the samples)')
    if args.eval_n:
        floor = results[0][4][args.w[0]]
        print(f'\nSamples scored by a digits classifier trained on the real training split ({args.eval_n} per class '
              f'and w, {len(classes) * args.eval_n} per cell, seed {args.seed + 1}). FD = Frechet distance '
              f'of its features to the real training split (lower is better; real held-out digits: '
              f'{floor["fd_floor"]:.2f}); acc = fraction classified as the requested class (real held-out: '
              f'{floor["accuracy_real"]:.3f}).')
        header = "w (paper's)"
        print(f'  {header:<22}' + ''.join(f'{w:>16g}' for w in args.w))
        for name, label, config, result, scores in results:
            print('  ' + f'{label + " FD / acc":<22}'
                  + ''.join(f'{scores[w]["fd"]:>9.2f} / {scores[w]["accuracy"]:.2f}' for w in args.w))
    print(f'Sample grid: {grid_path}  (rows = classes 0-9, columns = w {", ".join(f"{w:g}" for w in args.w)}; '
          f"paper's w, cfg scale = 1 + w)")
    print(f'Total time: {total:.0f} s. More samples: python -m kdiff_align.sample {results[0][3].run_dir} '
          '--classes 3 7 --w 0 1 3')
    return 0


if __name__ == '__main__':
    sys.exit(main())
