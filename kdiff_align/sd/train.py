"""Fine-tunes Stable Diffusion with the aligned CFG objective: `python -m kdiff_align.sd.train --config CONFIG`.

The UNet becomes a k-diffusion DDPM denoiser (eps or v, model.py) inside AlignedDenoiser, whose loss runs
the conditional rows and their null-condition twins (the empty-prompt embedding) in one batched UNet call
(docs/design.md section 1). Each step draws DDPM timesteps t uniformly from the training schedule, sigma =
sigmas[t], latents from the cached VAE posterior and the cached caption embeddings (data.py): after the
first run's caching pass the VAE and text encoder are not used. LoRA via peft (model.lora) or a full
fine-tune (model.lora = null). The loop is kdiff_align.training.engine's, as for every run: accelerate (mixed precision,
multi-GPU), gradient accumulation, EMA, atomic checkpoints that resume exactly (a LoRA run's hold the adapter
only), SIGINT / SIGTERM.

Outputs in <out-dir>/<name>/: config.json, args.json, metrics.csv, checkpoints/ + latest.json (resumable),
and the export: <name>_lora.safetensors (diffusers' load_lora_weights format) plus
<name>_lora_kohya.safetensors (lora_unet_* keys, the format ComfyUI's LoraLoader and A1111 read), or
unet/ (a full UNet in diffusers' layout). Exports carry kdiff_align sampling metadata (paper's w and the
hosts' cfg scale s = 1 + w).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..training import engine
from ..core import registry
from ..training import cli as train_cli
from ..storage.checkpoint import atomic_write
from ..config import ConfigError, align_section, make_denoiser_wrapper
from ..training.engine import option
from ..errors import CheckpointError, TrainingError  # noqa: F401 (re-exported)
from ..training.teachers import make_objective_teacher


def _default(name: str, value: Any) -> Any:
    """A RunOptions field with another default (its help and range kept)."""
    f = engine.RunOptions.__dataclass_fields__[name]
    return dataclasses.field(default=value, metadata=f.metadata)


@dataclasses.dataclass
class SDTrainOptions(train_cli.TrainerOptions):
    """The run's options; the names match kdiff_align.training.trainer's CLI flags."""

    name: str = _default('name', 'sd')
    batch_size: int = _default('batch_size', 4)
    grad_clip: float = _default('grad_clip', 1.0)
    save_every: int = _default('save_every', 1000)
    end_step: int | None = _default('end_step', 1000)
    cache_batch_size: int = option(8, 'images per VAE call when caching', lo=1)


# The one training CLI (kdiff_align.training.cli) runs this trainer for Stable Diffusion configs.
OPTIONS = SDTrainOptions
LABEL = 'Stable Diffusion fine-tuning'
NOT_HERE = '; sample with python -m kdiff_align.sd.sample'
STOP_MESSAGE = 'finishing this step, then saving a checkpoint and the export'


@dataclasses.dataclass
class SDTrainResult:
    """Where a run's outputs are, how it ended, and the trained UNet (EMA weights not swapped in)."""

    run_dir: Path
    step: int
    loss: float | None
    losses: list[float]
    checkpoint: Path | None
    lora: Path | None
    lora_kohya: Path | None
    unet_dir: Path | None
    cache: Path
    cache_built: bool
    unet: Any = None
    seconds: float = 0.0
    interrupted: bool = False
    is_main: bool = True        # False on the other processes of a distributed run


