"""Evaluation sweeps: `python -m kdiff_align.evaluate CKPT [CKPT ...] --w 0 1 2 4 --steps 4 8 16 32`.

For every checkpoint and every cell (sampler, steps, w) of the grid, samples n images or points from the same
noise (a fixed seed per cell, shared by all cells and checkpoints, so differences between cells come from the
cell, not from the noise) and computes the metrics of the checkpoint's dataset:

- toy: energy distance and sliced W2^2 to exact samples of p(x | c), averaged over classes, with their floors, and
  the energy distance to exact samples of the guided target p_w(x | c) (kdiff_align.evaluation.tilted) at the cell's
  effective guidance, with its floor;
- digits: Fréchet distance in a deterministic classifier's feature space against the real training split, and
  class accuracy; floors from the real held-out split (n = its 445 images, with its labels);
- image datasets (cifar10, imagefolder-class): FID/KID with clean-fid's Inception features against the local
  training set (or clean-fid's CIFAR-10 statistics, FID only); every printed FID states n and the reference.

Every row also states w_target, the effective guidance of the cell (`effective_guidance`: w itself except for an
aligned model), nfe, the network evaluations per sample counted while sampling (kdiff_align.sampling.nfe), and passes,
the network evaluations per sampling step (1: a one-pass model at its trained w; 2: CFG).

With `--guide CKPT_OR_RUN` every w is autoguidance's (D_main + w·(D_main − D_guide),
kdiff_align.sampling.autoguidance), not CFG's: each row records the guide (column guide), the model is named
<checkpoint>+guide-<guide> (so its cells never mix with the same checkpoint's CFG cells), nfe counts the calls of
both models, and w_target is w itself.

Each finished cell is written atomically to OUT/cells/<model>/<cell>.json, so an interrupted sweep resumes where
it stopped. Outputs: OUT/results.csv, OUT/results.json, plots (metric vs w per step count, metric vs steps per w)
and sample grids. w is the paper's (w = 0: unguided conditional; cfg scale = 1 + w).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..env import HelpFormatter, cli_defaults
cli_defaults()  # before k-diffusion is imported

import torch  # noqa: E402
from torch import nn  # noqa: E402

from ..storage.checkpoint import CheckpointError, atomic_write, load_for_inference  # noqa: E402
from ..core import registry  # noqa: E402
from ..config import ConfigError, load_config, make_guided_denoiser  # noqa: E402
from ..sampling.autoguidance import load_guide  # noqa: E402
from ..sampling.sample import (  # noqa: E402,F401 (build_denoiser: claims)
    build_denoiser, data_shape, passes_per_step, sample, trained_w)

DETERMINISTIC_SAMPLER = 'dpmpp_2m'
STOCHASTIC_SAMPLER = 'euler_ancestral'


class EvaluationError(ValueError):
    """A checkpoint, option or reference set the evaluation cannot use."""


# ---------------------------------------------------------------------------------------------------------------
# Cells and sampling.

@dataclass(frozen=True, order=True)
class Cell:
    """One point of the grid: a k-diffusion sampler, its number of steps and the paper's w."""
    sampler: str
    steps: int
    w: float

    @property
    def key(self) -> str:
        return f'{self.sampler}-s{self.steps}-w{self.w:g}'


def make_cells(ws: Iterable[float], steps: Iterable[int], samplers: Iterable[str]) -> list[Cell]:
    """The grid samplers x steps x w, validated."""
    from ..config import SAMPLERS

    cells = []
    for sampler in samplers:
        if sampler not in SAMPLERS:
            raise EvaluationError(f'sampler {sampler!r} is unknown; allowed: {", ".join(SAMPLERS)}')
        for s in steps:
            if int(s) != s or s < 1:
                raise EvaluationError(f'steps must be integers >= 1, got {s}')
            for w in ws:
                if not w >= 0:
                    raise EvaluationError(f'w (the paper\'s guidance weight) must be >= 0, got {w}')
                cells.append(Cell(sampler, int(s), float(w)))
    return cells


