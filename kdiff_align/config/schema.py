"""Config validation shared by every config section: the checks (kdiff_align.errors) and the align section.

kdiff_align.config (k-diffusion models) and kdiff_align.config.sd (Stable Diffusion) both validate with these,
so that every bad value is reported the same way: the key, the value, and what is allowed.
"""

from __future__ import annotations

import copy
import difflib
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..core import registry
from ..errors import ConfigError, choice, fail, number  # noqa: F401 (re-exported)
from ..core.registry import KNOBS, check_sigma_interval

SAMPLERS = ('euler', 'euler_ancestral', 'heun', 'dpm_2', 'dpm_2_ancestral', 'lms', 'dpmpp_2s_ancestral',
            'dpmpp_sde', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_3m_sde')

# The align section: key -> default. The paper's w throughout (w = 0: no guidance).
ALIGN_DEFAULTS: dict[str, Any] = {
    'objective': 'aligned',      # a registered objective: aligned | gft | mg | distill (docs/design.md 6)
    'w_train': None,             # training-time w: a number >= 0, or {"type": "uniform"|"log-uniform", ...};
                                 # null: the objective's default (registry.Spec.w_train_default)
    # The objectives' own knobs (registry.KNOBS, which hold their defaults and checks; the Specs say whose):
    'teacher': KNOBS['teacher'].default,         # mg: "ema" (default) or "online"; distill: a checkpoint, run
                                                 # folder or export
    'warmup_steps': KNOBS['warmup_steps'].default,   # mg: steps with the standard loss first
    'target_sigma_range': KNOBS['target_sigma_range'].default,   # mg / distill: [sigma_lo, sigma_hi], the
                                                 # training-time noise range where the teacher target applies
    'uncond_prob': None,         # anchor fraction in [0, 1]; null: dataset.cond_dropout_rate
    'stop_grad_uncond': KNOBS['stop_grad_uncond'].default,   # aligned: no gradient through F_u
    'mix': KNOBS['mix'].default,   # aligned: L = mix L_aligned + (1 - mix) L_standard on conditional rows
    'w_sample': None,            # sampling w for demos and evaluation; null: w_train (its mean if sampled)
    'sigma_interval': None,      # [sigma_lo, sigma_hi]: the sampling-time guidance interval (Kynkäänniemi 2024)
    'sampler': 'dpmpp_2m',       # a k_diffusion.sampling.sample_* name
    'sample_steps': 32,
    'class_embed_dim': None,     # image_v1 class embedding width; null: model.mapping_out
}


assert set(KNOBS) <= set(ALIGN_DEFAULTS), 'every knob is an align key'


def objectives() -> tuple[str, ...]:
    """The registered objectives (align.objective's choices)."""
    return registry.names()


def resolve_align(raw: Mapping[str, Any] | None) -> dict[str, Any]:
    """A user's align section with ALIGN_DEFAULTS and its objective's defaults merged, validated."""
    if raw is not None and not isinstance(raw, Mapping):
        raise ConfigError(f'config section \'align\' must be an object, got {raw!r}')
    align = {**ALIGN_DEFAULTS, **(raw or {})}
    choice('align.objective', align['objective'], objectives())
    spec = registry.get(align['objective'])
    if align['w_train'] is None:
        align['w_train'] = copy.deepcopy(spec.w_train_default)
    if spec.teacher == 'ema' and align['teacher'] is None:
        align['teacher'] = 'ema'
    validate_align(align)
    return align


def refuse_unknown_keys(section: str, given: Mapping[str, Any], allowed: Sequence[str]) -> None:
    """ConfigError naming the first key of `given` not in `allowed`, with the closest allowed one and the list."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f' (did you mean {section + "." + close[0]!r}?)' if close else ''
        raise ConfigError(f'config key {section + "." + unknown[0]!r} is unknown{hint}; allowed keys in '
                          f'"{section}": ' + ', '.join(allowed))


def validate_align(align: Mapping[str, Any]) -> None:
    """Checks a complete align section (defaults merged, resolve_align)."""
    refuse_unknown_keys('align', align, ALIGN_DEFAULTS)
    choice('align.objective', align['objective'], objectives())
    spec = registry.get(align['objective'])
    try:
        w_train = registry.make_w(align['w_train'])
    except (TypeError, ValueError) as err:
        raise ConfigError(f'config key \'align.w_train\': got {align["w_train"]!r}; {err}') from None
    if spec.w_train_ok is not None and not spec.w_train_ok(w_train):
        fail('align.w_train', align['w_train'], spec.w_train_rule)
    if align['uncond_prob'] is not None:
        number('align.uncond_prob', align['uncond_prob'], lo=0, hi=1)
    for key, knob in KNOBS.items():   # every knob's value is checked; only its objectives may change it
        if knob.check is not None:
            knob.check(f'align.{key}', align[key])
        if key not in spec.knobs and align[key] != knob.default:
            owners = ' and '.join(f'"{n}"' for n in registry.names() if key in registry.get(n).knobs)
            fail(f'align.{key}', align[key], f'{knob.off} for objective {spec.name!r}; it is a knob of objective '
                 f'{owners or "none"} ({knob.purpose})')
    if spec.check is not None:
        spec.check(align)
    try:
        check_sigma_interval(align['sigma_interval'])
    except ValueError as err:
        raise ConfigError(f'config key \'align.sigma_interval\': got {align["sigma_interval"]!r}; {err}') from None
    if align['w_sample'] is not None:
        number('align.w_sample', align['w_sample'], lo=0)
    choice('align.sampler', align['sampler'], SAMPLERS)
    number('align.sample_steps', align['sample_steps'], lo=1, integer=True)
    if align['class_embed_dim'] is not None:
        number('align.class_embed_dim', align['class_embed_dim'], lo=1, integer=True)


GUIDE_KEYS = ('ema_at_step', 'ema_at_fraction')
GUIDE_ALLOWED = ('exactly one of "ema_at_step" (a step >= 1) or "ema_at_fraction" (a fraction of --end-step in '
                 '(0, 1])')


def resolve_guide(raw: Any, objective: str) -> dict[str, Any] | None:
    """The top-level "guide" section, validated: {"ema_at_step": N} or {"ema_at_fraction": f}, the step at
    which the training engine keeps the EMA weights as a guide for autoguidance; None when absent (or null)."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        fail('guide', raw, 'an object with ' + GUIDE_ALLOWED)
    refuse_unknown_keys('guide', raw, GUIDE_KEYS)
    if len(raw) != 1:
        fail('guide', dict(raw), GUIDE_ALLOWED)
    if 'ema_at_step' in raw:
        number('guide.ema_at_step', raw['ema_at_step'], lo=1, integer=True)
    else:
        number('guide.ema_at_fraction', raw['ema_at_fraction'], lo=0, hi=1, lo_open=True)
    if registry.get(objective).one_pass:
        fail('guide', dict(raw), f'no guide section for objective {objective!r}: autoguidance takes standard or '
             'aligned models, and a one-pass (gft, mg, distill) model is no plain conditional denoiser')
    return dict(raw)


def is_sd_config(config: Mapping[str, Any]) -> bool:
    """Whether a raw or loaded config is a Stable Diffusion fine-tuning config (model.type "stable_diffusion")."""
    model = config.get('model') if isinstance(config, Mapping) else None
    return isinstance(model, Mapping) and model.get('type') == 'stable_diffusion'


def config_path(path_or_name: str | Path) -> Path:
    """A config file from its path or a shipped config's name (kdiff_align.config.shipped), else a ConfigError that
    lists the shipped names."""
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
