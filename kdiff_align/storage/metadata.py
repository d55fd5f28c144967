"""Sampling metadata carried by exported weights (LoRA, full weights, k-diffusion safetensors).

A model must be sampled the way it was trained. Exports carry, as safetensors metadata (a flat dict of
strings, keys prefixed "kdiff_align."):

    objective       the objective's registered name (kdiff_align.core.registry): 'aligned' (two passes per step; a
                    standard CFG model is 'aligned' with w_range [0, 0]), 'gft', 'mg', 'distill' (trained to be
                    guided in one pass; docs/design.md section 6). Before format 3: 'aligned-cfg' or
                    'standard-cfg', read as 'aligned' (the latter with w_range [0, 0])
    passes          network evaluations per sampling step: 1 (guidance is in the network; the host adds no CFG)
                    or 2 (the host's CFG). An mg model is 1 at its trained effective w, 2 at any other w_sample
    w_train         the paper's w used in training: a number, or {"type", "min_value", "max_value"}
    w_range         [lo, hi]: the w the model was trained for (mg: its effective w / (1 - w); standard: [0, 0]);
                    a w-conditioned model samples only inside it
    w_sample        the recommended sampling w: the paper's w of the result (w = 0 is unguided conditional sampling)
    cfg_scale       the host's CFG scale s = 1 + w_host, w_host the w its own CFG adds: 1 + w_sample for two-pass
                    models, 1.0 for one-pass ones, (1 + w_sample) / (1 + w_mg) for CFG on top of an mg model
    w_input         how the network is told w: 'guidance_cond' (k-diffusion models' keyword argument),
                    'timestep_cond' (a diffusers UNet with time_cond_proj_dim), or null (not told w)
    sigma_interval  [sigma_lo, sigma_hi] in the family's noise levels (sigma_convention), or null: guide only there
                    (a w-conditioned model is told w = 0 outside)
    sigma_convention  'k-diffusion' (sigma of x = x0 + sigma eps; for VP models sqrt((1 - abar) / abar)) or
                    'flow' (t in [0, 1] of x_t = (1 - t) x0 + t eps, ComfyUI's sigma for flow models)
    convention      a sentence saying which number is which

Values are JSON text, so numbers, null and lists read back exactly. Writers call
`export_metadata(config)`; readers call `read_metadata(path)` or `parse_metadata(header_strings)`. Older
exports (format_version 1) lack passes, w_range, w_input and sigma_convention: they read as two-pass models
not told w, w_range from w_train, in k-diffusion sigma.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..core import registry
from ..errors import MetadataError  # noqa: F401 (re-exported)
from ..core.guidance import w_to_cfg_scale
from ..core.registry import check_sigma_interval
from ..config.schema import is_sd_config

PREFIX = 'kdiff_align.'
# 2: one-pass objectives (gft, mg, distill), passes, w_range, w_input; cfg_scale is the host's.
# 3: objective is the registered name ('aligned', not 'aligned-cfg' / 'standard-cfg').
FORMAT_VERSION = 3
W_INPUTS = ('guidance_cond', 'timestep_cond')
CONVENTION = ("w_train, w_range and w_sample are the paper's guidance weight w (Ho & Salimans 2022; w = 0 is "
              "unguided conditional sampling); w_sample is the w of the result. cfg_scale is the hosts' CFG scale "
              "s = 1 + w for the guidance the host itself adds (ComfyUI cfg, A1111/Forge CFG scale, diffusers "
              "guidance_scale, k-diffusion cfg_scale): 1 for one-pass models (passes 1), whose guidance is in the "
              "network. w_input says how a w-conditioned model is told w (guidance_cond: k-diffusion keyword; "
              "timestep_cond: diffusers' guidance embedding of w, as latent-consistency pipelines pass it). "
              "sigma_interval is in k-diffusion noise levels sigma (for Stable Diffusion sigma = sqrt((1 - "
              "alphas_cumprod) / alphas_cumprod)); outside it sample without guidance. sigma_convention names the "
              "family: 'k-diffusion' as above, 'flow' for flow models (sigma = t in [0, 1]).")
KEYS = ('format_version', 'objective', 'passes', 'w_train', 'w_range', 'w_sample', 'cfg_scale', 'w_input',
        'sigma_interval', 'sigma_convention', 'convention')
# One noise-level convention per model family; every integration maps its host's step to it.
SIGMA_CONVENTIONS = ('k-diffusion', 'flow')


def host_cfg_scale(objective: str, w_sample: float, w_range: tuple[float, float] | list[float]) -> float:
    """The host's CFG scale for the recommended sampling: 1 + w_sample for two-pass models, 1.0 for one-pass ones,
    and (1 + w_sample) / (1 + w_mg) for CFG on top of an mg model (docs/design.md section 6)."""
    method, w = registry.get(objective).plan(w_sample, w_range)
    return 1.0 if method == 'one-pass' else w_to_cfg_scale(w)


def guidance_metadata(config: Mapping[str, Any], *, w_sample: float | None = None) -> dict[str, Any]:
    """The sampling metadata of a loaded config (load_config's output): typed values, not strings yet."""
    align = config['align']
    spec = registry.get(align['objective'])
    if w_sample is None:
        w_sample = spec.default_w_sample(align['w_train']) if align['w_sample'] is None else align['w_sample']
    w = float(w_sample)
    if not math.isfinite(w):
        raise MetadataError(f'w_sample must be a finite number (the paper\'s w), got {w_sample!r}')
    # A model trained without guidance (w_train 0, or mix 0: standard CFG) was trained for w = 0.
    w_range = [float(v) for v in spec.w_range(align['w_train'])] if align['mix'] > 0 else [0.0, 0.0]
    try:
        method, method_w = spec.plan(w, w_range)
    except ValueError as err:
        raise MetadataError(f'w_sample: {err}') from None
    interval = check_sigma_interval(align['sigma_interval'])
    if method == 'one-pass' and method_w is None:
        interval = None   # a model not told w samples its trained guidance; no interval (OnePassDenoiser)
    w_input = None
    if spec.tells_w:   # Stable Diffusion UNets get diffusers' time_cond_proj_dim (kdiff_align.sd.model)
        w_input = 'timestep_cond' if is_sd_config(config) else 'guidance_cond'
    return {
        'format_version': FORMAT_VERSION,
        'objective': spec.name,
        'passes': 1 if method == 'one-pass' else 2,
        'w_train': align['w_train'] if isinstance(align['w_train'], Mapping) else float(align['w_train']),
        'w_range': w_range,
        'w_sample': w,
        'cfg_scale': host_cfg_scale(spec.name, w, w_range),
        'w_input': w_input,
        'sigma_interval': list(interval) if interval is not None else None,
        'sigma_convention': 'k-diffusion',  # every model kdiff-align trains (k-diffusion and Stable Diffusion)
        'convention': CONVENTION,
    }


def to_safetensors_metadata(meta: Mapping[str, Any]) -> dict[str, str]:
    """Typed metadata -> safetensors' flat {str: str}, keys prefixed "kdiff_align."."""
    out = {}
    for key in KEYS:
        if key not in meta:
            raise MetadataError(f'metadata key {key!r} is missing; build it with guidance_metadata(config)')
        value = meta[key]
        out[PREFIX + key] = value if key == 'convention' else json.dumps(value)
    return out


def export_metadata(config: Mapping[str, Any], *, w_sample: float | None = None) -> dict[str, str]:
    """The safetensors metadata strings for an export of a model trained with `config`."""
    return to_safetensors_metadata(guidance_metadata(config, w_sample=w_sample))


# Keys an older export may lack, filled by _complete; every other key is required.
_OPTIONAL = ('passes', 'w_range', 'w_input', 'cfg_scale', 'sigma_convention')


def _finite(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def parse_metadata(header: Mapping[str, str] | None) -> dict[str, Any] | None:
    """Typed metadata from safetensors metadata strings; None when the file carries none of ours."""
    if not header or not any(k.startswith(PREFIX) for k in header):
        return None
    meta: dict[str, Any] = {}
    for key in KEYS:
        raw = header.get(PREFIX + key)
        if raw is None:
            if key in _OPTIONAL:
                continue
            raise MetadataError(f'safetensors metadata has kdiff_align keys but lacks {PREFIX + key!r}')
        if key == 'convention':
            meta[key] = raw
            continue
        try:
            meta[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise MetadataError(f'safetensors metadata {PREFIX + key!r} is not JSON: {raw!r}') from None
    version = meta['format_version']
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise MetadataError(f'{PREFIX}format_version must be a positive integer, got {version!r}')
    if version > FORMAT_VERSION:
        raise MetadataError(f'{PREFIX}format_version is {version}: written by a newer kdiff-align than this one '
                            f'(which reads up to {FORMAT_VERSION}); update kdiff-align to sample this model')
    try:
        registry.get(meta['objective'])
    except ValueError:
        raise MetadataError(f'{PREFIX}objective is {meta["objective"]!r}; expected one of {registry.names()} '
                            f'(or, before format 3, {tuple(registry.OLD_NAMES)})') from None
    if not _finite(meta['w_sample']):
        raise MetadataError(f'{PREFIX}w_sample must be a finite number (the paper\'s w), got {meta["w_sample"]!r}')
    meta['w_sample'] = float(meta['w_sample'])
    _complete(meta)
    try:
        interval = check_sigma_interval(meta['sigma_interval'])
    except ValueError as err:
        raise MetadataError(f'{PREFIX}sigma_interval: {err}') from None
    meta['sigma_interval'] = list(interval) if interval is not None else None
    if meta['sigma_convention'] not in SIGMA_CONVENTIONS:
        raise MetadataError(f'{PREFIX}sigma_convention is {meta["sigma_convention"]!r}; expected one of '
                            f'{SIGMA_CONVENTIONS}')
    return {key: meta[key] for key in KEYS}


def _complete(meta: dict[str, Any]) -> None:
    """Fills and checks w_range, w_input, passes and cfg_scale; missing ones take the older two-pass meaning."""
    if meta['objective'] in registry.UNGUIDED_OLD_NAMES:
        meta.setdefault('w_range', [0.0, 0.0])   # a standard CFG model: trained for w = 0
    spec = registry.get(meta['objective'])
    meta['objective'] = objective = spec.name
    w = meta['w_sample']
    if 'w_range' not in meta:
        try:
            meta['w_range'] = [float(v) for v in spec.w_range(meta['w_train'])]
        except (TypeError, ValueError) as err:
            raise MetadataError(f'{PREFIX}w_train {meta["w_train"]!r} is not a w or w distribution: {err}') from None
    w_range = meta['w_range']
    if not (isinstance(w_range, list) and len(w_range) == 2 and all(_finite(v) for v in w_range)
            and 0 <= w_range[0] <= w_range[1]):
        raise MetadataError(f'{PREFIX}w_range must be [lo, hi] with 0 <= lo <= hi, got {w_range!r}')
    meta['w_range'] = [float(v) for v in w_range]
    w_input = meta.setdefault('w_input', None)
    if spec.tells_w:
        if w_input not in W_INPUTS:
            raise MetadataError(f'{PREFIX}w_input is {w_input!r}; a {objective} model is told w, so it must be one '
                                f'of {W_INPUTS}')
        lo, hi = meta['w_range']
        if not lo <= w <= hi:
            raise MetadataError(f'{PREFIX}w_sample {w:g} is outside the trained w_range [{lo:g}, {hi:g}]')
    elif w_input is not None:
        raise MetadataError(f'{PREFIX}w_input is {w_input!r}, but a {objective} model is not told w (expected null)')
    passes = spec.passes(w, meta['w_range'])
    if meta.setdefault('passes', passes) != passes:
        raise MetadataError(f'{PREFIX}passes is {meta["passes"]!r}, but a {objective} model at w_sample {w:g} '
                            f'samples in {passes} network evaluation(s) per step')
    # cfg_scale is derived; the paper's w is the source of truth (docs/design.md section 3).
    meta['cfg_scale'] = host_cfg_scale(objective, w, meta['w_range'])
    meta.setdefault('sigma_convention', 'k-diffusion')   # exports before the key: all k-diffusion sigma


def read_header(path: str | Path) -> dict[str, str]:
    """The metadata strings of a .safetensors file (its JSON header's __metadata__), without loading tensors."""
    path = Path(path)
    with open(path, 'rb') as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise MetadataError(f'{str(path)!r} is not a safetensors file (shorter than its 8-byte header size)')
        size = int.from_bytes(raw, 'little')
        if size > 100_000_000:
            raise MetadataError(f'{str(path)!r} is not a safetensors file (header size {size})')
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise MetadataError(f'{str(path)!r} is not a safetensors file (its header is not JSON)') from None
    return dict(header.get('__metadata__') or {})


def read_metadata(path: str | Path) -> dict[str, Any] | None:
    """The kdiff_align metadata of a .safetensors file, or None when it has none."""
    return parse_metadata(read_header(path))