DTYPES = {'no': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


@dataclasses.dataclass
class LatentLoss:
    """Per-sample aligned losses of a batch of cached rows: DDPM timesteps t drawn uniformly, sigma = sigmas[t],
    latents drawn from the cached VAE posterior (the global RNG, which checkpoints restore)."""

    model: torch.nn.Module              # the AlignedDenoiser around the DDPM-wrapped UNet
    cache: Any                          # data.LatentCache
    sigmas: torch.Tensor                # the DDPM schedule's noise levels, one per timestep
    device: torch.device

    def __call__(self, batch: tuple[int, torch.Tensor]) -> torch.Tensor:
        from .model import COND_KEY

        _, rows = batch
        latents, cond = self.cache.batch(rows, None, self.device)
        t = torch.randint(0, self.sigmas.shape[0], (latents.shape[0],)).to(self.device)
        noise = torch.randn(latents.shape).to(self.device)
        return self.model.loss(latents, noise, self.sigmas[t], **{COND_KEY: cond})


def add_lora(unet: torch.nn.Module, lora: Mapping[str, Any], weight_dtype: torch.dtype) -> None:
    """Freezes the UNet (in weight_dtype) and adds a peft LoRA adapter whose parameters stay float32."""
    from peft import LoraConfig

    unet.requires_grad_(False)
    unet.to(weight_dtype)
    names = {n.rsplit('.', 1)[-1] for n, _ in unet.named_modules()} | {n for n, _ in unet.named_modules()}
    missing = [t for t in lora['target_modules'] if t not in names and not any(
        n.endswith('.' + t) for n, _ in unet.named_modules())]
    if missing:
        raise ConfigError(f'config key \'model.lora.target_modules\': {missing} match no module of the UNet; '
                          'SD attention projections are to_q, to_k, to_v, to_out.0 (also proj_in, proj_out, ff.net.2)')
    unet.add_adapter(LoraConfig(r=lora['rank'], lora_alpha=lora['alpha'], lora_dropout=lora['dropout'],
                                init_lora_weights='gaussian', target_modules=list(lora['target_modules'])))
    for p in unet.parameters():
        if p.requires_grad:
            p.data = p.data.float()


def lora_state_dict(unet: torch.nn.Module, lora: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """The adapter in peft's key format with alpha / r folded into lora_B, so every loader's scale is 1."""
    from peft.utils import get_peft_model_state_dict

    scale = lora['alpha'] / lora['rank']
    state = get_peft_model_state_dict(unet)
    return {k: (v * scale if '.lora_B.' in k else v).detach().to('cpu', torch.float32).contiguous()
            for k, v in state.items()}


def export_lora(unet: torch.nn.Module, config: Mapping[str, Any], path: Path) -> tuple[Path, Path]:
    """Writes the LoRA for diffusers' load_lora_weights and, next to it, in kohya's format (ComfyUI, A1111)."""
    from diffusers.utils import convert_state_dict_to_diffusers, convert_state_dict_to_kohya
    from safetensors.torch import save_file

    from ..storage.metadata import export_metadata

    lora = config['model']['lora']
    peft_state = lora_state_dict(unet, lora)
    meta = {**export_metadata(config), 'kdiff_align.base_model': Path(config['model']['pretrained']).name,
            'kdiff_align.prediction': config['model']['prediction'],
            'kdiff_align.resolution': str(config['model']['resolution'])}
    diffusers_state = {f'unet.{k}': v for k, v in convert_state_dict_to_diffusers(peft_state).items()}
    atomic_write(path, lambda tmp: save_file(diffusers_state, tmp, metadata=meta))
    kohya = convert_state_dict_to_kohya({f'unet.{k}': v for k, v in peft_state.items()})
    kohya = {k: v.float().contiguous() for k, v in kohya.items()}   # alpha as a float scalar, like kohya's
    kohya_path = path.with_name(path.stem + '_kohya.safetensors')
    kohya_meta = {**meta, 'ss_network_module': 'networks.lora', 'ss_network_dim': str(lora['rank']),
                  'ss_network_alpha': str(lora['rank'])}
    atomic_write(kohya_path, lambda tmp: save_file(kohya, tmp, metadata=kohya_meta))
    return path, kohya_path


def export_unet(unet: torch.nn.Module, config: Mapping[str, Any], folder: Path) -> Path:
    """Writes a fully fine-tuned UNet in diffusers' layout, plus kdiff_align.json with the sampling metadata."""
    from ..storage.metadata import guidance_metadata

    unet.save_pretrained(str(folder), safe_serialization=True)
    meta = {**guidance_metadata(config), 'prediction': config['model']['prediction'],
            'base_model': str(config['model']['pretrained']), 'resolution': config['model']['resolution']}
    (folder / 'kdiff_align.json').write_text(json.dumps(meta, indent=2) + '\n')
    return folder


def export_run(unet: torch.nn.Module, config: Mapping[str, Any], run_dir: Path, name: str, step: int
               ) -> tuple[Path | None, Path | None, Path | None]:
    """(LoRA, its kohya twin, None) or (None, None, unet/) of the (EMA-swapped) UNet."""
    if config['model']['lora'] is not None:
        return (*export_lora(unet, config, run_dir / f'{name}_lora.safetensors'), None)
    return None, None, export_unet(unet, config, run_dir / 'unet')


def train(config: str | Path | Mapping[str, Any] | None, options: SDTrainOptions | None = None, *,
          should_stop: Callable[[], bool] | None = None) -> SDTrainResult:
    """Runs (or resumes) a fine-tuning run; every input is validated before a model is loaded. A run that fails
    before it writes anything leaves no run folder behind."""
    options = dataclasses.replace(options or SDTrainOptions())
    with engine.removed_if_empty_on_error(Path(options.out_dir) / options.name):
        return _train(config, options, should_stop)


def _train(config: str | Path | Mapping[str, Any] | None, options: SDTrainOptions,
           should_stop: Callable[[], bool] | None) -> SDTrainResult:
    from ..config.sd import find_captioned_images, resolve_model
    from .data import batch_indices, build_cache, cache_path, fingerprint
    from .model import add_guidance_embedding, load_components, make_denoiser, null_condition

    begin = engine.start(config, options,
                         resolve=lambda c: resolve_model(train_cli.resolve(c, options)),   # weights, prediction, size
                         accelerator_options=lambda c: {'mixed_precision': c['model']['mixed_precision']})
    run_dir, ckpt, config, accelerator = begin.run_dir, begin.ckpt, begin.config, begin.accelerator
    model_cfg = config['model']
    items = find_captioned_images(config['dataset']['location'], config['dataset']['caption_ext'])
    device, rank, world = begin.device, begin.rank, begin.world
    engine.seed_everything(options.seed, rank)

    # Components and the caching pass (VAE posterior + caption embeddings, once per dataset).
    components = load_components(model_cfg)
    cache_dir = Path(config['dataset']['cache_dir'] or run_dir / 'cache')
    cache_file = cache_path(cache_dir, fingerprint(items, model_cfg))
    built = False
    if accelerator.is_main_process:
        cache, built = build_cache(items, components, model_cfg, cache_dir, device=device,
                                   batch_size=options.cache_batch_size, progress=options.progress)
    accelerator.wait_for_everyone()
    if not accelerator.is_main_process:
        cache, _ = build_cache(items, components, model_cfg, cache_dir, device=device)
    uncond = {k: v.float().cpu() for k, v in null_condition(components.tokenizer, components.text_encoder,
                                                              device).items()}
    components.vae = components.text_encoder = None   # not needed again in this run
    if device.type == 'cuda':
        torch.cuda.empty_cache()

    # The trainable UNet: LoRA on a frozen base (stored in the mixed-precision dtype), or all weights.
    unet = components.unet
    # distill's teacher: the frozen pretrained UNet, copied before the student gets its guidance embedding.
    spec = registry.of(config)
    base = copy.deepcopy(unet).requires_grad_(False).eval() if spec.teacher == 'frozen' else None
    if spec.tells_w and unet.config.get('time_cond_proj_dim') is None:
        unet = add_guidance_embedding(unet)   # diffusers' time_cond_proj_dim, zero-initialised
    if model_cfg['lora'] is not None:
        add_lora(unet, model_cfg['lora'], DTYPES[model_cfg['mixed_precision']])
    else:
        unet.requires_grad_(True)
    if model_cfg['gradient_checkpointing']:
        unet.enable_gradient_checkpointing()
    unet.train()
    run = engine.Engine(accelerator, unet, config, run_dir, args=dataclasses.asdict(options), ckpt=ckpt,
                        save_frozen=model_cfg['lora'] is None,   # a LoRA checkpoint holds the adapter only
                        per_epoch=len(cache) // (options.batch_size * world))
    wrap = partial(make_denoiser, alphas_cumprod=components.alphas_cumprod, prediction=components.prediction)
    denoiser = wrap(run.model).to(device)
    teacher = wrap(base).to(device) if base is not None else make_objective_teacher(config, run.ema, device, wrap=wrap)
    objective = make_denoiser_wrapper(config, uncond=uncond, teacher=teacher,
                                      steps_done=partial(getattr, run, 'step'))
    loss = LatentLoss(objective(denoiser), cache, denoiser.sigmas, device)
    batches = batch_indices(len(cache), options.batch_size, seed=options.seed, start_step=run.batches_seen,
                            rank=rank, world_size=world)
    train_cli.print_run_header(accelerator, run_dir, align_section(config), seed=options.seed, ckpt=ckpt,
                               step=run.step, parameters=sum(p.numel() for p in unet.parameters() if p.requires_grad),
                               items=f'{len(cache):,} captioned images', what='the export recommends')
    result = run.run(options, batches, loss, should_stop=should_stop,
                     export=partial(export_run, run.unwrapped, config, run_dir, options.name))
    lora, kohya = run_dir / f'{options.name}_lora.safetensors', run_dir / f'{options.name}_lora_kohya.safetensors'
    full = model_cfg['lora'] is None
    return SDTrainResult(run_dir=run_dir, step=result.step, loss=result.loss, losses=result.losses,
                         checkpoint=result.checkpoint, lora=None if full or not lora.exists() else lora,
                         lora_kohya=None if full or not kohya.exists() else kohya,
                         unet_dir=run_dir / 'unet' if full and (run_dir / 'unet').exists() else None,
                         cache=cache_file, cache_built=built, unet=run.unwrapped, seconds=result.seconds,
                         interrupted=result.interrupted, is_main=result.is_main)


def describe(result: SDTrainResult, options: SDTrainOptions) -> str:
    """The CLI's closing line."""
    exported = result.lora or result.unet_dir
    return (f'Done: step {result.step}, {engine.loss_text(result.loss, result.step, options.end_step)}, '
            f'{result.seconds:.0f} s. Export: {exported}'
            + (f' (kohya format for ComfyUI/A1111: {result.lora_kohya})' if result.lora_kohya else '')
            + f'; checkpoint: {result.checkpoint}; metrics: {result.run_dir / "metrics.csv"}')


def main(argv: Sequence[str] | None = None) -> int:
    """python -m kdiff_align.sd.train: the one training CLI (kdiff_align.training.cli.main), the same flags as
    python -m kdiff_align.train; returns 0, 2 for bad input, 1 for a failed run."""
    return train_cli.main(argv, 'python -m kdiff_align.sd.train')


if __name__ == '__main__':
    sys.exit(main())
