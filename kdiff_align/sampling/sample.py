"""Sampling from a checkpoint or export: `python -m kdiff_align.sample runs/NAME --classes 0 1 2 --w 0 1 3`.

Writes a grid PNG (rows = classes, columns = w, the paper's; cfg scale = 1 + w) and optionally one PNG per
sample. Every column of a row starts from the same noise, so columns differ only by w. Without --w (or with
`--w trained`) a one-pass model (gft, mg, distill) samples at its trained w, in one network pass per step; the
passes per step of each w are printed. An existing grid is never overwritten: pass another --out, or --force.
With `--guide CKPT_OR_RUN` every w is autoguidance's (Karras et al. 2024: D_main + w·(D_main − D_guide), the
guide a weaker model of the same task), not CFG's: 2 network passes per step at w > 0.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import registry
from ..config import SAMPLERS, ConfigError, build_denoiser  # noqa: F401 (build_denoiser: re-exported)
from ..env import HelpFormatter
from .autoguidance import GUIDE_SNAPSHOT
from .grid import W_CAPTION, grid_image


def data_shape(config: Mapping[str, Any]) -> tuple[int, ...]:
    """The shape of one sample."""
    model = config['model']
    if model['type'] == 'toy_mlp':
        return (model['input_channels'],)
    return (model['input_channels'], *model['input_size'])


def trained_w(config: Mapping[str, Any]) -> float:
    """The w `--w trained` (and no --w for a one-pass model) selects: mg's trained w_mg, else align.w_sample."""
    from ..config import align_section, w_range

    return registry.of(config).trained_w(w_range(config), align_section(config)['w_sample'])


def passes_per_step(config: Mapping[str, Any], w: float) -> int:
    """Network evaluations per sampling step of the config's model at the paper's w (registry.Spec.passes; CFG at
    w = 0 and an unconditional model run one)."""
    from ..config import w_range

    spec = registry.of(config)
    if not config['dataset']['num_classes'] or (spec.sampling == 'cfg' and w == 0):
        return 1
    return spec.passes(w, w_range(config))


@torch.no_grad()
def sample(denoiser: nn.Module, config: Mapping[str, Any], noise: torch.Tensor, labels: torch.Tensor | None,
           w: float, *, steps: int | None = None, sampler: str | None = None,
           extra_args: Mapping[str, Any] | None = None, disable: bool = True, guide: nn.Module | None = None
           ) -> torch.Tensor:
    """Samples from unit-variance noise with guidance at the paper's w (cfg scale = 1 + w); with a guide
    denoiser, autoguidance at w instead (AutoGuidedDenoiser, align.sigma_interval its guidance interval)."""
    import k_diffusion as K

    from ..config import get_sampler, make_guided_denoiser

    align = config['align']
    steps = align['sample_steps'] if steps is None else steps
    sampler_fn = get_sampler(align['sampler'] if sampler is None else sampler)
    model = config['model']
    sigmas = K.sampling.get_sigmas_karras(steps, model['sigma_min'], model['sigma_max'], rho=7.,
                                          device=noise.device)
    extra = dict(extra_args or {})
    if labels is not None:
        extra['class_cond'] = labels.to(noise.device)
    if guide is not None:
        from .autoguidance import AutoGuidedDenoiser
        guided = AutoGuidedDenoiser(denoiser, guide, w, sigma_interval=align['sigma_interval'])
    elif labels is not None:
        guided = make_guided_denoiser(config, denoiser, w=w)
    else:
        if w != 0:
            raise ValueError(f'an unconditional model (dataset.num_classes 0) samples only at w = 0, got w = {w}')
        guided = denoiser
    return sampler_fn(guided, noise * sigmas[0], sigmas, extra_args=extra, disable=disable)


@torch.no_grad()
def sample_grid(denoiser: nn.Module, config: Mapping[str, Any], classes: Sequence[int], ws: Sequence[float], *,
                n: int = 1, steps: int | None = None, sampler: str | None = None, seed: int = 0,
                device: str | torch.device = 'cpu', guide: nn.Module | None = None) -> torch.Tensor:
    """Samples [len(classes), len(ws), n, *shape]: the same noise for every w of a (class, i) pair (with a guide
    denoiser: autoguidance's w, sample's guide)."""
    num_classes = config['dataset']['num_classes']
    gen = torch.Generator().manual_seed(seed)
    rows = max(len(classes), 1)
    noise = torch.randn(rows * n, *data_shape(config), generator=gen).to(device)
    labels = torch.tensor(classes, dtype=torch.long).repeat_interleave(n) if num_classes else None
    out = []
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == 'cuda' else []):
        for w in ws:
            torch.manual_seed(seed)  # ancestral samplers: the same fresh noise for every w
            out.append(sample(denoiser, config, noise, labels, w, steps=steps, sampler=sampler, guide=guide))
    x = torch.stack(out, 1)  # [rows * n, len(ws), ...]
    return x.view(rows, n, len(ws), *x.shape[2:]).transpose(1, 2).cpu()