@torch.no_grad()
def sample_cell(denoiser: nn.Module, config: Mapping[str, Any], cell: Cell, labels: torch.Tensor | None, *,
                seed: int, n: int | None = None, batch_size: int = 500, device: str | torch.device = 'cpu',
                guide: nn.Module | None = None) -> torch.Tensor:
    """n (default len(labels)) samples at the cell with sample.sample, in batches; the noise of row i depends
    only on (seed, i, batch_size). labels None: an unconditional model, w = 0 only (any w with a guide:
    autoguidance, sample's guide)."""
    if labels is None and cell.w != 0 and guide is None:
        raise EvaluationError(f'an unconditional model samples only at w = 0, got w = {cell.w}')
    if n is None:
        if labels is None:
            raise EvaluationError('sample_cell needs labels or n')
        n = labels.shape[0]
    out = []
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == 'cuda' else []):
        for k, start in enumerate(range(0, n, batch_size)):
            gen = torch.Generator().manual_seed(seed * 100_003 + k)
            rows = min(batch_size, n - start)
            noise = torch.randn(rows, *data_shape(config), generator=gen).to(device)
            torch.manual_seed(seed * 100_003 + k)  # the ancestral samplers' fresh noise
            batch_labels = None if labels is None else labels[start:start + rows]
            out.append(sample(denoiser, config, noise, batch_labels, cell.w, steps=cell.steps,
                              sampler=cell.sampler, guide=guide).float().cpu())
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------------------
# Metrics per dataset type.

@dataclass
class Task:
    """What to sample (labels) and how to score it: evaluate(samples) -> {metric: value}."""
    kind: str
    labels: torch.Tensor
    evaluate: Callable[[torch.Tensor], dict[str, float]]
    reference: str
    primary: str                      # the metric the plots and the claims use (lower is better)
    extra: dict[str, Any] = field(default_factory=dict)
    at_target: Callable[[torch.Tensor, float], dict[str, float]] | None = None   # metrics against p_w at w_target


def toy_task(config: Mapping[str, Any], n: int | None = None, seed: int = 0) -> Task:
    from . import metrics
    from .tilted import ToyTarget
    from ..data.toy import ToyMixture

    d = config['dataset']
    mixture = ToyMixture(d['num_classes'], radius=d.get('radius', 2.0), std=d.get('std', 0.25))
    per_class = (n or 4000) // d['num_classes']
    if per_class < 2:
        raise EvaluationError(f'--n {n} gives fewer than 2 samples per class for {d["num_classes"]} classes')
    labels = torch.arange(d['num_classes']).repeat_interleave(per_class)
    target = ToyTarget(mixture)

    def at_target(x: torch.Tensor, w: float) -> dict[str, float]:
        return {'energy_w': target.distance(x, labels, w, seed=seed), 'energy_w_floor': target.floor(w, per_class,
                                                                                                        seed=seed)}

    return Task('toy', labels, lambda x: metrics.toy_distances(x, labels, mixture, seed=seed),
                f'{per_class} exact samples of p(x|c) per class (energy_w: of p_w(x|c), exact up to a grid cell of '
                f'{target.grid.cell:.2g})', 'energy', at_target=at_target)


def digits_task(config: Mapping[str, Any], n: int | None = None, seed: int = 0) -> Task:
    from . import metrics
    from ..data.digits import load_digits

    if n is not None:
        raise EvaluationError('--n does not apply to digits: n is the held-out split\'s size (445), so that the '
                              'floor (held-out real images) has the same n; omit --n')
    _, labels = load_digits('test')
    ref = metrics.digits_reference(seed)
    return Task('digits', labels, lambda x: metrics.digits_metrics(x, labels, seed=seed),
                f'digits train split ({ref["n_train"]} real images), classifier features', 'fd')


