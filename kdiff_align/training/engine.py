"""The training engine: the one loop that every kdiff-align training run goes through.

A caller builds what differs (the model, the per-sample loss of a batch, the data, a demo and an export hook).
The Engine owns the rest: accelerate (devices, mixed precision, processes), the config's optimizer and LR
schedule, upstream's EMAWarmup, the step with gradient accumulation and the non-finite loss / gradient guard,
metrics.csv, the progress bar, and atomic checkpoints that resume exactly: model, EMA, optimizer, schedules,
grad scaler, the RNG states of every process and the data position (batches seen), and the guide snapshot of a
config's "guide" section (the EMA weights at a stated step, for autoguidance). StopRequest turns SIGINT and
SIGTERM into "finish this step, save, return".
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..storage import checkpoint as ckpt_lib
from ..errors import CheckpointError, ConfigError, TrainingError  # noqa: F401 (re-exported)
from .schedulers import make_ema_sched, make_lr_scheduler, make_optimizer, param_groups

METRICS_COLUMNS = ('step', 'epoch', 'loss', 'lr', 'ema_decay', 'grad_norm', 'it_per_s', 'elapsed_s')


def option(default: Any, help: str, *, lo: float | None = None, strict: bool = False,
           choices: Sequence[str] | None = None, valid: tuple[Callable[[Any], bool], str] | None = None,
           flag: str | None = None, cli: bool = True) -> Any:
    """A field of a run's options with its range, stated once: check_options checks a value against it and
    add_option_flags makes the CLI flag (an argparse type that checks the same). lo: the least value (> lo when
    strict); choices; valid: (predicate, what is allowed); flag: the CLI flag (default: --field-name); cli False:
    a library-only option."""
    return dataclasses.field(default=default, metadata={'help': help, 'lo': lo, 'strict': strict, 'choices': choices,
                                                        'valid': valid, 'flag': flag, 'cli': cli})


def _folder_name(name: Any) -> bool:
    return isinstance(name, str) and bool(name) and '/' not in name and name not in ('.', '..')


@dataclasses.dataclass
class RunOptions:
    """The options that every training CLI shares (upstream train.py's flag names), each with its range."""

    name: str = option('model', 'the name of the run (its folder under --out-dir)',
                       valid=(_folder_name, 'a folder name without "/"'))
    out_dir: str = option('runs', 'the parent folder of run folders')
    batch_size: int = option(64, 'the batch size per process', lo=1)
    grad_accum_steps: int = option(1, 'the number of gradient accumulation steps', lo=1)
    lr: float | None = option(None, 'the learning rate (overrides optimizer.lr)', lo=0, strict=True)
    mixed_precision: str | None = option(None, "the mixed precision type (None: the config's, or accelerate's)",
                                         choices=('no', 'fp16', 'bf16'))
    grad_clip: float = option(0., 'clip the global gradient norm to this (0: off)', lo=0)
    save_every: int = option(10000, 'save a checkpoint (and the export) every this many steps', lo=0)
    end_step: int | None = option(None, 'stop after this many steps (None: run until ^C)', lo=0)
    resume: str | None = option(None, 'the checkpoint (or run folder) to resume from')
    seed: int | None = option(None, 'the random seed (None: random, recorded in checkpoints)')
    log_every: int = option(25, 'a metrics.csv row every this many steps', lo=1)
    progress: bool = option(True, 'tqdm progress bar', flag='--no-progress')
    save_final: bool = option(True, 'checkpoint + export at the end (False: library callers that keep nothing)',
                              cli=False)


def _allowed(f: dataclasses.Field) -> str:
    meta = f.metadata
    if meta['valid'] is not None:
        return meta['valid'][1]
    if meta['choices'] is not None:
        return ', '.join(repr(c) for c in meta['choices'])
    kind = 'an integer' if 'int' in str(f.type) else 'a number'
    return f'{kind} {">" if meta["strict"] else ">="} {meta["lo"]:g}'


def _ok(f: dataclasses.Field, value: Any) -> bool:
    meta = f.metadata
    if value is None and f.default is None:
        return True
    if meta['valid'] is not None:
        return meta['valid'][0](value)
    if meta['choices'] is not None:
        return value in meta['choices']
    if meta['lo'] is not None:
        return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and (value > meta['lo'] if meta['strict'] else value >= meta['lo']))
    return True


