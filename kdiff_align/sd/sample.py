"""Stable Diffusion text-to-image with any k-diffusion sampler: `python -m kdiff_align.sd.sample`.

The UNet (with a LoRA or a fine-tuned UNet from kdiff_align.sd.train, or neither) runs as a k-diffusion
DDPM denoiser inside GuidedDenoiser, with uncond = {'cond': empty (or negative) prompt embedding}: both
branches in one batched UNet call per step. --w is the paper's guidance weight (cfg scale s = 1 + w, the
number diffusers, ComfyUI and A1111 call guidance_scale / cfg); the default is the export's recommended
w_sample from its kdiff_align metadata.

    python -m kdiff_align.sd.sample --run runs/sd --prompt "a photo of a cat" --n 4 --out cats.png
    python -m kdiff_align.sd.sample --pretrained models/sd15 --lora runs/sd/sd_lora.safetensors \\
        --prompt "a photo of a cat" --w 2 --sampler dpmpp_2m --steps 25
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core import registry
from ..config import SAMPLERS, ConfigError, get_sampler
from ..core.guidance import cfg_scale_to_w, check_w, guided_denoiser, w_to_cfg_scale

SCHEDULES = ('karras', 'discrete')


def load_lora(unet: torch.nn.Module, lora: str | Path | Mapping[str, torch.Tensor]) -> None:
    """Loads a LoRA (a file or its weights; diffusers, peft or kohya keys) into the UNet, as diffusers'
    load_lora_weights does."""
    from diffusers import StableDiffusionPipeline

    from ..storage.checkpoint import load_for_inference

    weights = lora if isinstance(lora, Mapping) else load_for_inference(lora, need_config=False)[1]
    state_dict, network_alphas = StableDiffusionPipeline.lora_state_dict(dict(weights))
    StableDiffusionPipeline.load_lora_into_unet(state_dict, network_alphas=network_alphas, unet=unet)


def sigmas_for(denoiser: torch.nn.Module, steps: int, schedule: str = 'karras',
               device: torch.device | str = 'cpu') -> torch.Tensor:
    """The sampler's noise levels: Karras et al.'s rho = 7 spacing, or the DDPM schedule's own (discrete)."""
    from k_diffusion import sampling

    if schedule == 'karras':
        return sampling.get_sigmas_karras(steps, denoiser.sigma_min.item(), denoiser.sigma_max.item(),
                                          device=device)
    if schedule == 'discrete':
        return denoiser.get_sigmas(steps).to(device)
    raise ConfigError(f'schedule must be one of {SCHEDULES}, got {schedule!r}')


