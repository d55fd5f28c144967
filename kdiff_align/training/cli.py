"""The one training entry: `python -m kdiff_align.train` and `python -m kdiff_align.sd.train` (the same CLI).

One parser holds the flags of both trainers (each option's range stated once, in its options field: engine.option);
the config (or the run folder given to --resume) says which trainer runs: kdiff_align.training.trainer for k-diffusion
models, kdiff_align.sd.train for a Stable Diffusion config. A flag the chosen trainer does not have is reported
and ignored. One error mapping for both: bad input exits 2 with a one-line message, a failed run 1, a run stopped
by SIGINT / SIGTERM after saving 128 + the signal's number.

A trainer module provides OPTIONS (its options class, a TrainerOptions), train(config, options, should_stop=),
describe(result) (the closing line), and LABEL / NOT_HERE (what it is; what to use for flags it lacks). They are
imported by name (TRAINERS), so that they can import this module.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Mapping, Sequence
from importlib import import_module
from pathlib import Path
from types import ModuleType
from typing import Any

from . import engine
from ..core import registry
from ..config import apply_overrides, is_sd_config
from .engine import option
from ..errors import BAD_INPUT, TrainingError
from ..config.shipped import find_config

# (is the config a Stable Diffusion config?) -> the trainer module
TRAINERS = {False: 'kdiff_align.training.trainer', True: 'kdiff_align.sd.train'}


@dataclasses.dataclass
class TrainerOptions(engine.RunOptions):
    """The options of both trainers: the engine's, plus the config overrides of a guided training run."""

    w_train: float | None = option(None, "overrides align.w_train: the training w (paper's; 0 = standard CFG "
                                   'training)', lo=0)
    w_sample: float | None = option(None, "overrides align.w_sample: the demo/evaluation w (paper's; cfg scale = "
                                    '1 + w)', lo=0)


def resolve(config: Mapping[str, Any], options: TrainerOptions) -> dict[str, Any]:
    """The config with the run's overrides (--lr, --w-train, --w-sample, --mixed-precision), validated."""
    return apply_overrides(config, lr=options.lr, w_train=options.w_train, w_sample=options.w_sample,
                           mixed_precision=options.mixed_precision)


def describe_objective(align: Mapping[str, Any]) -> str:
    """One line: the objective and its knobs (a two-pass objective at w_train 0 is standard CFG training)."""
    spec = registry.of(align)
    if spec.sampling == 'cfg' and align['w_train'] == 0:
        return f'standard CFG (w_train = 0), uncond_prob = {align["uncond_prob"]}'
    text = f'{spec.name}, w_train = {align["w_train"]}, uncond_prob = {align["uncond_prob"]}'
    text += ''.join(f', {k} = {align[k]}' for k in spec.knobs
                    if k not in ('stop_grad_uncond', 'warmup_steps', 'target_sigma_range'))
    if align['warmup_steps']:
        text += f', warm-up {align["warmup_steps"]} steps'
    return text


def print_run_header(accelerator: Any, run_dir: Path, align: Mapping[str, Any], *, parameters: int, items: str,
                     seed: int, ckpt: Mapping[str, Any] | None, step: int, what: str = 'samples at') -> None:
    """The header both trainers print (main process): the run folder, the objective with its sampling w
    (`what` w = align.w_sample, e.g. 'demos at') and passes per step, and the checkpoint it resumes."""
    if not accelerator.is_main_process:
        return
    print(f'Run folder: {run_dir}  (process {accelerator.process_index} of {accelerator.num_processes} on '
          f'{accelerator.device}; trainable parameters: {parameters:,}; {items}; seed {seed})', flush=True)
    spec, w = registry.of(align), float(align['w_sample'])
    passes = ('one network evaluation per step' if spec.passes(w, spec.w_range(align['w_train'])) == 1
              else f'two per step, cfg scale = {1 + w:g}')
    print(f"Objective: {describe_objective(align)}; {what} w = {w:g} (paper's w; {passes})", flush=True)
    if ckpt is not None:
        print(f'Resuming from {ckpt["path"]} at step {step}', flush=True)


def trainers() -> list[ModuleType]:
    return [import_module(name) for name in TRAINERS.values()]


def make_parser(prog: str = 'python -m kdiff_align.train') -> argparse.ArgumentParser:
    """The one parser: --config and every trainer's flags."""
    modules = trainers()
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split('\n\n')[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--config', help='the config file or shipped config name (upstream format + "align", or a '
                   'stable_diffusion config); optional with --resume')
    engine.add_option_flags(p, [(m.LABEL, m.OPTIONS) for m in modules])
    return p


def is_sd_run(config: str | None, resume: str | None) -> bool:
    """Whether --config (or the run folder given to --resume) is a Stable Diffusion fine-tuning config."""
    candidates = [find_config(config) or Path(config)] if config else []
    if resume:
        candidates.append(Path(resume) / 'config.json')
    for path in candidates:
        try:
            return is_sd_config(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue  # load_config / the checkpoint loader report unreadable files with their own errors
    return False


def options_from_args(args: argparse.Namespace, trainer: ModuleType) -> TrainerOptions:
    """The trainer's options from the parsed flags (omitted ones: its defaults); flags it lacks are reported."""
    values = dict(vars(args))
    config = values.pop('config', None)
    fields = {f.name for f in dataclasses.fields(trainer.OPTIONS)}
    unused = [engine.flag_of(f) for m in trainers() for f in dataclasses.fields(m.OPTIONS)
              if f.name in values and f.name not in fields]
    if unused:
        print(f'warning: {", ".join(dict.fromkeys(unused))} do not apply to {trainer.LABEL} and are ignored'
              f'{trainer.NOT_HERE}', file=sys.stderr)
    kwargs = {k: v for k, v in values.items() if k in fields}
    if 'config_path' in fields:
        kwargs['config_path'] = config
    return trainer.OPTIONS(**kwargs)


def main(argv: Sequence[str] | None = None, prog: str = 'python -m kdiff_align.train') -> int:
    """The CLI entry point of both trainers; returns the exit status (2 for bad input, 1 for a failed run, 128 + the
    signal's number (130 for ^C) when SIGINT / SIGTERM stopped it after saving)."""
    import torch

    from ..env import cli_defaults
    cli_defaults()  # before k-diffusion is imported
    args = make_parser(prog).parse_args(list(sys.argv[1:] if argv is None else argv))
    trainer = import_module(TRAINERS[is_sd_run(args.config, getattr(args, 'resume', None))])
    options = options_from_args(args, trainer)
    try:
        with engine.StopRequest(trainer.STOP_MESSAGE) as stop:
            result = trainer.train(args.config, options, should_stop=stop)
    except BAD_INPUT as err:
        print(f'error: {err}', file=sys.stderr)
        return 2
    except TrainingError as err:
        print(f'error: {err}', file=sys.stderr)
        return 1
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()  # gloo's threads can abort the process at exit otherwise
    if result.is_main:
        print(trainer.describe(result, options))
    return stop.exit_status if result.interrupted else 0