def flag_of(f: dataclasses.Field) -> str:
    """The CLI flag of an options field."""
    return f.metadata.get('flag') or '--' + f.name.replace('_', '-')


def check_options(options: RunOptions) -> None:
    """Every option's range (its field's option(...)), before any work; the CLI's flags check the same."""
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        if 'help' in f.metadata and not _ok(f, value):
            raise ConfigError(f'{flag_of(f) if f.metadata["cli"] else f.name}: got {value!r}; allowed: {_allowed(f)}')


def bounded(kind: type, minimum: float, *, strict: bool = False) -> Callable[[str], Any]:
    """An argparse type: an int (or a finite float) >= minimum, or > minimum when strict."""
    def parse(text: str):
        value = kind(text)
        if not math.isfinite(value) or value < minimum or (strict and value == minimum):
            what = 'an integer' if kind is int else 'a finite number'
            raise argparse.ArgumentTypeError(f'must be {what} {">" if strict else ">="} {minimum:g}, got {text}')
        return value
    parse.__name__ = kind.__name__  # argparse's "invalid int value" for text that is not a number
    return parse


def option_flags(cls: type) -> dict[str, dataclasses.Field]:
    """flag -> field of an options class's CLI flags."""
    return {flag_of(f): f for f in dataclasses.fields(cls) if f.metadata.get('cli')}


def add_option_flags(parser: argparse.ArgumentParser, classes: Sequence[tuple[str, type]]) -> None:
    """The flags of every (label, options class), each once. An omitted flag stays out of the namespace, so that
    the options class's own default applies; defaults that differ between the classes are said per label."""
    seen: set[str] = set()
    for _, cls in classes:
        for flag, f in option_flags(cls).items():
            if flag in seen:
                continue
            seen.add(flag)
            defaults = [(label, c.__dataclass_fields__[f.name].default) for label, c in classes
                        if f.name in c.__dataclass_fields__ and f.metadata.get('cli')]
            shown = '; '.join(f'{label} {d}' for label, d in defaults) if len({repr(d) for _, d in defaults}) > 1 \
                else str(defaults[0][1])
            where = f' (only {", ".join(label for label, _ in defaults)})' if len(defaults) < len(classes) else ''
            stated = 'default' in f.metadata['help'] or all(d is None or d is False for _, d in defaults)
            help = (f.metadata['help'] + ('' if stated else f' (default: {shown})') + where).replace('%', '%%')
            meta = f.metadata
            if meta['flag'] == '--no-' + f.name.replace('_', '-'):   # a boolean that the flag switches off
                parser.add_argument(flag, dest=f.name, action='store_false', default=argparse.SUPPRESS, help=help)
            elif 'bool' in str(f.type):
                parser.add_argument(flag, dest=f.name, action='store_true', default=argparse.SUPPRESS, help=help)
            else:
                kind = int if 'int' in str(f.type) else float if 'float' in str(f.type) else str
                arg_type = bounded(kind, meta['lo'], strict=meta['strict']) if meta['lo'] is not None else kind
                parser.add_argument(flag, dest=f.name, type=arg_type, choices=meta['choices'],
                                    default=argparse.SUPPRESS, help=help)


@dataclasses.dataclass
class RunResult:
    """How the loop ended."""

    step: int
    loss: float | None              # mean loss of the last log window
    losses: list[float]             # every step's loss in this call
    checkpoint: Path | None
    demo: Path | None
    seconds: float
    interrupted: bool
    is_main: bool


# ---------------------------------------------------------------------------------------------------------------
# Before the model: the run folder, the checkpoint to resume, accelerate and the seeds.