@torch.no_grad()
def generate(components: Any, prompts: Sequence[str], *, w: float, sampler: str = 'dpmpp_2m', steps: int = 25,
             schedule: str = 'karras', resolution: int = 512, seed: int = 0, negative_prompt: str = '',
             sigma_interval: Sequence[float] | None = None, device: torch.device | str = 'cpu',
             objective: str = 'aligned', w_range: Sequence[float] | None = None) -> torch.Tensor:
    """Images [B, 3, H, W] in [0, 1] for prompts, guided with the paper's w (cfg scale 1 + w): two-pass CFG, or
    one UNet evaluation per step for a one-pass objective (guidance.guided_denoiser; w_range: its trained w)."""
    from .model import COND_KEY, encode_prompts, make_denoiser

    unet, vae, text_encoder = (m.to(device).eval() for m in (components.unet, components.vae,
                                                              components.text_encoder))
    factor = components.vae_scale_factor
    if resolution % factor:
        raise ConfigError(f'resolution {resolution} is not a multiple of the VAE factor {factor}')
    denoiser = make_denoiser(unet, components.alphas_cumprod, components.prediction).to(device)
    cond = encode_prompts(components.tokenizer, text_encoder, prompts, device).float()
    uncond = {COND_KEY: encode_prompts(components.tokenizer, text_encoder, [negative_prompt], device).float()}
    guided = guided_denoiser(denoiser, objective, w, w_range=w_range, uncond=uncond,
                             sigma_interval=sigma_interval)
    sigmas = sigmas_for(denoiser, steps, schedule, device)
    gen = torch.Generator().manual_seed(seed)
    shape = (len(prompts), unet.config.in_channels, resolution // factor, resolution // factor)
    x = torch.randn(shape, generator=gen).to(device) * sigmas[0]
    latents = get_sampler(sampler)(guided, x, sigmas, extra_args={COND_KEY: cond}, disable=True)
    images = vae.decode((latents / components.latent_scale).to(next(vae.parameters()).dtype)).sample
    return (images.float() / 2 + 0.5).clamp(0, 1).cpu()


def _read_run(run: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model section, align section) of a kdiff_align.sd.train run folder, with its export."""
    config_path = run / 'config.json'
    if not config_path.is_file():
        raise ConfigError(f'--run {str(run)!r} has no config.json; pass a kdiff_align.sd.train run folder')
    config = json.loads(config_path.read_text())
    return config['model'], config['align']


def objective_of(align: Mapping[str, Any], meta: Mapping[str, Any] | None
                 ) -> tuple[str, list[float] | None, float | None]:
    """(objective, trained w range, recommended w) from a run's align section, else the export's metadata."""
    from ..config import w_range

    if 'objective' in align:
        spec = registry.of(align)
        if not spec.one_pass:
            return spec.name, None, align.get('w_sample')
        lo, hi = w_range({'align': align})
        return spec.name, [lo, hi], hi if spec.sampling == 'trained-w' else align.get('w_sample')
    meta = meta or {}   # read_metadata gives the registered name (older exports' names included)
    return registry.get(meta.get('objective', registry.names()[0])).name, meta.get('w_range'), meta.get('w_sample')


def _export_of(run: Path) -> dict[str, str]:
    loras = sorted(p for p in run.glob('*_lora.safetensors'))
    if loras:
        return {'lora': str(loras[0])}
    if (run / 'unet' / 'config.json').is_file():
        return {'unet': str(run / 'unet')}
    raise ConfigError(f'--run {str(run)!r} has no export (*_lora.safetensors or unet/); has training finished?')


def _parse(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog='python -m kdiff_align.sd.sample', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--run', help='a kdiff_align.sd.train run folder: base weights, export and defaults from it')
    p.add_argument('--pretrained', help='the base model: a local diffusers folder or a single-file checkpoint')
    p.add_argument('--pretrained-config', help='single-file only: a diffusers folder with the component configs')
    p.add_argument('--lora', help='a LoRA .safetensors (diffusers or kohya keys)')
    p.add_argument('--unet', help='a fully fine-tuned UNet folder (diffusers layout)')
    p.add_argument('--prompt', required=True, nargs='+', help='one or more prompts')
    p.add_argument('--negative-prompt', default='', help='the unconditional branch\'s prompt (default: empty)')
    g = p.add_mutually_exclusive_group()
    g.add_argument('--w', type=float, help="the paper's guidance weight w (default: the export's w_sample)")
    g.add_argument('--cfg-scale', type=float, help='the hosts\' CFG scale s = 1 + w (diffusers guidance_scale)')
    p.add_argument('--sampler', choices=SAMPLERS, help='a k-diffusion sampler (default: align.sampler or dpmpp_2m)')
    p.add_argument('--steps', type=int, help='sampler steps (default: align.sample_steps or 25)')
    p.add_argument('--schedule', choices=SCHEDULES, default='karras', help='the noise-level spacing')
    p.add_argument('--resolution', type=int, help='image side in pixels (default: the training resolution or 512)')
    p.add_argument('--prediction', choices=('epsilon', 'v_prediction'), help='default: the scheduler config\'s')
    p.add_argument('--n', type=int, default=1, help='images per prompt')
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--out', default='sd_samples.png', help='the output PNG (a grid when more than one image)')
    p.add_argument('--device', default='cuda' if torch.cuda.is_available() else 'cpu')
    p.add_argument('--dtype', choices=('float32', 'float16', 'bfloat16'), default=None,
                   help='weights dtype (default: float16 on CUDA, else float32)')
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI entry point; returns 0, or 2 for bad input."""
    from ..env import cli_defaults
    cli_defaults()  # before k-diffusion is imported
    args = _parse(argv)
    from ..storage.checkpoint import CheckpointError, load_for_inference
    from ..sampling.grid import w_title
    from ..storage.metadata import MetadataError, read_metadata
    from ..config.sd import check_model
    from .model import load_components

    try:
        model: dict[str, Any] = {'pretrained': args.pretrained, 'pretrained_config': args.pretrained_config,
                                 'prediction': args.prediction, 'resolution': args.resolution}
        align: Mapping[str, Any] = {}
        export = {k: v for k, v in (('lora', args.lora), ('unet', args.unet)) if v}
        if args.run:
            run_model, align = _read_run(Path(args.run))
            model = {**run_model, **{k: v for k, v in model.items() if v is not None}}
            export = export or _export_of(Path(args.run))
        if not model.get('pretrained'):
            raise ConfigError('pass --pretrained (a diffusers folder or checkpoint) or --run (a training run)')
        model['resolution'] = model.get('resolution') or 512
        if model['resolution'] % 8 or model['resolution'] < 8:
            raise ConfigError(f'--resolution must be a positive multiple of 8, got {model["resolution"]}')
        model = check_model(model)
        for key in ('lora', 'unet'):
            if key in export and not Path(export[key]).exists():
                raise ConfigError(f'--{key} {export[key]!r} does not exist')
        lora = meta = None
        if 'lora' in export:
            if Path(export['lora']).is_dir() or Path(export['lora']).suffix != '.safetensors':
                raise ConfigError(f'--lora {export["lora"]!r} is not a .safetensors file; pass a LoRA .safetensors '
                                  '(diffusers, peft or kohya keys), or a fully fine-tuned UNet folder to --unet')
            lora = load_for_inference(export['lora'], need_config=False)[1]   # a CheckpointError names the file
            meta = read_metadata(export['lora'])
        if 'unet' in export and (Path(export['unet']) / 'kdiff_align.json').is_file():
            meta = json.loads((Path(export['unet']) / 'kdiff_align.json').read_text())
        if args.cfg_scale is not None:
            w = cfg_scale_to_w(args.cfg_scale)
        elif args.w is not None:
            w = args.w
        objective, trained_w, recommended = objective_of(align, meta)
        if args.cfg_scale is None and args.w is None:
            w = recommended if recommended is not None else (meta or {}).get('w_sample', align.get('w_train', 4.0))
            w = 4.0 if not isinstance(w, (int, float)) else float(w)   # SD's usual cfg scale 5 when unknown
        if not math.isfinite(w) or w < 0:
            raise ConfigError(f"guidance: got w = {w} (cfg scale {w_to_cfg_scale(w)}); allowed: w >= 0")
        try:   # a one-pass model refuses a w outside its trained range before any model loads
            check_w(objective, w, trained_w)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        sigma_interval = (meta or {}).get('sigma_interval', align.get('sigma_interval'))
        steps = args.steps or align.get('sample_steps') or 25
        sampler = args.sampler or align.get('sampler') or 'dpmpp_2m'
        if steps < 1 or args.n < 1:
            raise ConfigError(f'--steps and --n must be >= 1, got {steps} and {args.n}')
    except (ConfigError, CheckpointError, MetadataError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype) if args.dtype else (
        torch.float16 if str(args.device).startswith('cuda') else torch.float32)
    try:
        components = load_components(model, unet_path=export.get('unet'), dtype=dtype)
    except CheckpointError as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    if lora is not None:
        load_lora(components.unet, lora)
    prompts = [p for p in args.prompt for _ in range(args.n)]
    images = generate(components, prompts, w=w, sampler=sampler, steps=steps, schedule=args.schedule,
                      resolution=model['resolution'], seed=args.seed, negative_prompt=args.negative_prompt,
                      sigma_interval=sigma_interval, device=args.device, objective=objective, w_range=trained_w)
    save_images(images, args.out, nrow=args.n, row_labels=args.prompt,
                title=f'{sampler}, {steps} steps, {w_title(w)}; one row per prompt')
    print(f'{args.out}: {len(prompts)} image(s), {sampler}, {steps} steps, w = {w:g} '
          f'(paper\'s; cfg scale {w_to_cfg_scale(w):g})')
    return 0


def save_images(images: torch.Tensor, path: str | Path, nrow: int = 1, *, row_labels: Sequence[str] | None = None,
                title: str | None = None) -> None:
    """Saves [B, 3, H, W] images in [0, 1] as one labelled PNG grid (nrow images per row, e.g. one row per prompt)."""
    from ..sampling.grid import image_grid, shorten

    b = images.shape[0]
    cols = max(1, min(nrow, b))
    rows = math.ceil(b / cols)
    blank = images.new_ones(rows * cols - b, *images.shape[1:])   # white fills the last row
    labels = [shorten(s) for s in row_labels] if row_labels else None
    grid = image_grid(torch.cat([images, blank]).float() * 2 - 1, rows, cols, row_labels=labels, title=title)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)


if __name__ == '__main__':
    sys.exit(main())
