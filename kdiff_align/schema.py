"""Config validation shared by every config section: ConfigError, the checks, and the align section.

kdiff_align.config (k-diffusion models) and kdiff_align.sd.config (Stable Diffusion) both validate with these,
so that every bad value is reported the same way: the key, the value, and what is allowed.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from . import objective
from .guidance import check_sigma_interval

SAMPLERS = ('euler', 'euler_ancestral', 'heun', 'dpm_2', 'dpm_2_ancestral', 'lms', 'dpmpp_2s_ancestral',
            'dpmpp_sde', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_3m_sde')

# The align section: key -> default. The paper's w throughout (w = 0: no guidance).
ALIGN_DEFAULTS: dict[str, Any] = {
    'w_train': 2.0,              # training-time w: a number >= 0, or {"type": "uniform"|"log-uniform", ...}
    'uncond_prob': None,         # anchor fraction in [0, 1]; null: dataset.cond_dropout_rate
    'stop_grad_uncond': False,   # no gradient through F_u inside the aligned term
    'mix': 1.0,                  # L = mix L_aligned + (1 - mix) L_standard on conditional rows
    'w_sample': None,            # sampling w for demos and evaluation; null: w_train (its mean if sampled)
    'sigma_interval': None,      # [sigma_lo, sigma_hi]: guide only there (Kynkäänniemi et al. 2024)
    'sampler': 'dpmpp_2m',       # a k_diffusion.sampling.sample_* name
    'sample_steps': 32,
    'class_embed_dim': None,     # image_v1 class embedding width; null: model.mapping_out
}


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


def validate_align(align: Mapping[str, Any]) -> None:
    """Checks a complete align section (defaults merged)."""
    unknown = sorted(set(align) - set(ALIGN_DEFAULTS))
    if unknown:
        raise ConfigError(f'config key {"align." + unknown[0]!r} is unknown; allowed keys in "align": '
                          + ', '.join(ALIGN_DEFAULTS))
    try:
        objective.make_guidance_scale(align['w_train'])
    except (TypeError, ValueError) as err:
        raise ConfigError(f'config key \'align.w_train\': got {align["w_train"]!r}; {err}') from None
    if align['uncond_prob'] is not None:
        number('align.uncond_prob', align['uncond_prob'], lo=0, hi=1)
    if not isinstance(align['stop_grad_uncond'], bool):
        fail('align.stop_grad_uncond', align['stop_grad_uncond'], 'true or false')
    number('align.mix', align['mix'], lo=0, hi=1)
    if align['w_sample'] is not None:
        number('align.w_sample', align['w_sample'], lo=0)
    try:
        check_sigma_interval(align['sigma_interval'])
    except ValueError as err:
        raise ConfigError(f'config key \'align.sigma_interval\': got {align["sigma_interval"]!r}; {err}') from None
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
    import copy

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
