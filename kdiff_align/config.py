"""Configs: upstream k-diffusion's JSON format plus one top-level "align" section.

load_config = upstream's load_config (defaults merged) + the align section's defaults, validated eagerly:
an unknown key, a wrong type or an out-of-range value raises ConfigError naming the key, the value and
what is allowed. Upstream's sections stay valid for upstream tools, which ignore "align".
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Mapping
from functools import partial
from pathlib import Path
from typing import Any

from torch import nn

from . import objective
from .guidance import GuidedDenoiser, check_sigma_interval
from .shipped import CONFIGS, find_config, shipped_configs

SAMPLERS = ('euler', 'euler_ancestral', 'heun', 'dpm_2', 'dpm_2_ancestral', 'lms', 'dpmpp_2s_ancestral',
            'dpmpp_sde', 'dpmpp_2m', 'dpmpp_2m_sde', 'dpmpp_3m_sde')
MODEL_TYPES = ('image_v1', 'image_transformer_v1', 'toy_mlp')
DATASET_TYPES = ('cifar10', 'imagefolder', 'imagefolder-class', 'digits', 'toy', 'custom', 'sd-captions')
SECTIONS = ('model', 'dataset', 'optimizer', 'lr_sched', 'ema_sched', 'align')

# The align section: key -> (default, what is allowed). The paper's w throughout (w = 0: no guidance).
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


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f'config key {key!r}: got {value!r}; allowed: {allowed}')


def _number(key: str, value: Any, *, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
            integer: bool = False) -> None:
    kind = 'an integer' if integer else 'a number'
    ok_type = isinstance(value, int) if integer else isinstance(value, (int, float))
    rng = f' in {"(" if lo_open else "["}{lo if lo is not None else "-inf"}, {hi if hi is not None else "inf"}]'
    if isinstance(value, bool) or not ok_type or not math.isfinite(value):
        _fail(key, value, kind + rng)
    if (lo is not None and (value < lo or (lo_open and value == lo))) or (hi is not None and value > hi):
        _fail(key, value, kind + rng)


def _choice(key: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        _fail(key, value, 'one of ' + ', '.join(repr(c) for c in choices))


def _validate_align(align: Mapping[str, Any]) -> None:
    unknown = sorted(set(align) - set(ALIGN_DEFAULTS))
    if unknown:
        raise ConfigError(f'config key {"align." + unknown[0]!r} is unknown; allowed keys in "align": '
                          + ', '.join(ALIGN_DEFAULTS))
    try:
        objective.make_guidance_scale(align['w_train'])
    except (TypeError, ValueError) as err:
        raise ConfigError(f'config key \'align.w_train\': got {align["w_train"]!r}; {err}') from None
    if align['uncond_prob'] is not None:
        _number('align.uncond_prob', align['uncond_prob'], lo=0, hi=1)
    if not isinstance(align['stop_grad_uncond'], bool):
        _fail('align.stop_grad_uncond', align['stop_grad_uncond'], 'true or false')
    _number('align.mix', align['mix'], lo=0, hi=1)
    if align['w_sample'] is not None:
        _number('align.w_sample', align['w_sample'], lo=0)
    try:
        check_sigma_interval(align['sigma_interval'])
    except ValueError as err:
        raise ConfigError(f'config key \'align.sigma_interval\': got {align["sigma_interval"]!r}; {err}') from None
    _choice('align.sampler', align['sampler'], SAMPLERS)
    _number('align.sample_steps', align['sample_steps'], lo=1, integer=True)
    if align['class_embed_dim'] is not None:
        _number('align.class_embed_dim', align['class_embed_dim'], lo=1, integer=True)


def _validate_upstream(config: Mapping[str, Any]) -> None:
    model, dataset = config['model'], config['dataset']
    _choice('model.type', model.get('type'), MODEL_TYPES)
    _number('model.input_channels', model.get('input_channels'), lo=1, integer=True)
    size = model.get('input_size')
    if model['type'] == 'toy_mlp':
        _number('model.width', model.get('width', 128), lo=1, integer=True)
        _number('model.depth', model.get('depth', 3), lo=1, integer=True)
    elif not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        _fail('model.input_size', size, 'a list of two positive integers [height, width]')
    _number('model.sigma_data', model['sigma_data'], lo=0, lo_open=True)
    _number('model.sigma_min', model.get('sigma_min'), lo=0, lo_open=True)
    _number('model.sigma_max', model.get('sigma_max'), lo=model['sigma_min'], lo_open=True)
    _choice('model.loss_config', model['loss_config'], ('karras',))
    _choice('model.loss_weighting', model['loss_weighting'], objective.WEIGHTINGS)
    if model['loss_scales'] != 1:
        _fail('model.loss_scales', model['loss_scales'], '1 (frequency-weighted losses are not supported by align)')
    if model.get('has_variance'):
        _fail('model.has_variance', model['has_variance'], 'false (variance outputs are not supported by align)')
    density = model.get('sigma_sample_density')
    if not isinstance(density, Mapping) or 'type' not in density:
        _fail('model.sigma_sample_density', density, 'a dict with a "type" (e.g. {"type": "lognormal", '
              '"mean": -1.2, "std": 1.2})')
    _choice('model.sigma_sample_density.type', density['type'],
            ('lognormal', 'loglogistic', 'loguniform', 'v-diffusion', 'cosine', 'split-lognormal',
             'cosine-interpolated'))
    _choice('dataset.type', dataset.get('type'), DATASET_TYPES)
    _number('dataset.num_classes', dataset['num_classes'], lo=0, integer=True)
    _number('dataset.cond_dropout_rate', dataset['cond_dropout_rate'], lo=0, hi=1)
    if dataset['type'] in ('cifar10', 'imagefolder', 'imagefolder-class', 'custom'):
        location = dataset.get('location')
        if not isinstance(location, str) or not location:
            _fail('dataset.location', location, f'a path, required for dataset type {dataset["type"]!r} (a folder; '
                  'for custom, a Python file relative to the config)')
    if dataset['type'] == 'digits' and (model['input_channels'] != 1 or size != [8, 8]):
        _fail('model.input_size', size, 'digits images are 1 x 8 x 8: input_size [8, 8] and input_channels 1')
    if dataset['type'] == 'toy' and (model['type'] != 'toy_mlp' or model['input_channels'] != 2):
        _fail('model.type', model['type'], 'toy data is 2-D points: model type \'toy_mlp\' with input_channels 2')
    _number('optimizer.lr', config['optimizer']['lr'], lo=0, lo_open=True)
    _choice('optimizer.type', config['optimizer']['type'], ('adamw', 'adam', 'sgd'))
    _choice('lr_sched.type', config['lr_sched']['type'], ('constant', 'inverse', 'exponential'))
    _choice('ema_sched.type', config['ema_sched']['type'], ('inverse',))


def config_path(path_or_name: str | Path) -> Path:
    """A config file from its path or a shipped config's name (kdiff_align.shipped), else a ConfigError that lists
    the shipped names."""
    path = find_config(path_or_name)
    if path is None:
        raise ConfigError(f'config file {str(path_or_name)!r} does not exist and is not the name of a shipped '
                          'config; pass the path of a JSON config or one of the shipped names: '
                          + (', '.join(shipped_configs()) or f'(none found in {CONFIGS})'))
    return path


def load_config(path_or_dict: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Upstream's load_config plus the validated "align" section (defaults merged), from a dict, a JSON file or a
    shipped config's name (config_path)."""
    from k_diffusion import config as K_config

    if isinstance(path_or_dict, Mapping):
        config = copy.deepcopy(dict(path_or_dict))
    else:
        path = config_path(path_or_dict)
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise ConfigError(f'config file {str(path)!r} is not valid JSON: {err}') from None
    if not isinstance(config, dict):
        raise ConfigError(f'a config is a JSON object with the sections {", ".join(SECTIONS)}; '
                          f'got {type(config).__name__}')
    unknown = sorted(set(config) - set(SECTIONS))
    if unknown:
        raise ConfigError(f'config section {unknown[0]!r} is unknown; allowed sections: {", ".join(SECTIONS)}')
    for section in ('model', 'dataset'):
        if not isinstance(config.get(section), dict):
            raise ConfigError(f'config section {section!r} is missing or not an object')
    if not isinstance(config.get('align', {}), dict):
        raise ConfigError(f'config section \'align\' must be an object, got {config["align"]!r}')
    align = {**ALIGN_DEFAULTS, **config.pop('align', {})}
    _choice('model.type', config['model'].get('type'), MODEL_TYPES)
    config = K_config.load_config(config)
    _validate_upstream(config)
    _validate_align(align)
    config['align'] = align
    return config