def make_run_dir(out_dir: str | Path, name: str) -> Path:
    """<out_dir>/<name>, created and checked writable before any work."""
    run_dir = Path(out_dir) / name
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=run_dir).close()
    except OSError as err:
        raise ConfigError(f'--out-dir {str(out_dir)!r}: cannot write the run folder {str(run_dir)!r} '
                          f'({err.strerror or err}); pass a writable --out-dir') from None
    return run_dir


@contextlib.contextmanager
def removed_if_empty_on_error(run_dir: str | Path) -> Iterator[None]:
    """Around a run: if it fails, the run folder (and the parents of it) that did not exist before are removed
    again while they are still empty, so a run that fails before training leaves no empty folder behind."""
    run_dir = Path(run_dir)
    new = [p for p in (run_dir, *run_dir.parents) if not p.exists()]   # deepest first
    try:
        yield
    except BaseException:
        for folder in new:
            try:
                folder.rmdir()   # only an empty folder: whatever the run wrote stays
            except OSError:
                break
        raise


def find_checkpoint(resume: str | Path | None, run_dir: Path) -> dict[str, Any] | None:
    """The checkpoint to resume: --resume, or (upstream's behaviour) the run folder's latest one, or None."""
    if resume is not None:
        return ckpt_lib.load_checkpoint(resume)
    if (run_dir / ckpt_lib.LATEST).exists():
        return ckpt_lib.load_checkpoint(run_dir)
    return None


def first_difference(a: Any, b: Any, prefix: str) -> str | None:
    """The first key whose values differ between a (the config) and b (the checkpoint's), as a message."""
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in sorted(set(a) | set(b)):
            diff = first_difference(a.get(key), b.get(key), f'{prefix}.{key}')
            if diff:
                return diff
        return None
    return None if a == b else f'{prefix}: {b!r} in the checkpoint, {a!r} in the config'


def check_resume(config: Mapping[str, Any], ckpt: Mapping[str, Any], batch_size: int) -> None:
    """Refuses a config whose model or guide section differs from the checkpoint's; notes a changed batch size."""
    for section in ('model', 'guide'):
        diff = first_difference(config.get(section), ckpt['config'].get(section), section)
        if diff:
            raise ConfigError(f'the config does not match the checkpoint {ckpt["path"]!r} ({diff}); resume with '
                              f'the same {section} section, or omit --config to use the checkpoint\'s')
    old_batch = ckpt['args'].get('batch_size')
    if old_batch is not None and old_batch != batch_size:
        print(f'note: --batch-size {batch_size} differs from the checkpoint\'s {old_batch}; the data '
              'order continues approximately, not exactly', file=sys.stderr)


def runs_code(dataset: Any) -> str | None:
    """What in a dataset section would run code from a file (a custom hook, CIFAR-10 pickles without their
    checksums), or None: such a section is taken from a config the user passes, never from a checkpoint."""
    if not isinstance(dataset, Mapping):
        return None
    if dataset.get('type') == 'custom':
        return f'a custom dataset hook ({str(dataset.get("location"))!r})'
    if dataset.get('type') == 'cifar10' and dataset.get('check_md5', True) is not True:
        return (f'CIFAR-10 pickle files read without their checksums ({str(dataset.get("location"))!r} with '
                'check_md5 false)')
    return None


def resolve_config(config: Any, ckpt: Mapping[str, Any] | None, options: RunOptions, *,
                   resolve: Callable[[Mapping[str, Any]], dict[str, Any]]) -> dict[str, Any]:
    """The run's config: the given one (or the resumed checkpoint's) through the caller's `resolve` (its CLI
    overrides, validation, what the config points at), checked against the checkpoint; options.seed defaults to
    the checkpoint's."""
    if config is None:
        if ckpt is None:
            raise ConfigError('no config: pass --config, or --resume a checkpoint (which carries its config)')
        config = ckpt['config']
        code = runs_code(config.get('dataset') if isinstance(config, Mapping) else None)
        if code:   # a checkpoint is data: it never chooses which code runs
            raise ConfigError(f'the checkpoint {ckpt["path"]!r} was trained on {code}, which is not loaded from a '
                              'checkpoint\'s config; pass --config with the config that names it (its model '
                              'section must match the checkpoint\'s)')
    config = resolve(config)
    if ckpt is not None:
        check_resume(config, ckpt, options.batch_size)
        if options.seed is None:
            options.seed = ckpt['args'].get('seed')
    return config


