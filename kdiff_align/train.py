"""Trains k-diffusion models with the aligned CFG objective: `python -m kdiff_align.train --config CONFIG`.

Upstream train.py's flags and loop (accelerate, EMA warmup, LR schedules, demo grids, CSV log, wandb), with
the objective of docs/design.md section 1: each step draws sigma from the config's sample density and calls
AlignedDenoiser.loss(x, noise, sigma, class_cond=labels), which chooses the null-condition anchor rows itself.
Outputs go to <out-dir>/<name>/: config.json, args.json, metrics.csv, demo/, checkpoints/, latest.json and
<name>.safetensors (EMA weights for inference). Multi-GPU / multi-node: `accelerate launch -m kdiff_align.train`.
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import os
import random
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import CheckpointError
from .config import ConfigError
from .data import DataError

METRICS_COLUMNS = ('step', 'epoch', 'loss', 'lr', 'ema_decay', 'grad_norm', 'it_per_s', 'elapsed_s')


class TrainingError(RuntimeError):
    """Training cannot continue (a non-finite loss or gradient)."""


@dataclasses.dataclass
class TrainOptions:
    """The training run's options: upstream train.py's flags plus the aligned objective's overrides."""

    name: str = 'model'                 # run name: outputs go to <out_dir>/<name>/
    out_dir: str = 'runs'               # parent folder of run folders
    batch_size: int = 64                # per process, per micro-batch
    grad_accum_steps: int = 1           # micro-batches per optimizer step
    lr: float | None = None             # overrides optimizer.lr
    mixed_precision: str | None = None  # 'no', 'fp16', 'bf16' (None: accelerate's configured default)
    grad_clip: float = 0.               # max global grad norm; 0: no clipping (upstream does not clip)
    demo_every: int = 500               # demo grid every this many steps (0: only at the end)
    sample_n: int = 64                  # images in a demo grid
    evaluate_every: int = 0             # FID/KID every this many steps (0: off; needs Inception weights)
    evaluate_n: int = 2000              # samples and reference images for FID/KID
    save_every: int = 10000             # checkpoint every this many steps (and always at the end)
    end_step: int | None = None         # stop after this many optimizer steps (None: until interrupted)
    resume: str | None = None           # a checkpoint, or a run folder (its latest.json)
    seed: int | None = None             # None: a random seed, recorded in the checkpoint
    num_workers: int | None = None      # data loader workers (None: 0 for in-memory data, else up to 8)
    log_every: int = 25                 # metrics.csv row every this many steps
    w_train: float | None = None        # overrides align.w_train (paper's w)
    w_sample: float | None = None       # overrides align.w_sample (paper's w; cfg scale = 1 + w)
    compile: bool = False               # torch.compile the model
    progress: bool = True               # tqdm progress bar
    save_final: bool = True             # checkpoint + export at the end (False: library callers that keep nothing)
    wandb_project: str | None = None    # enables wandb
    wandb_entity: str | None = None
    wandb_group: str | None = None
    config_path: str | None = None      # for the custom dataset hook (location is relative to the config)


@dataclasses.dataclass
class TrainResult:
    """Where a run's outputs are and how it ended."""

    run_dir: Path
    step: int
    loss: float | None
    checkpoint: Path | None
    export: Path | None
    demo: Path | None
    metrics: Path
    seconds: float
    interrupted: bool = False
    is_main: bool = True        # False on the other processes of a distributed run


def _apply_overrides(config: Mapping[str, Any], options: TrainOptions) -> dict[str, Any]:
    config = copy.deepcopy(dict(config))
    if options.lr is not None:
        config['optimizer']['lr'] = options.lr
    if options.w_train is not None:
        config['align']['w_train'] = options.w_train
    if options.w_sample is not None:
        config['align']['w_sample'] = options.w_sample
    from .config import load_config
    return load_config(config)


def _first_difference(a: Any, b: Any, prefix: str) -> str | None:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            diff = _first_difference(a.get(key), b.get(key), f'{prefix}.{key}')
            if diff:
                return diff
        return None
    return None if a == b else f'{prefix}: {b!r} in the checkpoint, {a!r} in the config'


