"""Stable Diffusion fine-tuning configs: upstream's JSON sections with model.type "stable_diffusion".

load_config merges defaults and validates the schema (no file access); check_inputs then validates what the
config points at (weights folder, scheduler prediction type, resolution against the VAE and UNet, captions
for every image) by reading JSON configs only, so every bad input fails before a model is loaded. Both raise
ConfigError naming the key or file, the value and what would be right.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core import objective, registry
from ..errors import ConfigError, choice, fail, number
from .schema import is_sd_config, read_config, resolve_align, validate_align  # noqa: F401 (is_sd_config re-exported)

SECTIONS = ('model', 'dataset', 'optimizer', 'lr_sched', 'ema_sched', 'align')
PREDICTIONS = ('epsilon', 'v_prediction')
MIXED_PRECISIONS = ('no', 'fp16', 'bf16')
CAPTION_LAYOUTS = ('.txt', 'metadata.jsonl')  # or any other sidecar extension such as '.caption'
IMAGE_EXTS = ('.png', '.jpg', '.jpeg', '.webp', '.bmp')
SINGLE_FILE_EXTS = ('.safetensors', '.ckpt')
COMPONENTS = ('unet', 'vae', 'text_encoder', 'tokenizer', 'scheduler')

LORA_DEFAULTS: dict[str, Any] = {
    'rank': 16,              # LoRA rank r
    'alpha': 16,             # LoRA alpha: the update is (alpha / r) B A
    'dropout': 0.0,
    'target_modules': ['to_q', 'to_k', 'to_v', 'to_out.0'],  # the UNet's attention projections
}
MODEL_DEFAULTS: dict[str, Any] = {
    'type': 'stable_diffusion',
    'pretrained': None,               # a local diffusers folder, or a single .safetensors/.ckpt checkpoint
    'pretrained_config': None,        # single file only: a diffusers folder (or hub id) with the component configs
    'prediction': None,               # 'epsilon' | 'v_prediction'; null: the scheduler config's prediction_type
    'resolution': 512,                # training side length in pixels (images: shorter side resized, centre crop)
    'lora': LORA_DEFAULTS,            # null: full fine-tune of the UNet
    'gradient_checkpointing': True,
    'mixed_precision': 'bf16',        # 'no' | 'fp16' | 'bf16' (frozen weights are stored in this dtype)
    'loss_weighting': 'karras',       # 'karras' = uniform weight on the eps / v MSE, as in DDPM training
}
DATASET_DEFAULTS: dict[str, Any] = {
    'type': 'sd-captions',
    'location': None,                 # an image folder (searched recursively)
    'caption_ext': '.txt',            # sidecar caption files, or 'metadata.jsonl' ({"file_name", "text"} rows)
    'cond_dropout_rate': 0.1,         # default anchor fraction (align.uncond_prob)
    'num_classes': 0,
    'cache_dir': None,                # latents + text embeddings; null: <run dir>/cache
}
OPTIMIZER_DEFAULTS: dict[str, Any] = {'type': 'adamw', 'lr': 1e-4, 'betas': [0.9, 0.999], 'eps': 1e-8,
                                      'weight_decay': 1e-2}
LR_SCHED_DEFAULTS: dict[str, Any] = {'type': 'constant', 'warmup': 0.0}
EMA_DEFAULTS: dict[str, Any] = {'type': 'inverse', 'power': 0.75, 'max_value': 0.9999}


def _merge(section: str, defaults: Mapping[str, Any], value: Any) -> dict[str, Any]:
    if value is None:
        value = {}
    if not isinstance(value, Mapping):
        raise ConfigError(f'config section {section!r} must be an object, got {value!r}')
    unknown = sorted(set(value) - set(defaults))
    if unknown:
        raise ConfigError(f'config key {section + "." + unknown[0]!r} is unknown; allowed keys in {section!r}: '
                          + ', '.join(defaults))
    return {**copy.deepcopy(dict(defaults)), **copy.deepcopy(dict(value))}


def load_config(path_or_dict: str | Path | Mapping[str, Any]) -> dict[str, Any]:
    """Defaults merged and the schema validated; paths are resolved against the config file's folder."""
    raw, base = read_config(path_or_dict, SECTIONS)
    return make_config(raw, base)


