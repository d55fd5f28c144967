"""Trains k-diffusion models with the aligned CFG objective: `python -m kdiff_align.train --config CONFIG`.

Upstream train.py's flags and loop (accelerate, EMA warmup, LR schedules, demo grids, CSV log, wandb), with
the objective of docs/design.md section 1: each step draws sigma from the config's sample density and calls
AlignedDenoiser.loss(x, noise, sigma, class_cond=labels), which chooses the null-condition anchor rows itself.
Outputs go to <out-dir>/<name>/: config.json, args.json, metrics.csv, demo/, checkpoints/, latest.json and
<name>.safetensors (EMA weights for inference); with a config "guide" section also <name>_guide.safetensors (the
EMA weights at the guide step, a guide for autoguidance). Multi-GPU / multi-node:
`accelerate launch -m kdiff_align.train`.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..storage import checkpoint as ckpt_lib
from .. import data as data_lib
from . import engine, cli as train_cli
from ..config import ConfigError, align_section, make_denoiser_wrapper, make_model
from .engine import option
from ..errors import CheckpointError, DataError, TrainingError  # noqa: F401 (re-exported: one error type each)
from ..sampling.grid import w_title
from ..sampling.sample import data_shape, grid_image, sample, sample_grid
from .teachers import make_objective_teacher


@dataclasses.dataclass
class TrainOptions(train_cli.TrainerOptions):
    """The training run's options: upstream train.py's flags plus the aligned objective's overrides."""

    demo_every: int = option(500, 'save a demo grid every this many steps (0: only at the end)', lo=0)
    sample_n: int = option(64, 'the number of images to sample for demo grids', lo=0)
    evaluate_every: int = option(0, 'compute FID/KID every this many steps (0: off; needs the Inception weights)',
                                 lo=0)
    evaluate_n: int = option(2000, 'the number of samples to draw to evaluate', lo=0)
    num_workers: int | None = option(None, 'the number of data loader workers (None: 0 for digits/toy, else up to 8)',
                                     lo=0)
    compile: bool = option(False, 'compile the model')
    wandb_project: str | None = option(None, 'the wandb project name (specify this to enable wandb)')
    wandb_entity: str | None = option(None, 'the wandb entity name')
    wandb_group: str | None = option(None, 'the wandb group name')
    config_path: str | None = None      # for the custom dataset hook (location is relative to the config)


# The one training CLI (kdiff_align.training.cli) runs this trainer for k-diffusion configs.
OPTIONS = TrainOptions
LABEL = 'k-diffusion training'
NOT_HERE = ''
STOP_MESSAGE = 'finishing this step and saving a checkpoint'


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
    guide_export: Path | None = None   # <name>_guide.safetensors (a config "guide" section, once taken)


@dataclasses.dataclass
class ImageLoss:
    """Per-sample aligned losses of a (x, labels, aug_cond) batch, sigma drawn from the config's density."""

    model: nn.Module                    # the objective (AlignedDenoiser, GFTDenoiser, TeacherTargetDenoiser)
    sample_density: Callable
    class_cond: bool
    aug_cond: bool
    device: torch.device

    def __call__(self, batch: Sequence[torch.Tensor]) -> torch.Tensor:
        x, labels, aug_cond = batch
        x = x.to(self.device, non_blocking=True)
        kwargs = {}
        if self.class_cond:
            kwargs['class_cond'] = labels.to(self.device)
        if self.aug_cond:
            kwargs['aug_cond'] = aug_cond.to(self.device)
        noise = torch.randn_like(x)
        sigma = self.sample_density([x.shape[0]], device=self.device)
        return self.model.loss(x, noise, sigma, **kwargs)