def align_section(config: Mapping[str, Any]) -> dict[str, Any]:
    """The align section with defaults resolved against the upstream sections."""
    align = dict(config['align'])
    if align['uncond_prob'] is None:
        align['uncond_prob'] = config['dataset']['cond_dropout_rate']
    if align['w_sample'] is None:
        w = objective.make_guidance_scale(align['w_train'])
        align['w_sample'] = w.mean if isinstance(w, objective.ScaleDistribution) else w
    if align['class_embed_dim'] is None:
        align['class_embed_dim'] = config['model'].get('mapping_out', 256)
    return align


def null_condition(config: Mapping[str, Any]) -> dict[str, Any]:
    """The null condition for a class-conditional config: label num_classes (upstream's convention)."""
    num_classes = config['dataset']['num_classes']
    return {'class_cond': num_classes} if num_classes else {}


def make_model(config: Mapping[str, Any]) -> nn.Module:
    """Upstream's make_model; image_v1 with num_classes > 0 gets a class embedding on mapping_cond."""
    from k_diffusion import config as K_config

    from .models import ClassConditionedModel

    num_classes = config['dataset']['num_classes']
    if config['model']['type'] == 'toy_mlp':
        from .toy import ToyMLP
        model = config['model']
        return ToyMLP(num_classes, width=model.get('width', 128), depth=model.get('depth', 3),
                      input_channels=model['input_channels'])
    if config['model']['type'] != 'image_v1' or not num_classes:
        return K_config.make_model(config)
    embed_dim = align_section(config)['class_embed_dim']
    inner_config = copy.deepcopy(dict(config))
    inner_config['model']['mapping_cond_dim'] = config['model']['mapping_cond_dim'] + embed_dim
    return ClassConditionedModel(K_config.make_model(inner_config), num_classes, embed_dim)