def make_config(raw: Mapping[str, Any], base: Path = Path('.')) -> dict[str, Any]:
    """A raw stable_diffusion config (read_config's) with defaults merged and validated; relative paths that
    exist under base are made relative to it."""
    if not is_sd_config(raw):
        raise ConfigError(f'config key \'model.type\': got {raw.get("model", {}).get("type")!r}; '
                          'allowed: \'stable_diffusion\' (other model types load with kdiff_align.config)')
    if raw.get('guide') is not None:
        fail('guide', raw['guide'], 'no guide section for a Stable Diffusion config: the guide snapshot is a '
             'feature of the k-diffusion trainer (autoguidance does not take Stable Diffusion models yet)')
    config = {
        'model': _merge('model', MODEL_DEFAULTS, raw['model']),
        'dataset': _merge('dataset', DATASET_DEFAULTS, raw.get('dataset')),
        'optimizer': _merge('optimizer', OPTIMIZER_DEFAULTS, raw.get('optimizer')),
        'lr_sched': _merge('lr_sched', LR_SCHED_DEFAULTS, raw.get('lr_sched')),
        'ema_sched': None if 'ema_sched' in raw and raw['ema_sched'] is None
        else _merge('ema_sched', EMA_DEFAULTS, raw.get('ema_sched')),
        'align': resolve_align(raw.get('align')),
    }
    model, dataset = config['model'], config['dataset']
    if model['lora'] is not None:
        model['lora'] = _merge('model.lora', LORA_DEFAULTS, model['lora'])
    for key in ('pretrained', 'pretrained_config'):
        if model[key] is not None and not isinstance(model[key], str):
            fail(f'model.{key}', model[key], 'a path (string)')
    if dataset['location'] is not None and not isinstance(dataset['location'], str):
        fail('dataset.location', dataset['location'], 'a path (string)')
    # Relative paths are relative to the config file, like upstream's dataset.location.
    for section, key in (('model', 'pretrained'), ('model', 'pretrained_config'), ('dataset', 'location'),
                         ('dataset', 'cache_dir')):
        value = config[section][key]
        if isinstance(value, str) and value and not Path(value).is_absolute() and (base / value).exists():
            config[section][key] = str(base / value)
    _validate(config)
    return config


def _validate(config: Mapping[str, Any]) -> None:
    model, dataset = config['model'], config['dataset']
    if not model['pretrained']:
        fail('model.pretrained', model['pretrained'], 'the path of a local diffusers folder (model_index.json, '
              'unet/, vae/, text_encoder/, tokenizer/, scheduler/) or of a single .safetensors/.ckpt checkpoint')
    if model['prediction'] is not None:
        choice('model.prediction', model['prediction'], PREDICTIONS)
    number('model.resolution', model['resolution'], lo=8, integer=True)
    if model['resolution'] % 8:
        fail('model.resolution', model['resolution'], 'a multiple of 8 (the Stable Diffusion VAE downsamples by '
              f'8), e.g. {model["resolution"] // 8 * 8 or 8} or {(model["resolution"] // 8 + 1) * 8}')
    lora = model['lora']
    if lora is not None:
        number('model.lora.rank', lora['rank'], lo=1, integer=True)
        number('model.lora.alpha', lora['alpha'], lo=0, lo_open=True)
        number('model.lora.dropout', lora['dropout'], lo=0, hi=1)
        targets = lora['target_modules']
        if not (isinstance(targets, list) and targets and all(isinstance(t, str) and t for t in targets)):
            fail('model.lora.target_modules', targets, 'a non-empty list of module names, e.g. '
                  '["to_q", "to_k", "to_v", "to_out.0"]')
    if not isinstance(model['gradient_checkpointing'], bool):
        fail('model.gradient_checkpointing', model['gradient_checkpointing'], 'true or false')
    choice('model.mixed_precision', model['mixed_precision'], MIXED_PRECISIONS)
    choice('model.loss_weighting', model['loss_weighting'], objective.WEIGHTINGS)
    choice('dataset.type', dataset['type'], ('sd-captions',))
    if not dataset['location']:
        fail('dataset.location', dataset['location'], 'the path of an image folder with captions')
    ext = dataset['caption_ext']
    if not (isinstance(ext, str) and (ext == 'metadata.jsonl' or (ext.startswith('.') and len(ext) > 1))):
        fail('dataset.caption_ext', ext, "'.txt' (or another sidecar extension such as '.caption') or "
              "'metadata.jsonl'")
    number('dataset.cond_dropout_rate', dataset['cond_dropout_rate'], lo=0, hi=1)
    if dataset['cache_dir'] is not None and not isinstance(dataset['cache_dir'], str):
        fail('dataset.cache_dir', dataset['cache_dir'], 'a folder path or null')
    opt = config['optimizer']
    choice('optimizer.type', opt['type'], ('adamw', 'adam', 'sgd'))
    number('optimizer.lr', opt['lr'], lo=0, lo_open=True)
    number('optimizer.weight_decay', opt['weight_decay'], lo=0)
    choice('lr_sched.type', config['lr_sched']['type'], ('constant',))
    number('lr_sched.warmup', config['lr_sched']['warmup'], lo=0, hi=1)
    if config['lr_sched']['warmup'] == 1:
        fail('lr_sched.warmup', 1, 'a number in [0, 1) (the lr is lr * (1 - warmup ** (step + 1)))')
    ema = config['ema_sched']
    if ema is not None:
        choice('ema_sched.type', ema['type'], ('inverse',))
        number('ema_sched.power', ema['power'], lo=0, lo_open=True)
        number('ema_sched.max_value', ema['max_value'], lo=0, hi=1)
    validate_align(config['align'])
    spec = registry.of(config)
    if spec.teacher == 'frozen' and config['align']['teacher'] != 'base':
        fail('align.teacher', config['align']['teacher'], '"base" for Stable Diffusion: the frozen UNet of '
             'model.pretrained, the standard CFG model its student learns to guide in one pass')
    if spec.tells_w and lora is not None:
        untold = ' or '.join(repr(n) for n in registry.names() if not registry.get(n).tells_w)
        fail('align.objective', spec.name, f"{untold} with a LoRA: a w-conditioned UNet trains a new "
             'time_cond_proj_dim projection, which a LoRA export cannot carry; set model.lora to null (full '
             "fine-tune, exported in diffusers' layout)")


