"""Fine-tunes Stable Diffusion with the aligned CFG objective: `python -m kdiff_align.sd.train --config CONFIG`.

The UNet becomes a k-diffusion DDPM denoiser (eps or v, model.py) inside AlignedDenoiser, whose loss runs
the conditional rows and their null-condition twins (the empty-prompt embedding) in one batched UNet call
(docs/design.md section 1). Each step draws DDPM timesteps t uniformly from the training schedule, sigma =
sigmas[t], latents from the cached VAE posterior and the cached caption embeddings (data.py): after the
first run's caching pass the VAE and text encoder are not used. LoRA via peft (model.lora) or a full
fine-tune (model.lora = null); accelerate for mixed precision, gradient accumulation and multi-GPU.

Outputs in <out-dir>/<name>/: config.json, args.json, metrics.csv, checkpoints/ + latest.json (resumable),
and the export: <name>_lora.safetensors (diffusers' load_lora_weights format) plus
<name>_lora_kohya.safetensors (lora_unet_* keys, the format ComfyUI's LoraLoader and A1111 read), or
unet/ (a full UNet in diffusers' layout). Exports carry kdiff_align sampling metadata (paper's w and the
hosts' cfg scale s = 1 + w).
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import CheckpointError, resolve_checkpoint
from ..config import ConfigError
from ..schedulers import make_optimizer
from ..train import TrainingError  # one error type for both training paths


@dataclasses.dataclass
class SDTrainOptions:
    """The run's options; the names match kdiff_align.train's CLI flags."""

    name: str = 'sd'                    # run name: outputs go to <out_dir>/<name>/
    out_dir: str = 'runs'               # parent folder of run folders
    batch_size: int = 4                 # per process, per micro-batch
    grad_accum_steps: int = 1           # micro-batches per optimizer step
    lr: float | None = None             # overrides optimizer.lr
    mixed_precision: str | None = None  # 'no' | 'fp16' | 'bf16'; overrides model.mixed_precision
    grad_clip: float = 1.0              # max global grad norm; 0: no clipping
    save_every: int = 1000              # checkpoint + export every this many steps (and at the end)
    end_step: int | None = 1000         # stop after this many optimizer steps (None: until interrupted)
    resume: str | None = None           # a checkpoint, or a run folder (its latest.json)
    seed: int | None = None             # None: a random seed, recorded in the checkpoint
    log_every: int = 25                 # metrics.csv row every this many steps
    w_train: float | None = None        # overrides align.w_train (paper's w)
    w_sample: float | None = None       # overrides align.w_sample (paper's w; cfg scale = 1 + w)
    cache_batch_size: int = 8           # images per VAE call in the caching pass
    progress: bool = True               # tqdm progress bars


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


METRICS_COLUMNS = ('step', 'epoch', 'loss', 'lr', 'ema_decay', 'grad_norm', 'it_per_s', 'elapsed_s')
DTYPES = {'no': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}


def resolve_config(config: str | Path | Mapping[str, Any], options: SDTrainOptions) -> dict[str, Any]:
    """The loaded config with the CLI overrides applied and validated."""
    from .config import load_config

    raw = copy.deepcopy(load_config(config))
    if options.lr is not None:
        raw['optimizer']['lr'] = options.lr
    if options.mixed_precision is not None:
        raw['model']['mixed_precision'] = options.mixed_precision
    if options.w_train is not None:
        raw['align']['w_train'] = options.w_train
    if options.w_sample is not None:
        raw['align']['w_sample'] = options.w_sample
    return load_config(raw)


def _check_options(options: SDTrainOptions) -> None:
    for key in ('batch_size', 'grad_accum_steps', 'log_every', 'cache_batch_size'):
        value = getattr(options, key)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f'option {key!r}: got {value!r}; allowed: an integer >= 1')
    if options.end_step is not None and options.end_step < 0:
        raise ConfigError(f'option \'end_step\': got {options.end_step}; allowed: an integer >= 0 or None')
    if options.save_every < 0 or options.grad_clip < 0:
        raise ConfigError(f'options save_every and grad_clip must be >= 0, got {options.save_every}, '
                          f'{options.grad_clip}')


class EMA:
    """An exponential moving average of the trainable parameters (k-diffusion's EMAWarmup schedule)."""

    def __init__(self, params: Mapping[str, torch.nn.Parameter], sched: Mapping[str, Any]):
        from k_diffusion.utils import EMAWarmup

        self.params = dict(params)
        self.shadow = {k: p.detach().clone().float() for k, p in self.params.items()}
        self.sched = EMAWarmup(power=sched['power'], max_value=sched['max_value'])

    @torch.no_grad()
    def update(self) -> float:
        decay = self.sched.get_value()
        for k, p in self.params.items():
            self.shadow[k].lerp_(p.detach().float(), 1 - decay)
        self.sched.step()
        return decay

    @contextmanager
    def swapped_in(self):
        """Temporarily puts the averaged values into the parameters."""
        backup = {k: p.detach().clone() for k, p in self.params.items()}
        with torch.no_grad():
            for k, p in self.params.items():
                p.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, p in self.params.items():
                    p.copy_(backup[k])

    def state_dict(self) -> dict[str, Any]:
        return {'shadow': self.shadow, 'sched': self.sched.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        for k, v in state['shadow'].items():
            self.shadow[k].copy_(v)
        self.sched.load_state_dict(state['sched'])


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

    from ..metadata import export_metadata

    lora = config['model']['lora']
    peft_state = lora_state_dict(unet, lora)
    meta = {**export_metadata(config), 'kdiff_align.base_model': Path(config['model']['pretrained']).name,
            'kdiff_align.prediction': config['model']['prediction'],
            'kdiff_align.resolution': str(config['model']['resolution'])}
    diffusers_state = {f'unet.{k}': v for k, v in convert_state_dict_to_diffusers(peft_state).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(diffusers_state, str(path), metadata=meta)
    kohya = convert_state_dict_to_kohya({f'unet.{k}': v for k, v in peft_state.items()})
    kohya = {k: v.float().contiguous() for k, v in kohya.items()}   # alpha as a float scalar, like kohya's
    kohya_path = path.with_name(path.stem + '_kohya.safetensors')
    save_file(kohya, str(kohya_path), metadata={**meta, 'ss_network_module': 'networks.lora',
                                                'ss_network_dim': str(lora['rank']),
                                                'ss_network_alpha': str(lora['rank'])})
    return path, kohya_path


def export_unet(unet: torch.nn.Module, config: Mapping[str, Any], folder: Path) -> Path:
    """Writes a fully fine-tuned UNet in diffusers' layout, plus kdiff_align.json with the sampling metadata."""
    from ..metadata import guidance_metadata

    unet.save_pretrained(str(folder), safe_serialization=True)
    meta = {**guidance_metadata(config), 'prediction': config['model']['prediction'],
            'base_model': str(config['model']['pretrained']), 'resolution': config['model']['resolution']}
    (folder / 'kdiff_align.json').write_text(json.dumps(meta, indent=2) + '\n')
    return folder


def train(config: str | Path | Mapping[str, Any], options: SDTrainOptions | None = None, *,
          should_stop: Callable[[], bool] | None = None) -> SDTrainResult:
    """Runs (or resumes) a fine-tuning run; every input is validated before a model is loaded."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    from ..config import align_section
    from ..objective import AlignedDenoiser
    from .config import check_inputs
    from .data import batch_indices, build_cache, cache_path, fingerprint
    from .model import COND_KEY, load_components, make_denoiser, null_condition

    options = options or SDTrainOptions()
    _check_options(options)
    resume_path = resolve_checkpoint(options.resume) if options.resume else None
    resume_state = torch.load(resume_path, map_location='cpu', weights_only=False) if resume_path else None
    if config is None:
        if resume_state is None:
            raise ConfigError('pass a config (--config) or a checkpoint to resume (--resume)')
        config = resume_state['config']
    config = resolve_config(config, options)
    config, items = check_inputs(config)   # weights path, prediction type, resolution, captions
    model_cfg, align = config['model'], align_section(config)

    mixed_precision = model_cfg['mixed_precision']
    accelerator = Accelerator(mixed_precision=mixed_precision, gradient_accumulation_steps=options.grad_accum_steps)
    device = accelerator.device
    seed = options.seed if options.seed is not None else (
        resume_state['seed'] if resume_state else int(torch.randint(0, 2 ** 31 - 1, ()).item()))
    set_seed(seed + accelerator.process_index)
    run_dir = Path(options.out_dir) / options.name
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
        (run_dir / 'args.json').write_text(json.dumps({**dataclasses.asdict(options), 'seed': seed}, indent=2) + '\n')

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
    if model_cfg['lora'] is not None:
        add_lora(unet, model_cfg['lora'], DTYPES[mixed_precision])
    else:
        unet.requires_grad_(True)
    if model_cfg['gradient_checkpointing']:
        unet.enable_gradient_checkpointing()
    unet.train()
    trainable = {n: p for n, p in unet.named_parameters() if p.requires_grad}
    opt = make_optimizer(list(trainable.values()), config['optimizer'], config['optimizer']['lr'])
    warmup = config['lr_sched']['warmup']
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - warmup ** (s + 1))
    ema = EMA(trainable, config['ema_sched']) if config['ema_sched'] is not None else None
    unet_prepared, opt, sched = accelerator.prepare(unet, opt, sched)
    denoiser = make_denoiser(unet_prepared, components.alphas_cumprod, components.prediction).to(device)
    model = AlignedDenoiser(denoiser, weighting=model_cfg['loss_weighting'], guidance_scale=align['w_train'],
                            uncond=uncond, uncond_prob=align['uncond_prob'],
                            stop_grad_uncond=align['stop_grad_uncond'], mix=align['mix'])
    num_timesteps = components.alphas_cumprod.shape[0]

    step = 0
    if resume_state is not None:
        with torch.no_grad():
            for k, v in resume_state['trainable'].items():
                trainable[k].copy_(v)
        opt.load_state_dict(resume_state['opt'])
        sched.load_state_dict(resume_state['sched'])
        if ema is not None and resume_state.get('ema') is not None:
            ema.load_state_dict(resume_state['ema'])
        step = resume_state['step']

    def save() -> Path | None:
        if not accelerator.is_main_process:
            return None
        ckpt_dir = run_dir / 'checkpoints'
        ckpt_dir.mkdir(exist_ok=True)
        path = ckpt_dir / f'step_{step:08}.pt'
        torch.save({'config': config, 'step': step, 'seed': seed, 'opt': opt.state_dict(),
                    'sched': sched.state_dict(), 'ema': ema.state_dict() if ema else None,
                    'trainable': {k: v.detach().cpu() for k, v in trainable.items()}}, path)
        (run_dir / 'latest.json').write_text(json.dumps({'latest_checkpoint': str(path.relative_to(run_dir))}))
        return path

    def export() -> tuple[Path | None, Path | None, Path | None]:
        if not accelerator.is_main_process:
            return None, None, None
        base = accelerator.unwrap_model(unet_prepared)
        with ema.swapped_in() if ema else nullcontext():
            if model_cfg['lora'] is not None:
                lora, kohya = export_lora(base, config, run_dir / f'{options.name}_lora.safetensors')
                return lora, kohya, None
            return None, None, export_unet(base, config, run_dir / 'unet')

    metrics_path = run_dir / 'metrics.csv'
    if accelerator.is_main_process and not (resume_state and metrics_path.exists()):
        with open(metrics_path, 'w', newline='') as f:
            csv.writer(f).writerow(METRICS_COLUMNS)
    gen = torch.Generator().manual_seed(seed * 7919 + step + accelerator.process_index)
    batches = batch_indices(len(cache), options.batch_size, seed=seed, start_step=step * options.grad_accum_steps,
                            rank=accelerator.process_index, world_size=accelerator.num_processes)
    losses, checkpoint, last_loss, grad_norm = [], None, None, float('nan')
    start, window_start, window_steps = time.time(), time.time(), 0
    bar = None
    if options.progress and accelerator.is_main_process and options.end_step:
        from tqdm.auto import tqdm
        bar = tqdm(total=options.end_step, initial=step, desc='training')
    lora, kohya, unet_dir = None, None, None
    epoch = 0
    while options.end_step is None or step < options.end_step:
        if should_stop is not None and should_stop():
            break
        epoch, rows = next(batches)
        with accelerator.accumulate(unet_prepared):
            latents, cond = cache.batch(rows, gen, device)
            t = torch.randint(0, num_timesteps, (latents.shape[0],), generator=gen).to(device)
            sigma = denoiser.sigmas[t]                      # DDPM timestep t -> k-diffusion noise level
            noise = torch.randn(latents.shape, generator=gen).to(device)
            loss = model.loss(latents, noise, sigma, **{COND_KEY: cond}).mean()
            if not torch.isfinite(loss):
                raise TrainingError(f'the loss is {loss.item()} at step {step}; lower the lr or use bf16 / no '
                                    'mixed precision')
            accelerator.backward(loss)
            if accelerator.sync_gradients and options.grad_clip > 0:
                grad_norm = float(accelerator.clip_grad_norm_(list(trainable.values()), options.grad_clip))
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
        if not accelerator.sync_gradients:
            continue
        step += 1
        window_steps += 1
        last_loss = accelerator.gather(loss.detach()[None]).mean().item()
        losses.append(last_loss)
        decay = ema.update() if ema else 0.0
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f'{last_loss:.4f}')
        if accelerator.is_main_process and (step % options.log_every == 0 or step == options.end_step):
            now = time.time()
            with open(metrics_path, 'a', newline='') as f:
                csv.writer(f).writerow([step, epoch, f'{last_loss:.6g}', f'{sched.get_last_lr()[0]:.6g}',
                                        f'{decay:.6g}', f'{grad_norm:.6g}',
                                        f'{window_steps / max(now - window_start, 1e-9):.4g}',
                                        f'{now - start:.1f}'])
            window_start, window_steps = now, 0
        if options.save_every and step % options.save_every == 0 and step != options.end_step:
            checkpoint = save()
            lora, kohya, unet_dir = export()
    if bar is not None:
        bar.close()
    checkpoint = save()
    lora, kohya, unet_dir = export()
    accelerator.wait_for_everyone()
    return SDTrainResult(run_dir=run_dir, step=step, loss=last_loss, losses=losses, checkpoint=checkpoint,
                         lora=lora, lora_kohya=kohya, unet_dir=unet_dir, cache=cache_file, cache_built=built,
                         unet=accelerator.unwrap_model(unet_prepared), seconds=time.time() - start)


UNUSED_TRAIN_FLAGS = ('--demo-every', '--sample-n', '--evaluate-every', '--evaluate-n', '--num-workers', '--compile',
                      '--wandb-project', '--wandb-entity', '--wandb-group')


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The CLI flags (the same names as python -m kdiff_align.train)."""
    d = SDTrainOptions()
    p = argparse.ArgumentParser(prog='python -m kdiff_align.sd.train', description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', help='a stable_diffusion config, e.g. configs/sd_aligned.json')
    p.add_argument('--name', default=d.name, help='the run name (its folder under --out-dir)')
    p.add_argument('--out-dir', default=d.out_dir, help='the parent folder of run folders')
    p.add_argument('--batch-size', type=int, default=d.batch_size, help='images per process per micro-batch')
    p.add_argument('--grad-accum-steps', type=int, default=d.grad_accum_steps, help='micro-batches per step')
    p.add_argument('--lr', type=float, help='the learning rate (overrides optimizer.lr)')
    p.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16'), help='overrides model.mixed_precision')
    p.add_argument('--grad-clip', type=float, default=d.grad_clip, help='max gradient norm (0: off)')
    p.add_argument('--save-every', type=int, default=d.save_every, help='checkpoint + export every N steps')
    p.add_argument('--end-step', type=int, default=d.end_step, help='stop after this many optimizer steps')
    p.add_argument('--resume', help='a checkpoint, or a run folder (its latest.json)')
    p.add_argument('--seed', type=int, help='the random seed (default: random, recorded)')
    p.add_argument('--log-every', type=int, default=d.log_every, help='a metrics.csv row every N steps')
    p.add_argument('--w-train', type=float, help="overrides align.w_train (the paper's w)")
    p.add_argument('--w-sample', type=float, help="overrides align.w_sample (the paper's w; cfg scale = 1 + w)")
    p.add_argument('--cache-batch-size', type=int, default=d.cache_batch_size, help='images per VAE call when caching')
    p.add_argument('--no-progress', action='store_true', help='no progress bars')
    # kdiff_align.train's flags that do not apply here: accepted (so its argv can be forwarded) and reported.
    for flag in UNUSED_TRAIN_FLAGS:
        p.add_argument(flag, nargs='?', const=True, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unused = [f for f in UNUSED_TRAIN_FLAGS if getattr(args, f[2:].replace('-', '_')) is not None]
    if unused:
        print(f'warning: {", ".join(unused)} do not apply to Stable Diffusion fine-tuning and are ignored; '
              'sample with python -m kdiff_align.sd.sample', file=sys.stderr)
    return args


def options_from_args(args: argparse.Namespace | Mapping[str, Any]) -> SDTrainOptions:
    """SDTrainOptions from this CLI's or kdiff_align.train's parsed arguments (unknown flags are ignored)."""
    values = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    fields = {f.name for f in dataclasses.fields(SDTrainOptions)}
    kwargs = {k: v for k, v in values.items() if k in fields and v is not None}
    if 'no_progress' in values:
        kwargs['progress'] = not values['no_progress']
    if 'end_step' in values:
        kwargs['end_step'] = values['end_step']
    return SDTrainOptions(**kwargs)


def main(config_path_or_dict: str | Path | Mapping[str, Any] | None = None,
         args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """The CLI entry point; returns 0, 2 for bad input, 1 for a failed run.

    Called as main(argv_list) or main() it parses this module's flags (kdiff_align.train's argv can be
    forwarded as is: its flags that do not apply are reported and ignored). main(config, namespace) takes
    another parser's arguments, but then that parser's defaults (e.g. its batch size) win over this one's.
    """
    from ..env import cli_defaults
    cli_defaults()  # before k-diffusion is imported
    if isinstance(config_path_or_dict, (list, tuple)) and args is None:
        config_path_or_dict, args = None, list(config_path_or_dict)
    if args is None or isinstance(args, (list, tuple)):
        args = parse_args(args)
    if config_path_or_dict is None:
        config_path_or_dict = getattr(args, 'config', None)
    stop = {'requested': False}

    def on_sigint(signum, frame):
        if stop['requested']:
            raise KeyboardInterrupt
        stop['requested'] = True
        print('\nInterrupt: finishing this step, then saving a checkpoint and the export (^C again to abort)',
              file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        result = train(config_path_or_dict, options_from_args(args), should_stop=lambda: stop['requested'])
    except (ConfigError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
    exported = result.lora or result.unet_dir
    print(f'Done: step {result.step}, loss {result.loss if result.loss is None else format(result.loss, ".4g")}, '
          f'{result.seconds:.0f} s. Export: {exported}'
          + (f' (kohya format for ComfyUI/A1111: {result.lora_kohya})' if result.lora_kohya else '')
          + f'; checkpoint: {result.checkpoint}; metrics: {result.run_dir / "metrics.csv"}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