def _check_options(options: TrainOptions) -> None:
    def need(ok: bool, flag: str, value: Any, allowed: str) -> None:
        if not ok:
            raise ConfigError(f'{flag}: got {value!r}; allowed: {allowed}')
    need(options.batch_size >= 1, '--batch-size', options.batch_size, 'an integer >= 1')
    need(options.grad_accum_steps >= 1, '--grad-accum-steps', options.grad_accum_steps, 'an integer >= 1')
    need(options.lr is None or (math.isfinite(options.lr) and options.lr > 0), '--lr', options.lr, 'a number > 0')
    need(options.mixed_precision in (None, 'no', 'fp16', 'bf16'), '--mixed-precision', options.mixed_precision,
         "'no', 'fp16' or 'bf16'")
    need(math.isfinite(options.grad_clip) and options.grad_clip >= 0, '--grad-clip', options.grad_clip,
         'a number >= 0 (0: off)')
    for flag in ('demo_every', 'sample_n', 'evaluate_every', 'evaluate_n', 'save_every'):
        value = getattr(options, flag)
        need(value >= 0, '--' + flag.replace('_', '-'), value, 'an integer >= 0')
    need(options.log_every >= 1, '--log-every', options.log_every, 'an integer >= 1')
    need(options.end_step is None or options.end_step >= 0, '--end-step', options.end_step, 'an integer >= 0')
    need(options.num_workers is None or options.num_workers >= 0, '--num-workers', options.num_workers,
         'an integer >= 0 (0: load in the main process)')
    for flag in ('w_train', 'w_sample'):
        value = getattr(options, flag)
        need(value is None or (math.isfinite(value) and value >= 0), '--' + flag.replace('_', '-'), value,
             "a number >= 0 (the paper's w; cfg scale = 1 + w)")
    need(bool(options.name) and '/' not in options.name and options.name not in ('.', '..'), '--name',
         options.name, 'a folder name without "/"')


class MetricsLog:
    """metrics.csv: one row every log_every steps; rows after a resumed checkpoint's step are dropped."""

    def __init__(self, path: Path, columns: Sequence[str], resume_step: int | None):
        self.path, self.columns = path, list(columns)
        rows = []
        if resume_step is not None and path.exists():
            with open(path, newline='') as f:
                rows = [r for r in csv.DictReader(f) if r.get('step', '').isdigit() and int(r['step']) <= resume_step]
        self.file = open(path, 'w', newline='')
        self.writer = csv.DictWriter(self.file, self.columns)
        self.writer.writeheader()
        self.writer.writerows(rows)
        self.file.flush()

    def write(self, row: Mapping[str, Any]) -> None:
        self.writer.writerow({k: row.get(k, '') for k in self.columns})
        self.file.flush()

    def close(self) -> None:
        self.file.close()


def _wandb(options: TrainOptions, config: Mapping[str, Any], n_params: int):
    try:
        import wandb
    except ImportError:
        raise ConfigError("--wandb-project needs wandb: pip install 'kdiff-align[wandb]'") from None
    wandb.init(project=options.wandb_project, entity=options.wandb_entity, group=options.wandb_group,
               name=options.name, config={**dataclasses.asdict(options), 'config': config, 'parameters': n_params})
    return wandb