def make_denoiser_wrapper(config: Mapping[str, Any], **overrides: Any) -> partial:
    """A partial of AlignedDenoiser taking the inner model, like upstream's make_denoiser_wrapper."""
    align = align_section(config)
    kwargs = dict(
        sigma_data=config['model']['sigma_data'],
        weighting=config['model']['loss_weighting'],
        guidance_scale=align['w_train'],
        uncond=null_condition(config),
        uncond_prob=align['uncond_prob'],
        stop_grad_uncond=align['stop_grad_uncond'],
        mix=align['mix'],
    )
    return partial(objective.AlignedDenoiser, **{**kwargs, **overrides})


def make_guided_denoiser(config: Mapping[str, Any], denoiser: nn.Module, *, w: float | None = None,
                         uncond: Mapping[str, Any] | None = None) -> GuidedDenoiser:
    """A GuidedDenoiser at the config's sampling w (or w), with its null condition and guidance interval."""
    align = align_section(config)
    return GuidedDenoiser(denoiser, align['w_sample'] if w is None else w,
                          uncond=null_condition(config) if uncond is None else uncond,
                          sigma_interval=align['sigma_interval'])


def get_sampler(name: str):
    """The k-diffusion sampler function sample_<name>."""
    from k_diffusion import sampling

    if name not in SAMPLERS:
        raise ConfigError(f'sampler {name!r} is unknown; allowed: {", ".join(SAMPLERS)}')
    return getattr(sampling, f'sample_{name}')