def image_task(config: Mapping[str, Any], n: int | None = None, seed: int = 0, *, inception: str | None = None,
               reference: str = 'train', reference_n: int | None = None, allow_unverified: bool = False,
               device: str | torch.device = 'cpu', cache_dir: Path | None = None) -> Task:
    """FID/KID (clean-fid's Inception features, "clean" resizing) against the local training set or clean-fid's
    CIFAR-10 statistics."""
    import numpy as np

    from . import metrics

    d = config['dataset']
    num_classes = d['num_classes']
    n = n or 50_000
    extractor = metrics.InceptionFeatures(inception, allow_unverified=allow_unverified, device=device)
    if reference == 'clean-fid':
        if d['type'] != 'cifar10':
            raise EvaluationError(f'--reference clean-fid has statistics for cifar10 only, not {d["type"]!r}')
        from cleanfid import fid as cfid
        try:
            mu, sigma = cfid.get_reference_statistics('cifar10', 32, mode='clean', split='train')
        except Exception as err:  # noqa: BLE001 - offline
            raise EvaluationError(f'clean-fid\'s CIFAR-10 statistics could not be loaded ({err}); they download '
                                  'on first use: run once online, or use --reference train') from None
        ref_feats, ref_desc = None, 'clean-fid CIFAR-10 train statistics (50,000 images)'
    elif reference == 'train':
        images = _training_images(config, reference_n or n)
        cache = None if cache_dir is None else cache_dir / f'reference_{d["type"]}_{images.shape[0]}.npy'
        if cache is not None and cache.exists():
            ref_feats = torch.from_numpy(np.load(cache))
        else:
            ref_feats = metrics.image_features(extractor, images)
            if cache is not None:
                cache.parent.mkdir(parents=True, exist_ok=True)
                np.save(cache, ref_feats.numpy())
        mu, sigma = metrics.feature_statistics(ref_feats)
        ref_desc = f'{d["type"]} training set ({ref_feats.shape[0]} images at {d.get("location")})'
    else:
        raise EvaluationError(f'--reference must be train or clean-fid, got {reference!r}')
    labels = torch.arange(n) % num_classes if num_classes else None

    def evaluate(x: torch.Tensor) -> dict[str, float]:
        f = metrics.image_features(extractor, x)
        out = {'fid': metrics.frechet_distance(mu, sigma, *metrics.feature_statistics(f))}
        if ref_feats is not None:
            out['kid'] = metrics.kid(f, ref_feats, num_subsets=100, subset_size=min(1000, f.shape[0]))
        return out

    note = '' if extractor.verified else ' (UNVERIFIED Inception weights: not comparable to published FIDs)'
    return Task('image', labels if labels is not None else torch.zeros(n, dtype=torch.long), evaluate,
                ref_desc + note, 'fid', extra={'unconditional': labels is None})


def _training_images(config: Mapping[str, Any], n: int) -> torch.Tensor:
    """Up to n training images in [-1, 1] (cifar10 or an imagefolder, at the model's input size)."""
    from torchvision import datasets, transforms

    d = config['dataset']
    location = d.get('location')
    size = config['model']['input_size']
    tf = transforms.Compose([transforms.Resize(min(size), interpolation=transforms.InterpolationMode.BICUBIC),
                             transforms.CenterCrop(size), transforms.ToTensor()])
    try:
        if d['type'] == 'cifar10':
            ds = datasets.CIFAR10(location, train=True, download=False, transform=tf)
        elif d['type'] in ('imagefolder', 'imagefolder-class'):
            ds = datasets.ImageFolder(location, transform=tf)
        else:
            raise EvaluationError(f'FID reference from dataset type {d["type"]!r} is not supported; '
                                  'allowed: cifar10, imagefolder, imagefolder-class')
    except RuntimeError as err:
        raise EvaluationError(f'the training set for the FID reference is not at {location!r} ({err}); set '
                              'dataset.location or use --reference clean-fid') from None
    idx = range(min(n, len(ds)))
    return torch.stack([ds[i][0] for i in idx]) * 2 - 1


def make_task(config: Mapping[str, Any], n: int | None = None, seed: int = 0, **image_kwargs: Any) -> Task:
    """The metric task for the config's dataset type."""
    kind = config['dataset']['type']
    if kind == 'toy':
        return toy_task(config, n, seed)
    if kind == 'digits':
        return digits_task(config, n, seed)
    return image_task(config, n, seed, **image_kwargs)


def _moments(spec: Any) -> tuple[float, float]:
    """(E[w], E[w^2]) of a training w: a number or a uniform / log-uniform distribution."""
    from ..core.registry import ScaleDistribution, make_w

    w = make_w(spec)
    if not isinstance(w, ScaleDistribution):
        return w, w * w
    a, b = w.min_value, w.max_value
    if w.type == 'uniform' or a == b:
        return (a + b) / 2, (a * a + a * b + b * b) / 3
    log = math.log(b / a)
    return (b - a) / log, (b * b - a * a) / (2 * log)


