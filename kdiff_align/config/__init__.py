"""Configs: upstream k-diffusion's JSON format plus one top-level "align" section (and an optional "guide" section:
the training engine's guide snapshot for autoguidance, schema.resolve_guide).

load_config = upstream's load_config (defaults merged) + the align section's defaults, validated eagerly:
an unknown key, a wrong type or an out-of-range value raises ConfigError naming the key, the value and
what is allowed. Upstream's sections stay valid for upstream tools, which ignore "align".
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core import objective, registry
from ..errors import ConfigError, choice, fail, number  # noqa: F401 (re-exported)
from ..core.guidance import guided_denoiser
from .schema import (ALIGN_DEFAULTS, SAMPLERS, config_path, is_sd_config, read_config, resolve_align,  # noqa: F401
                     resolve_guide, validate_align)

__all__ = ['ALIGN_DEFAULTS', 'SAMPLERS', 'ConfigError', 'load_config', 'align_section', 'null_condition',
           'build_denoiser', 'make_model', 'make_denoiser_wrapper', 'make_guided_denoiser', 'get_sampler',
           'mg_effective_w', 'w_range']

MODEL_TYPES = ('image_v1', 'image_transformer_v1', 'toy_mlp')
DATASET_TYPES = ('cifar10', 'imagefolder', 'imagefolder-class', 'digits', 'toy', 'custom', 'sd-captions')
SECTIONS = ('model', 'dataset', 'optimizer', 'lr_sched', 'ema_sched', 'align', 'guide')


def _validate_upstream(config: Mapping[str, Any]) -> None:
    model, dataset = config['model'], config['dataset']
    choice('model.type', model.get('type'), MODEL_TYPES)
    number('model.input_channels', model.get('input_channels'), lo=1, integer=True)
    size = model.get('input_size')
    if model['type'] == 'toy_mlp':
        number('model.width', model.get('width', 128), lo=1, integer=True)
        number('model.depth', model.get('depth', 3), lo=1, integer=True)
    elif not (isinstance(size, list) and len(size) == 2 and all(isinstance(s, int) and s > 0 for s in size)):
        fail('model.input_size', size, 'a list of two positive integers [height, width]')
    number('model.sigma_data', model['sigma_data'], lo=0, lo_open=True)
    number('model.sigma_min', model.get('sigma_min'), lo=0, lo_open=True)
    number('model.sigma_max', model.get('sigma_max'), lo=model['sigma_min'], lo_open=True)
    choice('model.loss_config', model['loss_config'], ('karras',))
    choice('model.loss_weighting', model['loss_weighting'], objective.WEIGHTINGS)
    if model['loss_scales'] != 1:
        fail('model.loss_scales', model['loss_scales'], '1 (frequency-weighted losses are not supported by align)')
    if model.get('has_variance'):
        fail('model.has_variance', model['has_variance'], 'false (variance outputs are not supported by align)')
    density = model.get('sigma_sample_density')
    if not isinstance(density, Mapping) or 'type' not in density:
        fail('model.sigma_sample_density', density, 'a dict with a "type" (e.g. {"type": "lognormal", '
              '"mean": -1.2, "std": 1.2})')
    choice('model.sigma_sample_density.type', density['type'],
            ('lognormal', 'loglogistic', 'loguniform', 'v-diffusion', 'cosine', 'split-lognormal',
             'cosine-interpolated'))
    choice('dataset.type', dataset.get('type'), DATASET_TYPES)
    number('dataset.num_classes', dataset['num_classes'], lo=0, integer=True)
    number('dataset.cond_dropout_rate', dataset['cond_dropout_rate'], lo=0, hi=1)
    if dataset['type'] in ('cifar10', 'imagefolder', 'imagefolder-class', 'custom'):
        location = dataset.get('location')
        if not isinstance(location, str) or not location:
            fail('dataset.location', location, f'a path, required for dataset type {dataset["type"]!r} (a folder; '
                  'for custom, a Python file relative to the config)')
    if dataset['type'] == 'digits' and (model['input_channels'] != 1 or size != [8, 8]):
        fail('model.input_size', size, 'digits images are 1 x 8 x 8: input_size [8, 8] and input_channels 1')
    if dataset['type'] == 'toy' and (model['type'] != 'toy_mlp' or model['input_channels'] != 2):
        fail('model.type', model['type'], 'toy data is 2-D points: model type \'toy_mlp\' with input_channels 2')
    if model['type'] == 'toy_mlp' and dataset['type'] != 'toy':
        fail('model.type', model['type'], f'image_v1 or image_transformer_v1 (with model.input_size) for dataset type '
             f'{dataset["type"]!r}; toy_mlp takes the 2-D points of dataset type \'toy\'')
    number('optimizer.lr', config['optimizer']['lr'], lo=0, lo_open=True)
    choice('optimizer.type', config['optimizer']['type'], ('adamw', 'adam', 'sgd'))
    choice('lr_sched.type', config['lr_sched']['type'], ('constant', 'inverse', 'exponential'))
    choice('ema_sched.type', config['ema_sched']['type'], ('inverse',))


def load_config(path_or_dict: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Upstream's load_config plus the validated "align" section (defaults merged); a Stable Diffusion config
    (model.type "stable_diffusion") loads with kdiff_align.config.sd's schema. The one facade over both
    schemas: nothing else dispatches between them."""
    raw, base = read_config(path_or_dict, SECTIONS)
    if is_sd_config(raw):
        from . import sd as sd_config

        return sd_config.make_config(raw, base)
    return _load_kdiffusion_config(raw)