# ---------------------------------------------------------------------------------------------------------
# Inputs: what the config points at, checked from JSON configs and the file tree before any model loads.

def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ConfigError(f'{str(path)!r} could not be read as JSON: {err}') from None


def component_configs(model: Mapping[str, Any]) -> dict[str, Any] | None:
    """The unet / vae / scheduler configs of model.pretrained (or model.pretrained_config for a single file)."""
    pretrained = Path(model['pretrained'])
    if not pretrained.exists():
        raise ConfigError(f'config key \'model.pretrained\': {str(pretrained)!r} does not exist; give a local '
                          'diffusers folder (e.g. a download of stable-diffusion-v1-5/stable-diffusion-v1-5 with '
                          'model_index.json, unet/, vae/, text_encoder/, tokenizer/, scheduler/) or a single '
                          '.safetensors/.ckpt checkpoint')
    if pretrained.is_file():
        if pretrained.suffix not in SINGLE_FILE_EXTS:
            raise ConfigError(f'config key \'model.pretrained\': {str(pretrained)!r} is a file but not a '
                              f'checkpoint ({", ".join(SINGLE_FILE_EXTS)}); give a checkpoint or a diffusers folder')
        folder = model['pretrained_config']
        if folder is None or not Path(folder).is_dir():
            return None  # diffusers infers the configs of a single-file checkpoint itself
    else:
        folder = pretrained
    folder = Path(folder)
    files = {'unet': folder / 'unet' / 'config.json', 'vae': folder / 'vae' / 'config.json',
             'text_encoder': folder / 'text_encoder' / 'config.json',
             'scheduler': folder / 'scheduler' / 'scheduler_config.json'}
    missing = [str(p.relative_to(folder)) for p in files.values() if not p.is_file()]
    if not (folder / 'tokenizer').is_dir():
        missing.append('tokenizer/')
    if missing:
        raise ConfigError(f'{str(folder)!r} is not a diffusers Stable Diffusion folder: missing '
                          f'{", ".join(missing)}; it needs {", ".join(c + "/" for c in COMPONENTS)}')
    return {name: _read_json(path) for name, path in files.items()}


