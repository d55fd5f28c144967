"""Config validation shared by every config section: ConfigError, the checks, and the align section.

kdiff_align.config (k-diffusion models) and kdiff_align.sd.config (Stable Diffusion) both validate with these,
so that every bad value is reported the same way: the key, the value, and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import objective
from .objective import OBJECTIVES, ONE_PASS, TELLS_W  # noqa: F401 (re-exported)
from .guidance import check_sigma_interval

SAMPLERS = ('euler', 'euler_ancestral', 'heun', 'dpm_2', 'dpm_2_ancestral', 'lms', 'dpmpp_2s_ancestral',
            'dpmpp_sde', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_3m_sde')

# The align section: key -> default. The paper's w throughout (w = 0: no guidance).
ALIGN_DEFAULTS: dict[str, Any] = {
    'objective': 'aligned',      # aligned | gft | mg | distill (docs/design.md section 6)
    'w_train': None,             # training-time w: a number >= 0, or {"type": "uniform"|"log-uniform", ...};
                                 # null: the objective's default (W_TRAIN_DEFAULTS)
    'teacher': None,             # mg: "ema" (default) or "online"; distill: a checkpoint, run folder or export
    'warmup_steps': 0,           # mg: steps with the standard loss before the guided target applies
    'target_sigma_range': None,  # mg / distill: [sigma_lo, sigma_hi] where the guided target applies
    'uncond_prob': None,         # anchor fraction in [0, 1]; null: dataset.cond_dropout_rate
    'stop_grad_uncond': False,   # no gradient through F_u inside the aligned term
    'mix': 1.0,                  # L = mix L_aligned + (1 - mix) L_standard on conditional rows
    'w_sample': None,            # sampling w for demos and evaluation; null: w_train (its mean if sampled)
    'sigma_interval': None,      # [sigma_lo, sigma_hi]: guide only there (Kynkäänniemi et al. 2024)
    'sampler': 'dpmpp_2m',       # a k_diffusion.sampling.sample_* name
    'sample_steps': 32,
    'class_embed_dim': None,     # image_v1 class embedding width; null: model.mapping_out
}


W_TRAIN_DEFAULTS: dict[str, Any] = {
    'aligned': 2.0,
    'gft': {'type': 'uniform', 'min_value': 0.0, 'max_value': 4.0},
    'mg': 0.45,                  # the MG paper's w; its one pass samples CFG at w / (1 - w)
    'distill': {'type': 'uniform', 'min_value': 0.0, 'max_value': 4.0},
}
MG_TEACHERS = ('ema', 'online')


class ConfigError(ValueError):
    """A config value that is missing, of the wrong type or out of range."""


def fail(key: str, value: Any, allowed: str) -> None:
    """Raises ConfigError for config key `key`."""
    raise ConfigError(f'config key {key!r}: got {value!r}; allowed: {allowed}')


def number(key: str, value: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
           integer: bool = False) -> None:
    """Checks a finite number (or integer) in [lo, hi] ((lo, hi] when lo_open)."""
    kind = 'an integer' if integer else 'a number'
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    rng = f' in {"(" if lo_open else "["}{lo if lo is not None else "-inf"}, {hi if hi is not None else "inf"}]'
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        fail(key, value, kind + rng)
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        fail(key, value, kind + rng)


def choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    """Checks that value is one of choices."""
    if value not in choices:
        fail(key, value, 'one of ' + ', '.join(repr(c) for c in choices))


def resolve_align(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """A user's align section with ALIGN_DEFAULTS and its objective's defaults merged, validated."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f'config section \'align\' must be an object, got {raw!r}')
    align = {**ALIGN_DEFAULTS, **(raw or {})}
    choice('align.objective', align['objective'], OBJECTIVES)
    if align['w_train'] is None:
        align['w_train'] = copy.deepcopy(W_TRAIN_DEFAULTS[align['objective']])
    if align['objective'] == 'mg' and align['teacher'] is None:
        align['teacher'] = 'ema'
    validate_align(align)
    return align