@dataclasses.dataclass
class Start:
    """What every run starts from (start()): its folder, the checkpoint it resumes, its config, accelerate."""

    run_dir: Path
    ckpt: dict[str, Any] | None
    config: dict[str, Any]
    accelerator: Any

    device = property(lambda self: self.accelerator.device)
    rank = property(lambda self: self.accelerator.process_index)
    world = property(lambda self: self.accelerator.num_processes)
    is_main = property(lambda self: self.accelerator.is_main_process)


def start(config: Any, options: RunOptions, *, resolve: Callable[[Any], dict[str, Any]],
          accelerator_options: Callable[[Mapping[str, Any]], Mapping[str, Any]] = lambda config: {}) -> Start:
    """The preamble of every run, before any model: the options' ranges, the run folder, the checkpoint to resume,
    the config (resolve_config), accelerate (make_accelerator(**accelerator_options(config))) and one seed for
    every process (options.seed)."""
    check_options(options)
    run_dir = make_run_dir(options.out_dir, options.name)
    ckpt = find_checkpoint(options.resume, run_dir)
    config = resolve_config(config, ckpt, options, resolve=resolve)
    accelerator = make_accelerator(**accelerator_options(config))
    options.seed = shared_seed(options.seed, accelerator)
    return Start(run_dir, ckpt, config, accelerator)


def make_accelerator(mixed_precision: str | None, *, find_unused_parameters: bool = False):
    """accelerate's Accelerator; several processes without CUDA (torchrun on CPUs) use gloo, never a silent
    single process. fp16 on the CPU (which accelerate would ignore) is refused."""
    import accelerate

    ddp = accelerate.DistributedDataParallelKwargs(find_unused_parameters=find_unused_parameters)
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get('WORLD_SIZE', '1')) > 1
    gpu = torch.cuda.is_available() or torch.backends.mps.is_available() or (hasattr(torch, 'xpu')
                                                                             and torch.xpu.is_available())
    if mixed_precision == 'fp16' and (multi_cpu or not gpu):
        raise ConfigError("--mixed-precision fp16 needs a GPU, and this run is on the CPU; use 'bf16' or 'no' (for a "
                          "Stable Diffusion config also model.mixed_precision)")
    try:
        accelerator = accelerate.Accelerator(kwargs_handlers=[ddp], mixed_precision=mixed_precision, cpu=multi_cpu)
    except ValueError as err:
        raise ConfigError(f'--mixed-precision {mixed_precision!r}: {err}') from None
    torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def loss_text(loss: float | None, step: int, end_step: int | None) -> str:
    """The final loss for a trainer's last line, or why there is none (no step trained in this call)."""
    if loss is not None:
        return f'loss {loss:.4g}'
    if end_step is not None and step >= end_step:
        return f'no step trained (the run was already at --end-step {end_step}; raise it to train on)'
    return 'no step trained'


def shared_seed(seed: int | None, accelerator) -> int:
    """seed, or one random seed for all processes (they share the data order)."""
    if seed is not None:
        return seed
    value = [int.from_bytes(os.urandom(4), 'little') >> 1]
    if accelerator.num_processes > 1:
        import accelerate
        accelerate.utils.broadcast_object_list(value)
    return value[0]


def seed_everything(seed: int, rank: int) -> None:
    """torch, numpy and python seeds; they differ per process (upstream), the data order does not."""
    torch.manual_seed(seed + 1_000_003 * rank)
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2 ** 32)


class StopRequest:
    """SIGINT / SIGTERM -> finish this step, save a checkpoint and return; a second SIGINT aborts.

    Use as a context manager around training and pass it as should_stop; .signum is the signal received."""

    def __init__(self, message: str = 'finishing this step and saving a checkpoint'):
        self.message, self.signum, self._previous = message, None, {}

    def __call__(self) -> bool:
        return self.signum is not None

    def _handle(self, signum, frame) -> None:
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signum = signum
        what = 'Interrupt' if signum == signal.SIGINT else signal.Signals(signum).name
        print(f'\n{what}: {self.message} (^C again to abort)', file=sys.stderr)

    def __enter__(self) -> StopRequest:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    @property
    def exit_status(self) -> int:
        """The shell's status of a process stopped by the signal (130 for SIGINT), or 0."""
        return 128 + self.signum if self.signum is not None else 0


