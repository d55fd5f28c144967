"""The teachers of the teacher-target objectives (docs/design.md section 6(b)): distillation's frozen model,
loaded from align.teacher and checked against the student's config, and model-guidance's EMA view."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from ..core import registry
from ..storage.checkpoint import load_for_inference
from ..config import load_config, make_model
from ..errors import fail
_TRAINING_ONLY = {'sigma_sample_density', 'loss_weighting', 'loss_config', 'loss_scales', 'dropout_rate',
                  'augment_prob'}


def make_teacher(config: Mapping[str, Any], device: torch.device | str = 'cpu') -> nn.Module:
    """distill's teacher: the raw network F of align.teacher (a checkpoint, run folder or export), frozen and
    in eval mode. A teacher of another architecture, data or objective is refused with a ConfigError."""
    path = config['align']['teacher']
    teacher_config, state = load_for_inference(path)
    teacher_config = load_config(teacher_config)
    problems = [f'model.{k}' for k in sorted(set(config['model']) | set(teacher_config['model']))
                if k not in _TRAINING_ONLY and config['model'].get(k) != teacher_config['model'].get(k)]
    problems += [f'dataset.{k}' for k in ('type', 'num_classes', 'location')
                 if config['dataset'].get(k) != teacher_config['dataset'].get(k)]
    if registry.of(teacher_config).sampling != 'cfg':   # a frozen teacher: a model that samples with CFG
        problems.append(f'align.objective ({teacher_config["align"]["objective"]!r}; a teacher samples with CFG: '
                        'a standard or aligned model)')
    if problems:
        first = problems[0].split(' ')[0]
        section, key = first.split('.', 1)
        mine, theirs = config[section].get(key), teacher_config[section].get(key)
        fail('align.teacher', path, f'a standard or aligned model of this config\'s architecture and data; the '
             f'teacher differs in {", ".join(problems)} (e.g. {first}: teacher {theirs!r}, student {mine!r})')
    teacher = make_model(teacher_config)
    try:
        teacher.load_state_dict(state)
    except RuntimeError as err:
        fail('align.teacher', path, f'weights that fit the model of its own config ({str(err).splitlines()[0]})')
    return teacher.to(device).eval().requires_grad_(False)


def make_objective_teacher(config: Mapping[str, Any], ema: Any, device: torch.device | str = 'cpu', *,
                           wrap: Callable[[nn.Module], nn.Module] | None = None) -> nn.Module | None:
    """The teacher of the config's objective for a training run: distill's frozen model (make_teacher), mg's EMA
    of the model being trained (ema: the run's engine.EMA; a view that follows every update), or None (mg
    "online": the current weights under no_grad). wrap turns a network into what the objective calls (Stable
    Diffusion: its DDPM denoiser)."""
    align, kind = config['align'], registry.of(config).teacher
    teacher = None
    if kind == 'frozen':
        teacher = make_teacher(config, device)
    elif kind == 'ema' and align['teacher'] == 'ema':
        if ema is None:
            fail('align.teacher', 'ema', "'online' when the config has no ema_sched (the EMA teacher needs the EMA "
                 'model)')
        teacher = ema.view()
    return teacher if teacher is None or wrap is None else wrap(teacher)