def effective_guidance(config: Mapping[str, Any], w: float) -> float:
    """The CFG w, relative to the true pair p(x | c), p(x), that sampling the config's model at the paper's w aims at
    (docs/design.md sections 2 and 6). An aligned model's optimum is F_c = T_u + a (T_c - T_u) with
    a = E[mu (1 + w_t) + 1 - mu] / E[mu (1 + w_t)^2 + 1 - mu] (1 / (1 + w_train) for a fixed w_train and mix 1; 1 for
    standard CFG, w_train = 0), so CFG at w acts as (1 + w) a - 1. gft, mg and distill take w in CFG's own units
    (config.make_guided_denoiser maps it), so their target is w."""
    align = config['align']
    if registry.get(align.get('objective', registry.names()[0])).one_pass:
        return float(w)
    mu = float(align.get('mix', 1.0))
    m1, m2 = _moments(align['w_train'])
    a = (mu * (1 + m1) + 1 - mu) / (mu * (1 + 2 * m1 + m2) + 1 - mu)
    return (1 + w) * a - 1


# ---------------------------------------------------------------------------------------------------------------
# The resumable sweep.

@dataclass
class SweepResult:
    rows: list[dict[str, Any]]
    computed: list[tuple[str, str]]   # (model, cell key) sampled and scored in this call
    skipped: list[tuple[str, str]]    # finished before this call, read back


def cell_path(out_dir: Path, model: str, cell: Cell) -> Path:
    return Path(out_dir) / 'cells' / model / f'{cell.key}.json'


def run_sweep(models: Mapping[str, tuple[Mapping[str, Any], nn.Module]], cells: Sequence[Cell], task: Task | Callable,
              out_dir: str | Path, *, seed: int = 0, batch_size: int = 500, device: str | torch.device = 'cpu',
              preview: int | None = None, progress: bool = True, extra: Mapping[str, Any] | None = None,
              guides: Mapping[str, nn.Module] | None = None) -> SweepResult:
    """Samples and scores every (model, cell) whose cell file does not exist yet; returns every row.

    task is a Task or a callable config -> Task. A cell's row holds the metrics, n, the reference set, the seed,
    seconds, w_target (effective_guidance), nfe (network evaluations per sample, counted), passes (per step), and
    the first `preview` samples of each class (default 8 images, 200 points) are saved beside it (.pt) for sample grids.
    guides: model name -> guide denoiser: that model samples with autoguidance at each cell's w (its nfe counts both
    models' calls, passes is 2 at w > 0, w_target is w).
    """
    from tqdm.auto import tqdm

    from ..sampling.nfe import CountingDenoiser

    out_dir = Path(out_dir)
    rows, computed, skipped = [], [], []
    todo = [(name, cell) for name in models for cell in cells]
    bar = tqdm(todo, desc='evaluate', disable=not progress, unit='cell', file=sys.stderr)
    tasks: dict[str, Task] = {}
    for name, cell in bar:
        path = cell_path(out_dir, name, cell)
        if path.exists():
            rows.append(json.loads(path.read_text()))
            skipped.append((name, cell.key))
            continue
        config, denoiser = models[name]
        if name not in tasks:
            tasks[name] = task(config) if callable(task) and not isinstance(task, Task) else task
        t = tasks[name]
        bar.set_postfix_str(f'{name} {cell.key}')
        start = time.perf_counter()
        labels = None if t.extra.get('unconditional') else t.labels
        counter = CountingDenoiser(denoiser)
        guide = (guides or {}).get(name)
        guide_counter = None if guide is None else CountingDenoiser(guide)
        x = sample_cell(counter, config, cell, labels, seed=seed, n=t.labels.shape[0], batch_size=batch_size,
                        device=device, guide=guide_counter)
        w_target = effective_guidance(config, cell.w) if guide is None else cell.w
        rows_run = counter.rows + (0 if guide_counter is None else guide_counter.rows)
        passes = passes_per_step(config, cell.w) if guide is None else (2 if cell.w else 1)
        scores = t.evaluate(x)
        if t.at_target is not None:
            scores.update(t.at_target(x, w_target))
        row = {'model': name, 'sampler': cell.sampler, 'steps': cell.steps, 'w': cell.w, 'w_target': w_target,
               **scores, 'nfe': rows_run / x.shape[0], 'passes': passes,
               'n': int(x.shape[0]), 'reference': t.reference,
               'seed': seed, 'seconds': round(time.perf_counter() - start, 3), **(extra or {})}
        path.parent.mkdir(parents=True, exist_ok=True)
        k = preview if preview is not None else (200 if x.ndim == 2 else 8)
        keep = torch.cat([(t.labels == c).nonzero().squeeze(1)[:k] for c in t.labels.unique()])
        kept = {'samples': x[keep].clone(), 'labels': t.labels[keep].clone()}
        atomic_write(path.with_suffix('.pt'), lambda tmp: torch.save(kept, tmp))
        text = json.dumps(row, indent=1)
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))  # written last: its existence marks the cell done
        rows.append(row)
        computed.append((name, cell.key))
    return SweepResult(rows, computed, skipped)