@torch.no_grad()
def demo_grid(denoiser: nn.Module, config: Mapping[str, Any], run_dir: Path, sample_n: int, seed: int,
              step: int) -> Path:
    """demo/demo_<step>.png: classes x samples at w_sample, the same noise at every step."""
    num_classes = config['dataset']['num_classes']
    w = align_section(config)['w_sample']
    rows = min(num_classes, 10) if num_classes else 1
    classes = list(range(rows))
    device = next(denoiser.parameters()).device
    samples = sample_grid(denoiser, config, classes, [w if num_classes else 0.], n=max(1, sample_n // rows),
                          seed=seed, device=device)
    path = run_dir / 'demo' / f'demo_{step:08}.png'
    path.parent.mkdir(exist_ok=True)
    grid_image(samples, config, classes, [w], f'step {step}, {w_title(w)}').save(path)
    return path


def export_ema(model: nn.Module, config: Mapping[str, Any], path: Path, step: int) -> Path:
    """<name>.safetensors: the model's (EMA-swapped) weights with the config and sampling metadata."""
    return ckpt_lib.save_export(path, model.state_dict(), config, step)


def export_with_guide(export: Callable[[int], Path], run: engine.Engine, config: Mapping[str, Any], path: Path,
                      step: int) -> list[Path]:
    """The main export, then (once the run holds its guide snapshot) <name>_guide.safetensors: the EMA weights
    at run.guide_step, in the same format, marked as a guide snapshot."""
    paths = [export(step)]
    if run.guide is not None:
        paths.append(ckpt_lib.save_export(path, run.guide, config, run.guide_step, guide=True))
    return paths


class WandbLog:
    """wandb: the step's values and demo grids."""

    def __init__(self, options: TrainOptions, config: Mapping[str, Any], n_params: int):
        try:
            import wandb
        except ImportError:
            raise ConfigError("--wandb-project needs wandb: pip install 'kdiff-align[wandb]'") from None
        self.wandb = wandb
        wandb.init(project=options.wandb_project, entity=options.wandb_entity, group=options.wandb_group,
                   name=options.name, config={**dataclasses.asdict(options), 'config': config, 'parameters': n_params})

    def __call__(self, step: int, values: Mapping[str, Any]) -> None:
        logged = {k: v for k, v in values.items() if k != 'demo'}
        if values.get('demo') is not None and values['demo'].name == f'demo_{step:08}.png':
            logged['demo_grid'] = self.wandb.Image(str(values['demo']))
        self.wandb.log(logged, step=step)


def train(config: str | Path | Mapping[str, Any] | None, options: TrainOptions | None = None, *,
          should_stop: Callable[[], bool] | None = None) -> TrainResult:
    """Trains (or resumes) a run; config (a path, shipped name or dict) None takes the resumed checkpoint's.
    Returns where the outputs are. A run that fails before it writes anything leaves no run folder behind."""
    options = copy.deepcopy(options or TrainOptions())
    with engine.removed_if_empty_on_error(Path(options.out_dir) / options.name):
        return _train(config, options, should_stop)


def _train(config: str | Path | Mapping[str, Any] | None, options: TrainOptions,
           should_stop: Callable[[], bool] | None) -> TrainResult:
    import k_diffusion as K


    begin = engine.start(config, options, resolve=partial(train_cli.resolve, options=options),
                         accelerator_options=lambda config: {
                             'mixed_precision': options.mixed_precision,
                             'find_unused_parameters': config['model'].get('skip_stages', 0) > 0})
    run_dir, ckpt, config, accelerator = begin.run_dir, begin.ckpt, begin.config, begin.accelerator
    align, dataset_config = align_section(config), config['dataset']
    device, rank, world, is_main = begin.device, begin.rank, begin.world, begin.is_main

    # Data (checked before any work starts).
    dataset = data_lib.make_dataset(config, 'train', Path(options.config_path).parent if options.config_path else None)
    data_lib.check_items(config, dataset)
    per_epoch = data_lib.batches_per_epoch(len(dataset), options.batch_size, world)
    if per_epoch == 0:
        raise DataError(f'the dataset has {len(dataset)} items, fewer than one batch of {options.batch_size} x '
                        f'{world} process(es); lower --batch-size')
    if options.evaluate_every and options.evaluate_n and dataset_config['type'] in ('digits', 'toy'):
        raise ConfigError(f'--evaluate-every: Inception FID does not apply to {dataset_config["type"]!r}; use '
                          'the evaluation benchmarks (kdiff_align.evaluation.evaluate) or pass --evaluate-every 0')
    num_workers = options.num_workers
    if num_workers is None:
        num_workers = 0 if not data_lib.needs_item_rng(config) else min(8, os.cpu_count() or 1)

    # The model and the engine (optimizer, schedules, EMA, restored from the checkpoint).
    engine.seed_everything(options.seed, rank)
    inner_model = make_model(config)
    n_params = K.utils.n_params(inner_model)
    if options.compile:
        inner_model.compile()
    run = engine.Engine(accelerator, inner_model, config, run_dir, args=dataclasses.asdict(options), ckpt=ckpt,
                        per_epoch=per_epoch)
    objective = make_denoiser_wrapper(config, teacher=make_objective_teacher(config, run.ema, device),
                                      steps_done=partial(getattr, run, 'step'))
    loss = ImageLoss(objective(run.model), K.config.make_sample_density(config['model']),
                     class_cond=dataset_config['num_classes'] > 0, aug_cond=data_lib.uses_aug_cond(config),
                     device=device)
    batches = data_lib.batches(dataset, options.batch_size, options.seed, run.batches_seen, num_workers=num_workers,
                               rank=rank, world_size=world, seeded_items=data_lib.needs_item_rng(config))
    train_cli.print_run_header(accelerator, run_dir, align, parameters=n_params, seed=options.seed, ckpt=ckpt,
                               step=run.step, items=f'{len(dataset):,} training items', what='demos at')

    # Hooks: demo grids, the export, FID/KID, wandb (all with the EMA weights swapped in by the engine).
    ema_denoiser = objective(run.unwrapped)
    demo = partial(demo_grid, ema_denoiser, config, run_dir, options.sample_n, options.seed) \
        if options.sample_n else None
    export = partial(export_ema, run.unwrapped, config, run_dir / f'{options.name}.safetensors')
    guide_path = run_dir / f'{options.name}_guide.safetensors'
    if config.get('guide') is not None:
        export = partial(export_with_guide, export, run, config, guide_path)
        if is_main:
            print(f'Guide snapshot: the EMA weights at step {run.guide_step} '
                  f'({"taken" if run.guide is not None else "not taken yet"}), exported as {guide_path}', flush=True)
    evaluator = Evaluator(accelerator, config, dataset, options, ema_denoiser, run_dir) \
        if options.evaluate_every and options.evaluate_n else None
    wandb = WandbLog(options, config, n_params) if is_main and options.wandb_project else None

    result = run.run(options, batches, loss, demo=demo, demo_every=options.demo_every, export=export,
                     evaluate=evaluator, evaluate_every=options.evaluate_every, log=wandb, should_stop=should_stop)
    if wandb is not None:
        wandb.wandb.finish()
    exported = run_dir / f'{options.name}.safetensors'
    return TrainResult(run_dir=run_dir, step=result.step, loss=result.loss, checkpoint=result.checkpoint,
                       export=exported if exported.exists() else None, demo=result.demo,
                       metrics=run_dir / 'metrics.csv', seconds=result.seconds, interrupted=result.interrupted,
                       is_main=result.is_main,
                       guide_export=guide_path if config.get('guide') is not None and guide_path.exists() else None)


class Evaluator:
    """Upstream's FID/KID (Inception features) of EMA samples at w_sample against evaluate_n training images."""

    def __init__(self, accelerator, config: Mapping[str, Any], dataset, options: TrainOptions,
                 denoiser: nn.Module, run_dir: Path):
        import k_diffusion as K
        from torch.utils import data

        try:
            self.extractor = K.evaluation.InceptionV3FeatureExtractor(device=accelerator.device)
        except Exception as err:  # noqa: BLE001 - offline download failure
            raise ConfigError(f'--evaluate-every needs the Inception weights inception-2015-12-05.pt in '
                              f'~/.cache/k-diffusion/ (downloading them failed: {err}); put the file there or pass '
                              '--evaluate-every 0') from None
        self.accelerator, self.config, self.options, self.denoiser = accelerator, config, options, denoiser
        self.path = run_dir / 'eval.csv'
        n = min(options.evaluate_n, len(dataset))
        loader = iter(data.DataLoader(data.Subset(dataset, range(n)), options.batch_size))
        self.reals = K.evaluation.compute_features(accelerator, lambda _: next(loader)[0].to(accelerator.device),
                                                   self.extractor, n, options.batch_size)
        self.n = n

    @torch.no_grad()
    def __call__(self, step: int) -> None:
        import k_diffusion as K

        num_classes = self.config['dataset']['num_classes']
        w = align_section(self.config)['w_sample'] if num_classes else 0.

        def sample_fn(n: int) -> torch.Tensor:
            noise = torch.randn(n, *data_shape(self.config), device=self.accelerator.device)
            labels = torch.randint(0, num_classes, (n,), device=noise.device) if num_classes else None
            return sample(self.denoiser, self.config, noise, labels, w)

        with torch.random.fork_rng(devices=[]):
            fakes = K.evaluation.compute_features(self.accelerator, sample_fn, self.extractor, self.n,
                                                  self.options.batch_size)
        if self.accelerator.is_main_process:
            fid, kid = K.evaluation.fid(fakes, self.reals).item(), K.evaluation.kid(fakes, self.reals).item()
            print(f'step {step}: FID {fid:g}, KID {kid:g} (n = {self.n} samples at w = {w:g} vs {self.n} training '
                  'images; Inception features)', flush=True)
            new = not self.path.exists()
            with open(self.path, 'a') as f:
                if new:
                    f.write('step,fid,kid,n,w\n')
                f.write(f'{step},{fid},{kid},{self.n},{w}\n')


def describe(result: TrainResult, options: TrainOptions) -> str:
    """The CLI's closing line."""
    return (f'Done: step {result.step}, {engine.loss_text(result.loss, result.step, options.end_step)}, '
            f'{result.seconds:.0f} s. Checkpoint: {result.checkpoint}; export: {result.export}; demo grid: '
            f'{result.demo}; metrics: {result.metrics}' + (f'; guide: {result.guide_export}' if result.guide_export
                                                           else ''))


def main(argv: Sequence[str] | None = None) -> int:
    """python -m kdiff_align.train: the one training CLI (kdiff_align.training.cli.main; a Stable Diffusion config
    runs kdiff_align.sd.train)."""
    return train_cli.main(argv, 'python -m kdiff_align.train')


if __name__ == '__main__':
    sys.exit(main())