def train(config: Mapping[str, Any] | None, options: TrainOptions | None = None, *,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Trains (or resumes) a run; config None takes the resumed checkpoint's. Returns where the outputs are."""
    import accelerate
    import k_diffusion as K
    from tqdm.auto import tqdm

    from . import checkpoint as ckpt_lib
    from . import data as data_lib
    from .config import align_section, make_denoiser_wrapper, make_model
    from .sample import grid_image, sample_grid
    from .schedulers import ema_update, make_ema_sched, make_lr_scheduler, make_optimizer, param_groups

    options = copy.deepcopy(options or TrainOptions())
    _check_options(options)
    run_dir = Path(options.out_dir) / options.name
    try:  # fail before any work if the outputs cannot be written
        (run_dir / 'demo').mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as err:
        raise ConfigError(f'--out-dir {options.out_dir!r}: cannot write the run folder {str(run_dir)!r} '
                          f'({err.strerror or err}); pass a writable --out-dir') from None

    # Resume: --resume, or upstream's behaviour of continuing a run folder that has a checkpoint.
    ckpt = None
    if options.resume is not None:
        ckpt = ckpt_lib.load_checkpoint(options.resume)
    elif (run_dir / ckpt_lib.LATEST).exists():
        ckpt = ckpt_lib.load_checkpoint(run_dir)
    if config is None:
        if ckpt is None:
            raise ConfigError('no config: pass --config, or --resume a checkpoint (which carries its config)')
        config = ckpt['config']
    config = _apply_overrides(config, options)
    if ckpt is not None:
        diff = _first_difference(config['model'], ckpt['config']['model'], 'model')
        if diff:
            raise ConfigError(f'the config does not match the checkpoint {ckpt["path"]!r} ({diff}); resume with '
                              'the same model section, or omit --config to use the checkpoint\'s')
        if options.seed is None:
            options.seed = ckpt['args'].get('seed')
        old_batch = ckpt['args'].get('batch_size')
        if old_batch is not None and old_batch != options.batch_size:
            print(f'note: --batch-size {options.batch_size} differs from the checkpoint\'s {old_batch}; the data '
                  'order continues approximately, not exactly', file=sys.stderr)
    model_config, dataset_config = config['model'], config['dataset']
    align = align_section(config)

    ddp = accelerate.DistributedDataParallelKwargs(find_unused_parameters=model_config.get('skip_stages', 0) > 0)
    try:
        # Several processes without CUDA (torchrun / accelerate launch on CPUs): gloo, not a silent single process.
        multi_cpu = not torch.cuda.is_available() and int(os.environ.get('WORLD_SIZE', '1')) > 1
        accelerator = accelerate.Accelerator(kwargs_handlers=[ddp], mixed_precision=options.mixed_precision,
                                             cpu=multi_cpu)
    except ValueError as err:
        raise ConfigError(f'--mixed-precision {options.mixed_precision!r}: {err}') from None
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if options.seed is None:  # one random seed for all processes (they share the data order)
        seed = [int.from_bytes(os.urandom(4), 'little') >> 1]
        if world > 1:
            accelerate.utils.broadcast_object_list(seed)
        options.seed = seed[0]
    is_main = accelerator.is_main_process
    torch.backends.cuda.matmul.allow_tf32 = True

    # Data (checked before any work starts).
    dataset = data_lib.make_dataset(config, 'train', Path(options.config_path).parent if options.config_path else None)
    data_lib.check_items(config, dataset)
    num_workers = options.num_workers
    if num_workers is None:
        num_workers = 0 if not data_lib.needs_item_rng(config) else min(8, os.cpu_count() or 1)
    per_epoch = data_lib.batches_per_epoch(len(dataset), options.batch_size, world)
    if per_epoch == 0:
        raise DataError(f'the dataset has {len(dataset)} items, fewer than one batch of {options.batch_size} x '
                        f'{world} process(es); lower --batch-size')
    if options.evaluate_every and options.evaluate_n and dataset_config['type'] in ('digits', 'toy'):
        raise ConfigError(f'--evaluate-every: Inception FID does not apply to {dataset_config["type"]!r}; use '
                          'the evaluation benchmarks (kdiff_align.evaluate) or pass --evaluate-every 0')

    # Model, EMA, optimizer, schedules. Seeds differ per process (upstream), data order is shared.
    torch.manual_seed(options.seed + 1_000_003 * rank)
    random.seed(options.seed + rank)
    np.random.seed((options.seed + rank) % 2 ** 32)
    inner_model = make_model(config)
    inner_model_ema = copy.deepcopy(inner_model).eval().requires_grad_(False)
    n_params = K.utils.n_params(inner_model)
    lr = config['optimizer']['lr']
    opt = make_optimizer(param_groups(inner_model, lr), config['optimizer'], lr)
    sched = make_lr_scheduler(opt, config['lr_sched'])
    ema_sched = make_ema_sched(config['ema_sched'])
    step, batches_seen = 0, 0
    if ckpt is not None:
        try:
            inner_model.load_state_dict(ckpt['model'])
            inner_model_ema.load_state_dict(ckpt['model_ema'])
        except RuntimeError as err:
            raise CheckpointError(f'checkpoint {ckpt["path"]!r} does not fit the config\'s model: {err}') from None
        sched.load_state_dict(ckpt['sched'])
        ema_sched.load_state_dict(ckpt['ema_sched'])
        step, batches_seen = ckpt['step'], ckpt['batches_seen']
    if options.compile:
        inner_model.compile()
    inner_model, opt = accelerator.prepare(inner_model, opt)
    inner_model_ema.to(device)
    if ckpt is not None:
        opt.load_state_dict(ckpt['opt'])
        if ckpt.get('scaler') is not None and accelerator.scaler is not None:
            accelerator.scaler.load_state_dict(ckpt['scaler'])
        rng = ckpt['rng']
        if len(rng) == world:
            ckpt_lib.set_rng_state(rng[rank])
        elif is_main:
            print(f'note: the checkpoint has RNG states for {len(rng)} process(es), this run has {world}; '
                  'random streams restart from the seed', file=sys.stderr)
    model = make_denoiser_wrapper(config)(inner_model)
    model_ema = make_denoiser_wrapper(config)(inner_model_ema)
    sample_density = K.config.make_sample_density(model_config)
    with_aug = data_lib.uses_aug_cond(config)
    num_classes = dataset_config['num_classes']

    # Outputs.
    if is_main:
        (run_dir / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
        (run_dir / 'args.json').write_text(json.dumps(dataclasses.asdict(options), indent=2) + '\n')
        print(f'Run folder: {run_dir}  (process {rank} of {world} on {device}; parameters: {n_params:,}; '
              f'{len(dataset):,} training items; seed {options.seed})', flush=True)
        print(f'Objective: w_train = {align["w_train"]}, mix = {align["mix"]}, uncond_prob = {align["uncond_prob"]}; '
              f"demos at w = {align['w_sample']:g} (paper's w; cfg scale = {1 + align['w_sample']:g})", flush=True)
        if ckpt is not None:
            print(f'Resuming from {ckpt["path"]} at step {step}', flush=True)
    metrics = MetricsLog(run_dir / 'metrics.csv', METRICS_COLUMNS, step if ckpt is not None else None) \
        if is_main else None
    use_wandb = bool(is_main and options.wandb_project)
    wandb = _wandb(options, config, n_params) if use_wandb else None
    evaluator = _Evaluator(accelerator, config, dataset, options, model_ema) \
        if options.evaluate_every and options.evaluate_n else None

    def rng_devices() -> list:
        return [device] if device.type == 'cuda' else []

    @torch.no_grad()
    def demo() -> Path | None:
        if not is_main or options.sample_n == 0:
            return None
        with torch.random.fork_rng(devices=rng_devices()), K.utils.eval_mode(model_ema):
            rows = min(num_classes, 10) if num_classes else 1
            cols = max(1, options.sample_n // rows)
            classes = list(range(rows))
            samples = sample_grid(model_ema, config, classes, [align['w_sample'] if num_classes else 0.],
                                  n=cols, seed=options.seed, device=device)
            path = run_dir / 'demo' / f'demo_{step:08}.png'
            title = f"step {step}, w = {align['w_sample']:g} (paper's, cfg scale = 1 + w)"
            grid_image(samples, config, classes, [align['w_sample']], title).save(path)
        if use_wandb:
            wandb.log({'demo_grid': wandb.Image(str(path))}, step=step)
        return path

    last_checkpoint: Path | None = Path(ckpt['path']) if ckpt is not None else None

    def save() -> Path | None:
        nonlocal last_checkpoint
        accelerator.wait_for_everyone()
        rng = [ckpt_lib.get_rng_state()]
        if world > 1:
            rng = accelerate.utils.gather_object(rng)
        if not is_main:
            return None
        state = {
            'config': json.dumps(config), 'args': json.dumps(dataclasses.asdict(options)),
            'model': accelerator.unwrap_model(inner_model).state_dict(), 'model_ema': inner_model_ema.state_dict(),
            'opt': opt.state_dict(), 'sched': sched.state_dict(), 'ema_sched': ema_sched.state_dict(),
            'scaler': accelerator.scaler.state_dict() if accelerator.scaler is not None else None,
            'epoch': batches_seen // per_epoch, 'batches_seen': batches_seen, 'rng': rng,
        }
        last_checkpoint = ckpt_lib.save_checkpoint(run_dir, step, state)
        ckpt_lib.save_export(run_dir / f'{options.name}.safetensors', inner_model_ema.state_dict(), config, step)
        tqdm.write(f'Saved {last_checkpoint} and {run_dir / (options.name + ".safetensors")}')
        return last_checkpoint

    # The loop: one iteration = one optimizer step over grad_accum_steps micro-batches.
    params = [p for p in inner_model.parameters() if p.requires_grad]
    data_iter = data_lib.batches(dataset, options.batch_size, options.seed, batches_seen, num_workers=num_workers,
                                 rank=rank, world_size=world, seeded_items=data_lib.needs_item_rng(config))
    pbar = tqdm(total=options.end_step, initial=step, disable=not (is_main and options.progress),
                desc=options.name, dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
    start, window, window_start = time.time(), [], time.time()
    last_demo, saved_step, loss_avg, interrupted = None, step if ckpt is not None else None, None, False
    try:
        while options.end_step is None or step < options.end_step:
            if should_stop is not None and should_stop():
                interrupted = True
                break
            loss_sum = torch.zeros((), device=device)
            for micro in range(options.grad_accum_steps):
                x, labels, aug_cond = next(data_iter)
                batches_seen += 1
                x = x.to(device, non_blocking=True)
                kwargs = {}
                if num_classes:
                    kwargs['class_cond'] = labels.to(device)
                if with_aug:
                    kwargs['aug_cond'] = aug_cond.to(device)
                noise = torch.randn_like(x)
                sigma = sample_density([x.shape[0]], device=device)
                sync = micro == options.grad_accum_steps - 1
                with nullcontext() if sync else accelerator.no_sync(inner_model):
                    losses = model.loss(x, noise, sigma, **kwargs)
                    accelerator.backward(losses.mean() / options.grad_accum_steps)
                loss_sum += losses.detach().mean()
            loss = accelerator.gather(loss_sum[None] / options.grad_accum_steps).mean().item()
            if not math.isfinite(loss):
                raise TrainingError(
                    f'the loss is {loss} at step {step + 1}; stopped before the optimizer step, so no weights and '
                    f'no checkpoint hold non-finite values (last good checkpoint: {last_checkpoint or "none yet"}). '
                    'Try a lower --lr, --grad-clip 1, or --mixed-precision no.')
            grad_norm = accelerator.clip_grad_norm_(params, options.grad_clip or float('inf'))
            grad_norm = float(grad_norm) if grad_norm is not None else float('nan')
            if not math.isfinite(grad_norm) and accelerator.scaler is None:
                raise TrainingError(f'the gradient norm is {grad_norm} at step {step + 1} (loss {loss:g}); stopped '
                                    f'before the optimizer step (last good checkpoint: {last_checkpoint or "none yet"}). '
                                    'Try a lower --lr or --grad-clip 1.')
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            ema_decay = ema_sched.get_value()
            ema_update(accelerator.unwrap_model(inner_model), inner_model_ema, ema_decay)
            ema_sched.step()
            step += 1
            window.append(loss)
            pbar.update(1)
            pbar.set_postfix(loss=f'{loss:.4f}', refresh=False)

            if is_main and (step % options.log_every == 0 or step == options.end_step):
                now = time.time()
                loss_avg = sum(window) / len(window)
                metrics.write({'step': step, 'epoch': batches_seen // per_epoch, 'loss': f'{loss_avg:.6g}',
                               'lr': f'{sched.get_last_lr()[0]:.6g}', 'ema_decay': f'{ema_decay:.6g}',
                               'grad_norm': f'{grad_norm:.6g}', 'it_per_s': f'{len(window) / (now - window_start):.4g}',
                               'elapsed_s': f'{now - start:.1f}'})
                window, window_start = [], now
            if use_wandb:
                wandb.log({'loss': loss, 'lr': sched.get_last_lr()[0], 'ema_decay': ema_decay,
                           'grad_norm': grad_norm, 'epoch': batches_seen // per_epoch}, step=step)
            if options.demo_every and step % options.demo_every == 0:
                last_demo = demo() or last_demo
            if evaluator is not None and step % options.evaluate_every == 0:
                evaluator(step, metrics_dir=run_dir)
            if options.save_every and step % options.save_every == 0:
                save()
                saved_step = step
    finally:
        pbar.close()
    if window and is_main:
        loss_avg = sum(window) / len(window)
    if saved_step != step and options.save_final:
        save()
    if last_demo is None or not last_demo.name.endswith(f'{step:08}.png'):
        last_demo = demo() or last_demo
    if metrics is not None:
        metrics.close()
    if use_wandb:
        wandb.finish()
    accelerator.wait_for_everyone()
    export = run_dir / f'{options.name}.safetensors'
    return TrainResult(run_dir=run_dir, step=step, loss=loss_avg, checkpoint=last_checkpoint,
                       export=export if export.exists() else None, demo=last_demo, metrics=run_dir / 'metrics.csv',
                       seconds=time.time() - start, interrupted=interrupted, is_main=is_main)


class _Evaluator:
    """Upstream's FID/KID (Inception features) of EMA samples at w_sample against evaluate_n training images."""

    def __init__(self, accelerator, config, dataset, options: TrainOptions, model_ema):
        import k_diffusion as K
        try:
            self.extractor = K.evaluation.InceptionV3FeatureExtractor(device=accelerator.device)
        except Exception as err:  # noqa: BLE001 - offline download failure
            raise ConfigError(f'--evaluate-every needs the Inception weights inception-2015-12-05.pt in '
                              f'~/.cache/k-diffusion/ (downloading them failed: {err}); put the file there or pass '
                              '--evaluate-every 0') from None
        self.accelerator, self.config, self.options, self.model_ema = accelerator, config, options, model_ema
        from torch.utils import data
        n = min(options.evaluate_n, len(dataset))
        loader = iter(data.DataLoader(data.Subset(dataset, range(n)), options.batch_size))
        self.reals = K.evaluation.compute_features(accelerator, lambda _: next(loader)[0].to(accelerator.device),
                                                   self.extractor, n, options.batch_size)
        self.n = n

    @torch.no_grad()
    def __call__(self, step: int, metrics_dir: Path) -> None:
        import k_diffusion as K

        from .config import align_section
        from .sample import data_shape, sample
        num_classes = self.config['dataset']['num_classes']
        w = align_section(self.config)['w_sample'] if num_classes else 0.

        def sample_fn(n: int) -> torch.Tensor:
            noise = torch.randn(n, *data_shape(self.config), device=self.accelerator.device)
            labels = torch.randint(0, num_classes, (n,), device=noise.device) if num_classes else None
            return sample(self.model_ema, self.config, noise, labels, w)

        with torch.random.fork_rng(devices=[]), K.utils.eval_mode(self.model_ema):
            fakes = K.evaluation.compute_features(self.accelerator, sample_fn, self.extractor, self.n,
                                                  self.options.batch_size)
        if self.accelerator.is_main_process:
            fid, kid = K.evaluation.fid(fakes, self.reals).item(), K.evaluation.kid(fakes, self.reals).item()
            print(f'step {step}: FID {fid:g}, KID {kid:g} (n = {self.n} samples at w = {w:g} vs {self.n} training '
                  'images; Inception features)', flush=True)
            path = metrics_dir / 'eval.csv'
            new = not path.exists()
            with open(path, 'a') as f:
                if new:
                    f.write('step,fid,kid,n,w\n')
                f.write(f'{step},{fid},{kid},{self.n},{w}\n')


def _bounded(kind: type, minimum: float, *, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: an int (or a finite float) >= minimum, or > minimum when strict."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            what = 'an integer' if kind is int else 'a finite number'
            raise argparse.ArgumentTypeError(f'must be {what} {">" if strict else ">="} {minimum:g}, got {text}')
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" for text that is not a number
    return parse


_positive_int, _nonnegative_int = _bounded(int, 1), _bounded(int, 0)
_nonnegative_float, _positive_float = _bounded(float, 0), _bounded(float, 0, strict=True)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The CLI: upstream train.py's flags plus the objective's."""
    d = TrainOptions()
    p = argparse.ArgumentParser(prog='python -m kdiff_align.train', description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--config', help='the configuration file (upstream format + "align"); optional with --resume')
    p.add_argument('--name', default=d.name, help='the name of the run (its folder under --out-dir)')
    p.add_argument('--out-dir', default=d.out_dir, help='the parent folder of run folders')
    p.add_argument('--batch-size', type=_positive_int, default=d.batch_size, help='the batch size per process')
    p.add_argument('--grad-accum-steps', type=_positive_int, default=d.grad_accum_steps,
                   help='the number of gradient accumulation steps')
    p.add_argument('--lr', type=_positive_float, help='the learning rate (overrides optimizer.lr)')
    p.add_argument('--mixed-precision', choices=('no', 'fp16', 'bf16'), help='the mixed precision type')
    p.add_argument('--grad-clip', type=_nonnegative_float, default=d.grad_clip,
                   help='clip the global gradient norm to this (0: off)')
    p.add_argument('--demo-every', type=_nonnegative_int, default=d.demo_every,
                   help='save a demo grid every this many steps (0: only at the end)')
    p.add_argument('--sample-n', type=_nonnegative_int, default=d.sample_n,
                   help='the number of images to sample for demo grids')
    p.add_argument('--evaluate-every', type=_nonnegative_int, default=d.evaluate_every,
                   help='compute FID/KID every this many steps (0: off; needs the Inception weights)')
    p.add_argument('--evaluate-n', type=_nonnegative_int, default=d.evaluate_n,
                   help='the number of samples to draw to evaluate')
    p.add_argument('--save-every', type=_nonnegative_int, default=d.save_every, help='save every this many steps')
    p.add_argument('--end-step', type=_nonnegative_int, help='stop after this many steps (default: run until ^C)')
    p.add_argument('--resume', help='the checkpoint (or run folder) to resume from')
    p.add_argument('--seed', type=int, help='the random seed (default: random, recorded in checkpoints)')
    p.add_argument('--num-workers', type=_nonnegative_int,
                   help='the number of data loader workers (default: 0 for digits/toy, else up to 8)')
    p.add_argument('--log-every', type=_positive_int, default=d.log_every, help='a metrics.csv row every this many steps')
    p.add_argument('--w-train', type=_nonnegative_float,
                   help="overrides align.w_train: the training w (paper's; 0 = standard CFG training)")
    p.add_argument('--w-sample', type=_nonnegative_float,
                   help="overrides align.w_sample: the demo/evaluation w (paper's; cfg scale = 1 + w)")
    p.add_argument('--compile', action='store_true', help='compile the model')
    p.add_argument('--no-progress', action='store_true', help='no progress bar')
    p.add_argument('--wandb-project', help='the wandb project name (specify this to enable wandb)')
    p.add_argument('--wandb-entity', help='the wandb entity name')
    p.add_argument('--wandb-group', help='the wandb group name')
    return p.parse_args(argv)


def options_from_args(args: argparse.Namespace) -> TrainOptions:
    """TrainOptions from parsed CLI arguments."""
    fields = {f.name for f in dataclasses.fields(TrainOptions)}
    values = {k: v for k, v in vars(args).items() if k in fields}
    return TrainOptions(**values, progress=not args.no_progress, config_path=args.config)


def _is_sd_run(argv: Sequence[str]) -> bool:
    """Whether --config (or the run folder given to --resume) is a Stable Diffusion fine-tuning config."""
    from .sd.config import is_sd_config
    from .shipped import find_config

    probe = argparse.ArgumentParser(add_help=False)
    probe.add_argument('--config')
    probe.add_argument('--resume')
    known, _ = probe.parse_known_args(argv)
    candidates = [find_config(known.config) or Path(known.config)] if known.config else []
    if known.resume:
        candidates.append(Path(known.resume) / 'config.json')
    for path in candidates:
        try:
            return is_sd_config(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # load_config / the checkpoint loader report unreadable files with their own errors
    return False


def main(argv: Sequence[str] | None = None) -> int:
    """The CLI entry point; returns the exit status (2 for bad input, 1 for a failed run, 130 if interrupted)."""
    from .env import cli_defaults
    cli_defaults()  # before k-diffusion is imported
    argv = list(sys.argv[1:] if argv is None else argv)
    if _is_sd_run(argv):
        from .sd.train import main as sd_main
        return sd_main(argv)
    args = parse_args(argv)
    stop = {'requested': False}

    def on_sigint(signum, frame):
        if stop['requested']:
            raise KeyboardInterrupt
        stop['requested'] = True
        print('\nInterrupt: finishing this step and saving a checkpoint (^C again to abort)', file=sys.stderr)

    previous = signal.signal(signal.SIGINT, on_sigint)
    try:
        from .config import load_config
        config = load_config(args.config) if args.config else None
        result = train(config, options_from_args(args), should_stop=lambda: stop['requested'])
    except (ConfigError, DataError, CheckpointError) as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    finally:
        signal.signal(signal.SIGINT, previous)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # gloo's threads can abort the process at exit otherwise
    if not result.is_main:
        return 130 if result.interrupted else 0
    print(f'Done: step {result.step}, loss {result.loss if result.loss is None else format(result.loss, ".4g")}, '
          f'{result.seconds:.0f} s. Checkpoint: {result.checkpoint}; export: {result.export}; demo grid: '
          f'{result.demo}; metrics: {result.metrics}')
    return 130 if result.interrupted else 0


if __name__ == '__main__':
    sys.exit(main())