def _load_kdiffusion_config(raw: dict[str, Any]) -> dict[str, Any]:
    from k_diffusion import config as K_config

    for section in ('model', 'dataset'):
        if not isinstance(raw.get(section), dict):
            raise ConfigError(f'config section {section!r} is missing or not an object')
    align = resolve_align(raw.pop('align', None))
    guide = resolve_guide(raw.pop('guide', None), align['objective'])
    choice('model.type', raw['model'].get('type'), MODEL_TYPES + ('stable_diffusion',))
    config = K_config.load_config(raw)
    _validate_upstream(config)
    if registry.get(align['objective']).needs_classes and not config['dataset']['num_classes']:
        fail('align.objective', align['objective'], ' or '.join(
            f'"{n}"' for n in registry.names() if not registry.get(n).needs_classes) + ' for an unconditional '
            'model (dataset.num_classes 0): the guided objectives need classes and their null condition')
    config['align'] = align
    if guide is not None:   # only when given: configs without it stay as they were
        config['guide'] = guide
    return config


def apply_overrides(config: str | Path | Mapping[str, Any], *, lr: float | None = None,
                    w_train: float | None = None, w_sample: float | None = None,
                    mixed_precision: str | None = None) -> dict[str, Any]:
    """A config (path, shipped name, raw or loaded dict) with a training run's overrides (--lr, --w-train,
    --w-sample and, for a Stable Diffusion config, --mixed-precision), loaded and validated."""
    config = copy.deepcopy(dict(config if isinstance(config, Mapping) else load_config(config)))
    if lr is not None:
        config['optimizer']['lr'] = lr
    if w_train is not None:
        config['align']['w_train'] = w_train
    if w_sample is not None:
        config['align']['w_sample'] = w_sample
    if mixed_precision is not None and is_sd_config(config):
        config['model']['mixed_precision'] = mixed_precision
    return load_config(config)


def align_section(config: Mapping[str, Any]) -> dict[str, Any]:
    """The align section with defaults resolved against the upstream sections and the objective: w_sample
    defaults to the w the model was trained for (gft / distill: the mean of the w range; mg: its effective
    guidance w / (1 - w))."""
    align = dict(config['align'])
    if align['uncond_prob'] is None:
        align['uncond_prob'] = config['dataset']['cond_dropout_rate']
    if align['w_sample'] is None:
        align['w_sample'] = registry.get(align['objective']).default_w_sample(align['w_train'])
    if align['class_embed_dim'] is None:
        align['class_embed_dim'] = config['model'].get('mapping_out', 256)
    return align


def w_range(config: Mapping[str, Any]) -> tuple[float, float]:
    """The w range the config's model was trained for ([w, w] for a fixed w; mg: its effective w): Spec.w_range."""
    return registry.of(config).w_range(config['align']['w_train'])


mg_effective_w = registry.mg_effective_w


def null_condition(config: Mapping[str, Any]) -> dict[str, Any]:
    """The null condition for a class-conditional config: label num_classes (upstream's convention)."""
    num_classes = config['dataset']['num_classes']
    return {'class_cond': num_classes} if num_classes else {}