def check_model(model: Mapping[str, Any]) -> dict[str, Any]:
    """Checks the weights path, the prediction type and the resolution; returns the resolved model section."""
    model = dict(model)
    configs = component_configs(model)
    if configs is None:
        if model['prediction'] is None:
            raise ConfigError('config key \'model.prediction\' must be given (\'epsilon\' for SD 1.x and 2.x-base, '
                              '\'v_prediction\' for SD 2.x 768-v) when model.pretrained is a single file without '
                              'model.pretrained_config')
        return model
    sched = configs['scheduler']
    folder = model['pretrained_config'] if Path(model['pretrained']).is_file() else model['pretrained']
    folder_prediction = sched.get('prediction_type', 'epsilon')
    if folder_prediction not in PREDICTIONS:
        raise ConfigError(f'{folder}/scheduler/scheduler_config.json: prediction_type {folder_prediction!r} is not '
                          f'supported; allowed: {", ".join(PREDICTIONS)}')
    if model['prediction'] is None:
        model['prediction'] = folder_prediction
    elif model['prediction'] != folder_prediction:
        raise ConfigError(f'config key \'model.prediction\' is {model["prediction"]!r} but '
                          f'{folder}/scheduler/scheduler_config.json says prediction_type {folder_prediction!r}; '
                          'the pretrained UNet was trained for the latter (SD 1.x and 2.x-base: \'epsilon\', '
                          'SD 2.x 768-v: \'v_prediction\'). Set model.prediction to it, or remove the key')
    if sched.get('rescale_betas_zero_snr'):
        raise ConfigError(f'{folder}/scheduler/scheduler_config.json sets rescale_betas_zero_snr: its last noise '
                          'level is infinite, which k-diffusion\'s DDPM wrappers cannot represent')
    vae_factor = 2 ** (len(configs['vae'].get('block_out_channels', [0, 0, 0, 0])) - 1)
    unet_factor = 2 ** (len(configs['unet'].get('down_block_types', [0, 0, 0, 0])) - 1)
    res = model['resolution']
    if res % vae_factor:
        raise ConfigError(f'config key \'model.resolution\': {res} is not divisible by the VAE\'s downsampling '
                          f'factor {vae_factor}; use a multiple of {vae_factor}')
    if (res // vae_factor) % unet_factor:
        step = vae_factor * unet_factor
        raise ConfigError(f'config key \'model.resolution\': {res} gives {res // vae_factor}x{res // vae_factor} '
                          f'latents, not divisible by the UNet\'s downsampling factor {unet_factor}; use a multiple '
                          f'of {step}, e.g. {max(step, res // step * step)}')
    cross_dim = configs['unet'].get('cross_attention_dim')
    hidden = configs['text_encoder'].get('hidden_size')
    if cross_dim is not None and hidden is not None and cross_dim != hidden:
        raise ConfigError(f'{folder}: the UNet\'s cross_attention_dim {cross_dim} differs from the text encoder\'s '
                          f'hidden_size {hidden}; the components do not belong together')
    return model


def find_captioned_images(location: str | Path, caption_ext: str = '.txt') -> list[tuple[Path, str]]:
    """(image, caption) pairs of an image folder; every image must have a caption."""
    root = Path(location)
    if not root.is_dir():
        raise ConfigError(f'config key \'dataset.location\': {str(root)!r} is not a folder; give an image folder '
                          'with captions')
    images = sorted(p for p in root.rglob('*') if p.suffix.lower() in IMAGE_EXTS and p.is_file()
                    and not any(part.startswith('.') for part in p.relative_to(root).parts))
    if not images:
        raise ConfigError(f'dataset folder {str(root)!r} has no images ({", ".join(IMAGE_EXTS)})')
    if caption_ext == 'metadata.jsonl':
        meta = root / 'metadata.jsonl'
        if not meta.is_file():
            raise ConfigError(f'dataset.caption_ext is \'metadata.jsonl\' but {str(meta)!r} does not exist; write '
                              'one {"file_name": ..., "text": ...} object per line, or use sidecar .txt files')
        captions = {}
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                name, text = row['file_name'], row.get('text', row.get('caption'))
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ConfigError(f'{str(meta)}:{n}: expected {{"file_name": ..., "text": ...}}, got {line!r}') \
                    from None
            if not isinstance(text, str):
                raise ConfigError(f'{str(meta)}:{n}: "text" must be a string caption, got {text!r}')
            if not (root / name).is_file():
                raise ConfigError(f'{str(meta)}:{n}: image {name!r} does not exist in {str(root)!r}')
            captions[(root / name).resolve()] = text
        missing = [p for p in images if p.resolve() not in captions]
        if missing:
            raise ConfigError(f'{len(missing)} image(s) have no caption in {str(meta)!r}, e.g. '
                              f'{str(missing[0].relative_to(root))!r}; add a row for each or remove the images')
        return [(p, captions[p.resolve()].strip()) for p in images]
    missing = [p for p in images if not p.with_suffix(caption_ext).is_file()]
    if missing:
        raise ConfigError(f'{len(missing)} image(s) in {str(root)!r} have no caption file, e.g. '
                          f'{str(missing[0])!r} needs {str(missing[0].with_suffix(caption_ext))!r} '
                          f'(dataset.caption_ext is {caption_ext!r})')
    return [(p, p.with_suffix(caption_ext).read_text().strip()) for p in images]


def resolve_model(config: Mapping[str, Any]) -> dict[str, Any]:
    """The config with its model section checked against the weights it points at (check_model)."""
    config = copy.deepcopy(dict(config))
    config['model'] = check_model(config['model'])
    return config


def check_inputs(config: Mapping[str, Any]) -> tuple[dict[str, Any], list[tuple[Path, str]]]:
    """Validates everything a loaded config points at; returns (config with model resolved, captioned items)."""
    config = resolve_model(config)
    return config, find_captioned_images(config['dataset']['location'], config['dataset']['caption_ext'])