def write_table(rows: Sequence[Mapping[str, Any]], out_dir: str | Path, stem: str = 'results') -> tuple[Path, Path]:
    """rows -> OUT/<stem>.csv and OUT/<stem>.json."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    with open(out_dir / f'{stem}.csv', 'w', newline='') as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / f'{stem}.json').write_text(json.dumps(list(rows), indent=1))
    return out_dir / f'{stem}.csv', out_dir / f'{stem}.json'


BESIDE = {'energy': ('energy_w', 'to the guided target p_w at w_target'), 'fd': ('accuracy', 'class accuracy'),
          'fid': ('kid', 'KID')}   # the metric printed beside each primary one


def describe(row: Mapping[str, Any], primary: str) -> str:
    """A one-line summary that states n and the reference set (FID is meaningless without them), the metric beside
    the primary one (toy: energy_w; digits: accuracy), and the network passes per step."""
    name = primary.upper() if primary in ('fid', 'fd') else primary
    label = f'FID-{row["n"]}' if primary == 'fid' else name
    text = f'{row["model"]} {row["sampler"]} steps={row["steps"]} w={row["w"]:g}: {label} = {row[primary]:.4g}'
    key, what = BESIDE.get(primary, (None, None))
    if row.get(key) is not None:
        text += f', {key} = {row[key]:.4g} ({what}' + (f' {row["w_target"]:g})' if key == 'energy_w' else ')')
    if row.get('passes') is not None:
        text += f', {row["passes"]} pass{"es" if row["passes"] > 1 else ""}/step'
    if row.get('guide'):
        text += f' (autoguidance with guide {row["guide"]}; w is autoguidance\'s)'
    return text + f' (n = {row["n"]} samples vs {row["reference"]})'


# ---------------------------------------------------------------------------------------------------------------
# CLI.

DEFAULT_WS = (0., 0.5, 1., 2., 4., 8.)


def default_ws(models: Iterable[tuple[Mapping[str, Any], nn.Module]]) -> list[float]:
    """DEFAULT_WS plus each one-pass model's trained w (mg: its one-pass w_mg), without the values outside a gft or
    distill model's trained w range (said on stderr)."""
    from ..config import w_range

    models = list(models)
    ws = sorted({*DEFAULT_WS, *(trained_w(c) for c, _ in models if registry.of(c).one_pass)})
    for config, _ in models:
        if registry.of(config).sampling == 'told-w':
            lo, hi = w_range(config)
            ws = [w for w in ws if lo <= w <= hi]
    dropped = [w for w in DEFAULT_WS if w not in ws]
    if dropped:
        print(f'note: w {", ".join(f"{w:g}" for w in dropped)} left out of the default grid: outside the w range '
              'a one-pass model here was trained for (pass --w to choose)', file=sys.stderr)
    return ws


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m kdiff_align.evaluate', description=__doc__.split('\n\n')[0],
                                formatter_class=HelpFormatter)
    p.add_argument('checkpoints', nargs='*', help='.safetensors exports (config in metadata) or .pth files with '
                   '"config" and "model_ema"/"model"')
    p.add_argument('--out', type=Path, default=Path('eval'), help='output folder (resumable: finished cells are kept)')
    p.add_argument('--w', type=float, nargs='+', default=None,
                   help="guidance w, the paper's (cfg scale = 1 + w); default: 0 0.5 1 2 4 8 and each one-pass "
                        "model's trained w (mg: its one-pass w), without the values a gft or distill model was not "
                        'trained for')
    p.add_argument('--steps', type=int, nargs='+', default=[4, 8, 16, 32])
    p.add_argument('--samplers', nargs='+', default=[DETERMINISTIC_SAMPLER, STOCHASTIC_SAMPLER])
    p.add_argument('--n', type=int, default=None, help='samples per cell (toy default 4000, images 50000; digits: '
                   'fixed to the held-out split\'s 445)')
    p.add_argument('--batch-size', type=int, default=500)
    p.add_argument('--seed', type=int, default=0, help='the noise seed of every cell')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--inception', default=None, help='path of inception-2015-12-05.pt for FID/KID (or set '
                   '$KDIFF_ALIGN_INCEPTION; default: a cached copy, else clean-fid downloads it, SHA-256 checked)')
    p.add_argument('--allow-unverified-inception', action='store_true',
                   help='accept an Inception TorchScript whose features are not verified equal to clean-fid\'s')
    p.add_argument('--reference', choices=['train', 'clean-fid'], default='train',
                   help='FID reference: the local training set, or clean-fid\'s CIFAR-10 statistics (online once)')
    p.add_argument('--reference-n', type=int, default=None, help='training images for the reference (default n)')
    p.add_argument('--compare-inception', nargs=2, metavar=('A', 'B'), default=None,
                   help='only compare the features of two Inception TorchScript files on the same random images')
    p.add_argument('--guide', metavar='CKPT_OR_RUN', default=None,
                   help="autoguidance: every --w is the paper's w of D_main + w (D_main - D_guide), with this weaker "
                   'model of the same task as guide of every checkpoint (a checkpoint, an export, or a run folder: '
                   'its *_guide.safetensors snapshot, else its latest checkpoint), not CFG; 2 NFE per step at w > 0')
    p.add_argument('--no-progress', action='store_true')
    args = p.parse_args(argv)
    if args.guide is not None and args.compare_inception is not None:
        p.error('--guide does not apply to --compare-inception (which samples nothing): pass one of them')
    if args.compare_inception is None and not args.checkpoints:
        p.error('pass at least one checkpoint (or --compare-inception A B)')
    for flag in ('batch_size', 'n', 'reference_n'):
        value = getattr(args, flag)
        if value is not None and value < 1:
            p.error(f'--{flag.replace("_", "-")} must be >= 1, got {value}')
    return args