# ---------------------------------------------------------------------------------------------------------------
# Metrics and EMA.

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


class EMA:
    """Upstream's EMA of a module's trainable parameters: averaged = decay * averaged + (1 - decay) * param, with
    decay from EMAWarmup (the config's ema_sched). Frozen parameters and buffers are the module's own."""

    def __init__(self, module: nn.Module, ema_config: Mapping[str, Any]):
        self.module, self.sched = module, make_ema_sched(ema_config)
        self.params = {n: p for n, p in module.named_parameters() if p.requires_grad}
        self.averaged = {n: p.detach().clone() for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> float:
        decay = self.sched.get_value()
        for name, param in self.params.items():
            self.averaged[name].mul_(decay).add_(param.detach(), alpha=1 - decay)
        self.sched.step()
        return decay

    @contextlib.contextmanager
    def swapped_in(self):
        """The averaged values in the module's parameters for the duration."""
        backup = {n: p.detach().clone() for n, p in self.params.items()}
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(self.averaged[n])
        try:
            yield self.module
        finally:
            with torch.no_grad():
                for n, p in self.params.items():
                    p.copy_(backup[n])

    def view(self) -> nn.Module:
        """A copy of the module that always holds the averaged values (model-guidance's teacher, docs/design.md
        section 6(b)): its trainable parameters ARE the averaged tensors (shared, so each update shows), its
        frozen weights and buffers are the module's own (shared, not copied); nothing in it takes gradients."""
        memo: dict[int, Any] = {id(b): b for b in self.module.buffers()}
        for name, param in self.module.named_parameters():
            memo[id(param)] = nn.Parameter(self.averaged[name], requires_grad=False) if name in self.averaged \
                else param
        return copy.deepcopy(self.module, memo).eval()

    def state_dict(self, full: bool) -> dict[str, torch.Tensor]:
        """The averaged parameters: with the module's frozen weights and buffers (full) or alone."""
        state = dict(self.module.state_dict()) if full else {}
        return {**state, **self.averaged}

    @torch.no_grad()
    def load_state_dict(self, state: Mapping[str, torch.Tensor], path: str) -> None:
        missing = [n for n in self.averaged if n not in state]
        if missing:
            raise CheckpointError(f'checkpoint {path!r} has no EMA value for {missing[0]!r} (and {len(missing) - 1} '
                                  'more); it was saved from another model')
        for name, value in self.averaged.items():
            value.copy_(state[name])


# ---------------------------------------------------------------------------------------------------------------
# The engine.

class Engine:
    """Optimizer, LR schedule and EMA of one model, the loop, and checkpoints that restore all of it.

    save_frozen False: checkpoints hold the trainable parameters only (the frozen base reloads from its source,
    e.g. a LoRA on Stable Diffusion). per_epoch: batches per epoch per process (the metrics' epoch column).

    A config "guide" section ({"ema_at_step": N}, or {"ema_at_fraction": f} of args' end_step, resolved when the
    run first starts): .guide becomes a CPU copy of the EMA weights after step .guide_step's update. Checkpoints
    record guide_step and, once taken, the snapshot ('guide_step', 'model_guide'), so a resumed run keeps both.
    """

    def __init__(self, accelerator, model: nn.Module, config: Mapping[str, Any], run_dir: Path, *,
                 args: Mapping[str, Any], ckpt: Mapping[str, Any] | None = None, save_frozen: bool = True,
                 per_epoch: int = 1):
        self.accelerator, self.config, self.run_dir, self.args = accelerator, config, Path(run_dir), dict(args)
        self.save_frozen, self.per_epoch = save_frozen, max(1, per_epoch)
        self.is_main = accelerator.is_main_process
        lr = config['optimizer']['lr']
        opt = make_optimizer(param_groups(model, lr), config['optimizer'], lr)
        self.sched = make_lr_scheduler(opt, config['lr_sched'])
        self.model, self.opt = accelerator.prepare(model, opt)
        self.unwrapped = accelerator.unwrap_model(self.model)
        self.params = [p for p in self.unwrapped.parameters() if p.requires_grad]
        self.ema = EMA(self.unwrapped, config['ema_sched']) if config.get('ema_sched') is not None else None
        self.step = self.batches_seen = 0
        self.checkpoint: Path | None = None
        self.resumed_step: int | None = None
        self.guide_step: int | None = None                  # resolved at the run's start, or restored
        self.guide: dict[str, torch.Tensor] | None = None   # the EMA weights at guide_step, on the CPU
        self._rng = None
        if ckpt is not None:
            self._restore(ckpt)
        self._resolve_guide_step(self.args.get('end_step'))
        if self.is_main:
            (self.run_dir / 'config.json').write_text(json.dumps(config, indent=2) + '\n')
            (self.run_dir / 'args.json').write_text(json.dumps(self.args, indent=2) + '\n')

    def _restore(self, ckpt: Mapping[str, Any]) -> None:
        path = ckpt['path']
        try:
            result = self.unwrapped.load_state_dict(ckpt['model'], strict=self.save_frozen)
        except RuntimeError as err:
            raise CheckpointError(f'checkpoint {path!r} does not fit the config\'s model: {err}') from None
        trainable = {n for n, p in self.unwrapped.named_parameters() if p.requires_grad}
        missing = sorted(trainable & set(result.missing_keys))
        if missing or result.unexpected_keys:
            raise CheckpointError(f'checkpoint {path!r} does not fit the config\'s model: missing '
                                  f'{missing[:3]}, unexpected {list(result.unexpected_keys)[:3]}')
        if self.ema is not None and ckpt['model_ema'] is not None:
            self.ema.load_state_dict(ckpt['model_ema'], path)
            self.ema.sched.load_state_dict(ckpt['ema_sched'])
        self.opt.load_state_dict(ckpt['opt'])
        self.sched.load_state_dict(ckpt['sched'])
        if ckpt.get('scaler') is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(ckpt['scaler'])
        self.step, self.batches_seen = ckpt['step'], ckpt['batches_seen']
        self.checkpoint, self.resumed_step, self._rng = Path(path), self.step, ckpt['rng']
        self.guide_step, self.guide = ckpt.get('guide_step'), ckpt.get('model_guide')   # None in older ones
        if self.guide is not None and set(self.guide) != set(self.ema.state_dict(self.save_frozen)):
            raise CheckpointError(f'checkpoint {path!r} has a guide snapshot that does not fit the config\'s model')

    def _resolve_guide_step(self, end_step: int | None) -> None:
        """guide_step from the config's guide section, once: a resumed run keeps the checkpoint's."""
        guide = self.config.get('guide')
        if guide is None or self.guide_step is not None:
            return
        if 'ema_at_step' in guide:
            self.guide_step = guide['ema_at_step']
        elif end_step is None:
            raise ConfigError(f"config key 'guide.ema_at_fraction': got {guide['ema_at_fraction']!r}, a fraction of "
                              "--end-step, which this run does not have; pass --end-step or use guide.ema_at_step")
        else:
            self.guide_step = max(1, round(guide['ema_at_fraction'] * end_step))
        if end_step is not None and self.guide_step > end_step and self.is_main:
            print(f'note: the guide snapshot step {self.guide_step} is after --end-step {end_step}; it is taken '
                  'when a resumed run reaches it', file=sys.stderr)

    @contextlib.contextmanager
    def averaged(self):
        """The unwrapped model with its EMA weights swapped in, in eval mode (demos, evaluation, exports)."""
        was_training = self.unwrapped.training
        with self.ema.swapped_in() if self.ema is not None else contextlib.nullcontext():
            self.unwrapped.eval()
            try:
                yield self.unwrapped
            finally:
                self.unwrapped.train(was_training)

    def save(self, export: Callable[[int], Any] | None = None) -> Path | None:
        """An atomic checkpoint (every process's RNG state; written by the main process), then the export."""
        import accelerate

        self.accelerator.wait_for_everyone()
        rng = [ckpt_lib.get_rng_state()]
        if self.accelerator.num_processes > 1:
            rng = accelerate.utils.gather_object(rng)
        if not self.is_main:
            return None
        module, scaler = self.unwrapped, self.accelerator.scaler
        weights = module.state_dict() if self.save_frozen else {
            n: p for n, p in module.state_dict(keep_vars=True).items()
            if isinstance(p, nn.Parameter) and p.requires_grad}
        state = {
            'config': json.dumps(self.config), 'args': json.dumps(self.args),
            'model': {n: t.detach() for n, t in weights.items()},
            'model_ema': self.ema.state_dict(self.save_frozen) if self.ema is not None else None,
            'ema_sched': self.ema.sched.state_dict() if self.ema is not None else None,
            'opt': self.opt.state_dict(), 'sched': self.sched.state_dict(),
            'scaler': scaler.state_dict() if scaler is not None else None,
            'epoch': self.batches_seen // self.per_epoch, 'batches_seen': self.batches_seen, 'rng': rng,
        }
        if self.guide_step is not None:
            state.update(guide_step=self.guide_step, model_guide=self.guide)
        self.checkpoint = ckpt_lib.save_checkpoint(self.run_dir, self.step, state)
        exported = None
        if export is not None:
            with self.averaged():
                exported = export(self.step)
        from tqdm.auto import tqdm
        paths = [p for p in (exported if isinstance(exported, (tuple, list)) else [exported]) if p is not None]
        tqdm.write(f'Saved {self.checkpoint}' + (' and ' + ', '.join(map(str, paths)) if paths else ''))
        return self.checkpoint

    def _step(self, options: RunOptions, batches: Iterator[Any], loss_fn: Callable[[Any], torch.Tensor]
              ) -> tuple[float, float, float]:
        """One optimizer step over grad_accum_steps micro-batches; (loss, grad norm, EMA decay)."""
        acc = self.accelerator
        loss_sum = torch.zeros((), device=acc.device)
        for micro in range(options.grad_accum_steps):
            batch = next(batches)
            self.batches_seen += 1
            sync = micro == options.grad_accum_steps - 1
            with contextlib.nullcontext() if sync else acc.no_sync(self.model):
                losses = loss_fn(batch)
                acc.backward(losses.mean() / options.grad_accum_steps)
            loss_sum += losses.detach().mean()
        loss = acc.gather(loss_sum[None] / options.grad_accum_steps).mean().item()
        last_good = self.checkpoint or 'none yet'
        if not math.isfinite(loss):
            raise TrainingError(
                f'the loss is {loss} at step {self.step + 1}; stopped before the optimizer step, so no weights and '
                f'no checkpoint hold non-finite values (last good checkpoint: {last_good}). '
                'Try a lower --lr, --grad-clip 1, or --mixed-precision no.')
        grad_norm = acc.clip_grad_norm_(self.params, options.grad_clip or float('inf'))
        grad_norm = float(grad_norm) if grad_norm is not None else float('nan')
        if not math.isfinite(grad_norm) and acc.scaler is None:
            raise TrainingError(f'the gradient norm is {grad_norm} at step {self.step + 1} (loss {loss:g}); stopped '
                                f'before the optimizer step (last good checkpoint: {last_good}). '
                                'Try a lower --lr or --grad-clip 1.')
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        decay = self.ema.update() if self.ema is not None else 0.
        self.step += 1
        if self.step == self.guide_step:
            self.guide = {n: t.detach().to('cpu', copy=True)
                          for n, t in self.ema.state_dict(self.save_frozen).items()}
        return loss, grad_norm, decay

    def run(self, options: RunOptions, batches: Iterator[Any], loss_fn: Callable[[Any], torch.Tensor], *,
            demo: Callable[[int], Path | None] | None = None, demo_every: int = 0,
            export: Callable[[int], Any] | None = None,
            evaluate: Callable[[int], None] | None = None, evaluate_every: int = 0,
            log: Callable[[int, dict[str, Any]], None] | None = None,
            should_stop: Callable[[], bool] | None = None) -> RunResult:
        """Trains until options.end_step (or should_stop()); loss_fn(batch) -> per-sample losses [B].

        demo(step) runs on the main process and export(step) after each checkpoint, both with the EMA weights
        swapped in; evaluate(step) runs on every process (EMA weights); log(step, values) on the main process.
        """
        from tqdm.auto import tqdm

        if self._rng is not None:  # restored last, so that building the run consumed no random numbers of it
            rng, world, rank = self._rng, self.accelerator.num_processes, self.accelerator.process_index
            if len(rng) == world:
                ckpt_lib.set_rng_state(rng[rank])
            elif self.is_main:
                print(f'note: the checkpoint has RNG states for {len(rng)} process(es), this run has {world}; '
                      'random streams restart from the seed', file=sys.stderr)
            self._rng = None
        metrics = MetricsLog(self.run_dir / 'metrics.csv', METRICS_COLUMNS, self.resumed_step) if self.is_main else None
        pbar = tqdm(total=options.end_step, initial=self.step, disable=not (self.is_main and options.progress),
                    desc=options.name, dynamic_ncols=True, smoothing=0.1, mininterval=0.5)
        start = window_start = time.time()
        window, losses, last_demo, demo_step, interrupted, loss_avg = [], [], None, None, False, None
        saved_step = self.resumed_step
        try:
            while options.end_step is None or self.step < options.end_step:
                if should_stop is not None and should_stop():
                    interrupted = True
                    break
                loss, grad_norm, decay = self._step(options, batches, loss_fn)
                step = self.step
                window.append(loss)
                losses.append(loss)
                pbar.update(1)
                pbar.set_postfix(loss=f'{loss:.4f}', refresh=False)
                values = {'loss': loss, 'lr': self.sched.get_last_lr()[0], 'ema_decay': decay, 'grad_norm': grad_norm,
                          'epoch': self.batches_seen // self.per_epoch}
                if metrics is not None and (step % options.log_every == 0 or step == options.end_step):
                    now, loss_avg = time.time(), sum(window) / len(window)
                    metrics.write({'step': step, 'epoch': values['epoch'], 'loss': f'{loss_avg:.6g}',
                                   'lr': f'{values["lr"]:.6g}', 'ema_decay': f'{decay:.6g}',
                                   'grad_norm': f'{grad_norm:.6g}',
                                   'it_per_s': f'{len(window) / max(now - window_start, 1e-9):.4g}',
                                   'elapsed_s': f'{now - start:.1f}'})
                    window, window_start = [], now
                if demo is not None and demo_every and step % demo_every == 0:
                    last_demo, demo_step = self._demo(demo) or last_demo, step
                    values['demo'] = last_demo
                if evaluate is not None and evaluate_every and step % evaluate_every == 0:
                    with self.averaged():
                        evaluate(step)
                if log is not None and self.is_main:
                    log(step, values)
                if options.save_every and step % options.save_every == 0:
                    self.save(export)
                    saved_step = step
        finally:
            pbar.close()
        if window:
            loss_avg = sum(window) / len(window)
        if saved_step != self.step and options.save_final:
            self.save(export)
        if demo is not None and demo_step != self.step:
            last_demo = self._demo(demo) or last_demo
        if metrics is not None:
            metrics.close()
        self.accelerator.wait_for_everyone()
        return RunResult(step=self.step, loss=loss_avg, losses=losses, checkpoint=self.checkpoint, demo=last_demo,
                         seconds=time.time() - start, interrupted=interrupted, is_main=self.is_main)

    def _demo(self, demo: Callable[[int], Path | None]) -> Path | None:
        if not self.is_main:
            return None
        with torch.random.fork_rng(devices=[self.accelerator.device] if self.accelerator.device.type == 'cuda'
                                   else []), self.averaged():
            return demo(self.step)