def _w_arg(text: str) -> float | str:
    """--w's values: a number, or 'trained'."""
    return text if text == 'trained' else float(text)


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m kdiff_align.sample', description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument('checkpoint', help='a .pth checkpoint, a run folder (its latest.json), or a .safetensors export')
    p.add_argument('--classes', type=int, nargs='+', help='class labels, one grid row each (default: all, up to 10)')
    p.add_argument('--w', type=_w_arg, nargs='+', help="guidance w, one column each (paper's; cfg scale = 1 + w), "
                   "or 'trained': the model's trained w (mg: its one-pass w_mg; gft, distill: align.w_sample). "
                   "Default: 'trained' for one-pass models (gft, mg, distill), else 0 and align.w_sample")
    p.add_argument('--n', type=int, default=1, help='samples per class and w')
    p.add_argument('--steps', type=int, help='sampler steps (default: align.sample_steps)')
    p.add_argument('--sampler', choices=SAMPLERS, help='k-diffusion sampler (default: align.sampler)')
    p.add_argument('--seed', type=int, default=0, help='the random seed')
    p.add_argument('--out', default=None, help='the grid PNG (default: <checkpoint stem>_grid.png next to it); an '
                   'existing file is refused unless --force')
    p.add_argument('--force', action='store_true', help='overwrite an existing grid PNG')
    p.add_argument('--png-dir', help='also write one PNG per sample into this folder')
    p.add_argument('--no-ema', action='store_true', help='use the raw weights, not the EMA (checkpoints only)')
    p.add_argument('--guide', metavar='CKPT_OR_RUN', help="autoguidance: every --w is the paper's w of "
                   'D_main + w (D_main - D_guide) with this weaker model of the same task as guide (a checkpoint, '
                   f'an export, or a run folder: its *{GUIDE_SNAPSHOT} snapshot, else its latest checkpoint), '
                   'not CFG; 2 network passes per step at w > 0')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu', help='the torch device')
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    from ..env import cli_defaults
    cli_defaults()  # before k-diffusion is imported
    args = _parse(argv)
    from ..storage.checkpoint import CheckpointError, load_for_inference
    from ..config import align_section, load_config, make_guided_denoiser
    from .autoguidance import load_guide

    try:
        raw_config, state = load_for_inference(args.checkpoint, ema=not args.no_ema)
        config = load_config(raw_config)
        num_classes = config['dataset']['num_classes']
        classes = args.classes if args.classes is not None else list(range(min(num_classes, 10)))
        bad = [c for c in classes if not 0 <= c < max(num_classes, 1)]
        if bad or (not num_classes and args.classes):
            raise ConfigError(f'--classes: got {bad or args.classes}; this model has '
                              + (f'classes 0..{num_classes - 1}' if num_classes else 'no classes (unconditional)'))
        if args.guide is not None and 'trained' in (args.w or []):
            raise ConfigError("--w trained: a trained w is CFG's or a one-pass model's; with --guide every w is "
                              "autoguidance's: pass numbers")
        if args.w is not None:
            ws = [trained_w(config) if w == 'trained' else w for w in args.w]
        elif registry.of(config).one_pass:
            ws = [trained_w(config)]
        else:
            ws = sorted({0.0, float(align_section(config)['w_sample'])})
        if not num_classes:
            ws, classes = (ws if args.guide is not None else [0.0]), [0]
        if any(not math.isfinite(w) or w < 0 for w in ws):
            raise ConfigError(f"--w: got {ws}; allowed: numbers >= 0 (the paper's w; cfg scale = 1 + w)")
        if args.n < 1 or (args.steps is not None and args.steps < 1):
            raise ConfigError(f'--n and --steps must be >= 1, got {args.n} and {args.steps}')
        denoiser = build_denoiser(config, state, args.device)
        guide = guide_path = None
        if args.guide is not None:
            guide_path, guide = load_guide(config, state, args.guide, ema=not args.no_ema, device=args.device)
        for w in ws if guide is None else []:   # a one-pass model refuses a w outside its trained range
            make_guided_denoiser(config, denoiser, w=w)
        src = Path(args.checkpoint)
        stem = f'{src.stem}_autoguided' if guide is not None else src.stem   # never the CFG grid's name
        out = Path(args.out) if args.out else (src if src.is_dir() else src.parent) / f'{stem}_grid.png'
        if out.exists() and not args.force:
            raise ConfigError(f'{out} exists; pass another --out, or --force to overwrite it')
    except (ConfigError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    samples = sample_grid(denoiser, config, classes, ws, n=args.n, steps=args.steps, sampler=args.sampler,
                          seed=args.seed, device=args.device, guide=guide)
    out.parent.mkdir(parents=True, exist_ok=True)
    steps = args.steps or config['align']['sample_steps']
    caption = W_CAPTION if guide is None else f"w = autoguidance's (D_main + w (D_main - D_guide)), guide {guide_path}"
    title = f"{args.sampler or config['align']['sampler']}, {steps} steps; columns: {caption}"
    grid_image(samples, config, classes, ws, title).save(out)
    what = "paper's w, cfg scale = 1 + w" if guide is None else "autoguidance's w"
    print(f'grid: {out} (rows = classes {classes}, columns = w {ws}; {what})')
    if guide is None:
        print('network passes per step: ' + ', '.join(f'{passes_per_step(config, w)} at w = {w:g}' for w in ws))
    else:
        print(f"autoguidance with guide {guide_path} (w: autoguidance's, not CFG's; 2 network passes per step at "
              'w > 0, 1 at w = 0' + (' and outside the guidance interval' if config['align']['sigma_interval']
                                     else '') + ')')
    if args.png_dir and config['model']['type'] != 'toy_mlp':
        from .grid import to_uint8
        from PIL import Image
        folder = Path(args.png_dir)
        folder.mkdir(parents=True, exist_ok=True)
        for r, c in enumerate(classes):
            for k, w in enumerate(ws):
                for i, px in enumerate(to_uint8(samples[r, k])):
                    arr = px.squeeze(-1).numpy() if px.shape[-1] == 1 else px.numpy()
                    Image.fromarray(arr).save(folder / f'class{c}_w{w:g}_{i:03}.png')
        print(f'pngs: {folder}/class<c>_w<w>_<i>.png ({len(classes) * len(ws) * args.n} files)')
    return 0


if __name__ == '__main__':
    sys.exit(main())