def main(argv: Sequence[str] | None = None) -> int:
    from . import plots

    args = _parse(argv)
    if args.compare_inception:
        from . import metrics
        try:
            print(json.dumps(metrics.compare_inception(*args.compare_inception), indent=1))
        except metrics.InceptionError as err:
            print(f'error: --compare-inception: {err}', file=sys.stderr)
            return 2
        return 0
    try:
        models, names, guides, extra = {}, [], {}, None
        for path in args.checkpoints:
            name = Path(path).stem
            config, state = load_for_inference(path)
            config = load_config(config)
            guide = None
            if args.guide is not None:
                guide_path, guide = load_guide(config, state, args.guide, device=args.device)
                name += f'+guide-{guide_path.stem}'   # its own cells: never mixed with the model's CFG cells
                extra = {'guide': str(guide_path)}
            while name in models:
                name += '_'
            models[name] = (config, build_denoiser(config, state, args.device))
            names.append(name)
            if guide is not None:
                guides[name] = guide
        ws = args.w if args.w is not None else default_ws(models.values())
        for name, (config, denoiser) in models.items():   # a one-pass model refuses a w outside its trained range
            for w in ws if name not in guides else []:
                make_guided_denoiser(config, denoiser, w=w)
        cells = make_cells(ws, args.steps, args.samplers)
        kinds = {c['dataset']['type'] for c, _ in models.values()}
        if len(kinds) > 1:
            raise EvaluationError(f'checkpoints of different datasets cannot share one sweep: {sorted(kinds)}')
        image_kwargs = dict(inception=args.inception, reference=args.reference, reference_n=args.reference_n,
                            allow_unverified=args.allow_unverified_inception, device=args.device,
                            cache_dir=args.out)
        first_config = next(iter(models.values()))[0]
        kind = first_config['dataset']['type']
        task = make_task(first_config, args.n, args.seed, **({} if kind in ('toy', 'digits') else image_kwargs))
        if args.n is not None and task.labels.shape[0] != args.n:
            classes = first_config['dataset']['num_classes']
            print(f'note: --n {args.n} rounded to {task.labels.shape[0]} ({task.labels.shape[0] // classes} samples '
                  f'per class x {classes} classes)', file=sys.stderr)
    except (EvaluationError, CheckpointError, ConfigError, FileNotFoundError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    result = run_sweep(models, cells, task, args.out, seed=args.seed, batch_size=args.batch_size,
                       device=args.device, progress=not args.no_progress, extra=extra, guides=guides)
    csv_path, _ = write_table(result.rows, args.out)
    for row in result.rows:
        print(describe(row, task.primary))
    plots.sweep_plots(result.rows, task.primary, args.out, group='model')
    plots.sample_grids(args.out, names, cells, first_config)
    print(f'{len(result.computed)} cells computed, {len(result.skipped)} read back; table {csv_path}; plots in '
          f'{args.out}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