def validate_align(align: Mapping[str, Any]) -> None:
    """Checks a complete align section (defaults merged, resolve_align)."""
    unknown = sorted(set(align) - set(ALIGN_DEFAULTS))
    if unknown:
        close = difflib.get_close_matches(unknown[0], ALIGN_DEFAULTS, n=1)
        hint = f' (did you mean {"align." + close[0]!r}?)' if close else ''
        raise ConfigError(f'config key {"align." + unknown[0]!r} is unknown{hint}; allowed keys in "align": '
                          + ', '.join(ALIGN_DEFAULTS))
    kind = align['objective']
    choice('align.objective', kind, OBJECTIVES)
    try:
        w_train = objective.make_guidance_scale(align['w_train'])
    except (TypeError, ValueError) as err:
        raise ConfigError(f'config key \'align.w_train\': got {align["w_train"]!r}; {err}') from None
    if kind == 'mg' and not (isinstance(w_train, float) and w_train < 1):
        fail('align.w_train', align['w_train'], 'a number in [0, 1) for objective "mg" (its one pass samples CFG '
             'at w / (1 - w))')
    if align['uncond_prob'] is not None:
        number('align.uncond_prob', align['uncond_prob'], lo=0, hi=1)
    if not isinstance(align['stop_grad_uncond'], bool):
        fail('align.stop_grad_uncond', align['stop_grad_uncond'], 'true or false')
    number('align.mix', align['mix'], lo=0, hi=1)
    for key in ('stop_grad_uncond', 'mix'):   # knobs of the aligned loss only
        if kind != 'aligned' and align[key] != ALIGN_DEFAULTS[key]:
            fail(f'align.{key}', align[key], f'{ALIGN_DEFAULTS[key]!r} (the default) for objective {kind!r}; '
                 'it is a knob of objective "aligned"')
    teacher = align['teacher']
    if kind == 'mg':
        choice('align.teacher', teacher, MG_TEACHERS)
    elif kind == 'distill':
        if not isinstance(teacher, str) or not teacher:
            fail('align.teacher', teacher, 'for objective "distill", the path of the teacher: a training checkpoint '
                 '(.pth), its run folder or a .safetensors export of a standard or aligned model of the same data')
    elif teacher is not None:
        fail('align.teacher', teacher, f'null for objective {kind!r} (only "mg" and "distill" have a teacher)')
    number('align.warmup_steps', align['warmup_steps'], lo=0, integer=True)
    if kind != 'mg' and align['warmup_steps']:
        fail('align.warmup_steps', align['warmup_steps'], f'0 for objective {kind!r} (a warm-up of objective "mg")')
    for key in ('sigma_interval', 'target_sigma_range'):
        try:
            check_sigma_interval(align[key])
        except ValueError as err:
            raise ConfigError(f'config key \'align.{key}\': got {align[key]!r}; {err}') from None
    if kind not in ('mg', 'distill') and align['target_sigma_range'] is not None:
        fail('align.target_sigma_range', align['target_sigma_range'], f'null for objective {kind!r} (it applies '
             'to the teacher target of "mg" and "distill")')
    if align['w_sample'] is not None:
        number('align.w_sample', align['w_sample'], lo=0)
    choice('align.sampler', align['sampler'], SAMPLERS)
    number('align.sample_steps', align['sample_steps'], lo=1, integer=True)
    if align['class_embed_dim'] is not None:
        number('align.class_embed_dim', align['class_embed_dim'], lo=1, integer=True)


def config_path(path_or_name: str | Path) -> Path:
    """A config file from its path or a shipped config's name (kdiff_align.shipped), else a ConfigError that lists
    the shipped names."""
    from .shipped import CONFIGS, find_config, shipped_configs

    path = find_config(path_or_name)
    if path is None:
        raise ConfigError(f'config file {str(path_or_name)!r} does not exist and is not the name of a shipped '
                          'config; pass the path of a JSON config or one of the shipped names: '
                          + (', '.join(shipped_configs()) or f'(none found in {CONFIGS})'))
    return path


def read_config(path_or_dict: str | Path | Mapping[str, Any], sections: tuple[str, ...]
                ) -> tuple[dict[str, Any], Path]:
    """(a copy of the raw JSON object, the folder that relative paths in it are relative to)."""

    base = Path('.')
    if isinstance(path_or_dict, Mapping):
        raw = copy.deepcopy(dict(path_or_dict))
    else:
        path = config_path(path_or_dict)
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f'config file {str(path)!r} is not valid JSON: {err}') from None
        base = path.parent
    if not isinstance(raw, dict):
        raise ConfigError(f'a config is a JSON object with the sections {", ".join(sections)}; '
                          f'got {type(raw).__name__}')
    unknown = sorted(set(raw) - set(sections))
    if unknown:
        raise ConfigError(f'config section {unknown[0]!r} is unknown; allowed sections: {", ".join(sections)}')
    return raw, base