def make_model(config: Mapping[str, Any]) -> nn.Module:
    """Upstream's make_model; image_v1 with num_classes > 0 gets a class embedding on mapping_cond, and the
    objectives that tell the network w (gft, distill) add a zero-initialised w embedding (docs/design.md
    section 6)."""
    from k_diffusion import config as K_config

    from ..core.models import ClassConditionedModel, GuidanceToldTransformer

    num_classes = config['dataset']['num_classes']
    told = registry.of(config).tells_w
    model_type = config['model']['type']
    if model_type == 'toy_mlp':
        from ..data.toy import ToyMLP
        model = config['model']
        return ToyMLP(num_classes, width=model.get('width', 128), depth=model.get('depth', 3),
                      input_channels=model['input_channels'], guidance_embed=told)
    if model_type == 'image_transformer_v1':
        model = K_config.make_model(config)
        return GuidanceToldTransformer(model) if told else model
    if model_type != 'image_v1' or not num_classes:
        return K_config.make_model(config)
    embed_dim = align_section(config)['class_embed_dim']
    inner_config = copy.deepcopy(dict(config))
    inner_config['model']['mapping_cond_dim'] = config['model']['mapping_cond_dim'] + embed_dim
    return ClassConditionedModel(K_config.make_model(inner_config), num_classes, embed_dim, guidance_embed=told)


def make_denoiser_wrapper(config: Mapping[str, Any], *, teacher: nn.Module | None = None,
                          steps_done: Callable[[], int] | None = None, **overrides: Any) -> partial:
    """A partial of the config's objective taking the inner model, like upstream's make_denoiser_wrapper: the
    family's loss (objective.GuidanceObjective; AlignedDenoiser for "aligned") with the objective's knobs.
    teacher: a teacher-target objective's teacher (mg: None is the model's own current weights, "online";
    distill: None is a wrapper that samples but cannot train); kdiff_align.training.teachers builds both. steps_done:
    the training loop's optimizer steps, which end a warm-up (align.warmup_steps; without them, a wrapper for
    sampling, none)."""
    align = align_section(config)
    spec = registry.get(align['objective'])
    kwargs = dict(
        sigma_data=config['model'].get('sigma_data', 1.),   # DDPM wrappers (Stable Diffusion) have their own
        weighting=config['model']['loss_weighting'],
        objective=spec.name,
        w_train=align['w_train'],
        uncond=null_condition(config),
        uncond_prob=align['uncond_prob'],
        teacher=teacher,
        steps_done=steps_done,
    )
    knobs = {'stop_grad_uncond': align['stop_grad_uncond'], 'mix': align['mix'],
             'target_sigma_range': align['target_sigma_range'],
             'warmup_steps': align['warmup_steps'] if steps_done is not None else 0}   # no loop, no warm-up
    kwargs.update({k: v for k, v in knobs.items() if k in spec.knobs})
    if 'guidance_scale' in overrides:   # the older name of w_train
        overrides['w_train'] = overrides.pop('guidance_scale')
    return partial(objective.GuidanceObjective, **{**kwargs, **overrides})


def build_denoiser(config: Mapping[str, Any], state_dict: Mapping[str, torch.Tensor] | None = None,
                   device: str | torch.device = 'cpu') -> nn.Module:
    """The config's AlignedDenoiser (for its forward, the Karras denoiser D) with state_dict loaded, in eval."""
    inner = make_model(config)
    if state_dict is not None:
        try:
            inner.load_state_dict(state_dict)
        except RuntimeError as err:
            raise ConfigError(f'the weights do not match the model of their config: {err}') from None
    return make_denoiser_wrapper(config)(inner).to(device).eval().requires_grad_(False)


def make_guided_denoiser(config: Mapping[str, Any], denoiser: nn.Module, *, w: float | None = None,
                         uncond: Mapping[str, Any] | None = None) -> nn.Module:
    """A k-diffusion denoiser sampling the config's model at the paper's w (default align.w_sample): two-pass CFG
    for aligned and standard models, one network evaluation per step for gft, mg and distill
    (guidance.guided_denoiser; a ConfigError for a w outside a one-pass model's trained range)."""
    align = align_section(config)
    try:
        return guided_denoiser(denoiser, align['objective'], float(align['w_sample'] if w is None else w),
                               w_range=w_range(config),
                               uncond=null_condition(config) if uncond is None else uncond,
                               sigma_interval=align['sigma_interval'])
    except ValueError as err:
        raise ConfigError(str(err)) from None


def get_sampler(name: str):
    """The k-diffusion sampler function sample_<name>."""
    from k_diffusion import sampling

    if name not in SAMPLERS:
        raise ConfigError(f'sampler {name!r} is unknown; allowed: {", ".join(SAMPLERS)}')
    return getattr(sampling, f'sample_{name}')
