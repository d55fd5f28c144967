"""Sampling metadata carried by exported weights (LoRA, full weights, k-diffusion safetensors).

A model trained with the aligned objective must be sampled the way it was trained. Exports carry, as
safetensors metadata (a flat dict of strings, keys prefixed "kdiff_align."):

    objective       'aligned-cfg' or 'standard-cfg'
    w_train         the paper's w used in training: a number, or {"type", "min_value", "max_value"}
    w_sample        the recommended sampling w (the paper's w; w = 0 is unguided conditional sampling)
    cfg_scale       the same recommendation in the hosts' convention, s = 1 + w (w_to_cfg_scale)
    sigma_interval  [sigma_lo, sigma_hi] in the family's noise levels (sigma_convention), or null: guide only there
    sigma_convention  'k-diffusion' (sigma of x = x0 + sigma eps; for VP models sqrt((1 - abar) / abar)) or
                    'flow' (t in [0, 1] of x_t = (1 - t) x0 + t eps, ComfyUI's sigma for flow models); missing
                    in older exports, which are all 'k-diffusion'
    convention      a sentence saying which number is which

Values are JSON text, so numbers, null and lists read back exactly. Writers call
`export_metadata(config)`; readers call `read_metadata(path)` or `parse_metadata(header_strings)`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .guidance import check_sigma_interval, w_to_cfg_scale

PREFIX = 'kdiff_align.'
FORMAT_VERSION = 1
OBJECTIVES = ('aligned-cfg', 'standard-cfg')
CONVENTION = ("w_train and w_sample are the paper's guidance weight w (Ho & Salimans 2022; w = 0 is unguided "
              "conditional sampling). cfg_scale is the hosts' CFG scale s = 1 + w (ComfyUI cfg, A1111/Forge CFG "
              "scale, diffusers guidance_scale, k-diffusion cfg_scale). sigma_interval is in k-diffusion noise "
              "levels sigma (for Stable Diffusion sigma = sqrt((1 - alphas_cumprod) / alphas_cumprod)); outside "
              "it sample without guidance. sigma_convention names the family: 'k-diffusion' as above, 'flow' "
              "for flow models (sigma = t in [0, 1]).")
KEYS = ('format_version', 'objective', 'w_train', 'w_sample', 'cfg_scale', 'sigma_interval', 'sigma_convention',
        'convention')
# One noise-level convention per model family; every integration maps its host's step to it.
SIGMA_CONVENTIONS = ('k-diffusion', 'flow')


class MetadataError(ValueError):
    """kdiff_align metadata that is present but malformed."""


def guidance_metadata(config: Mapping[str, Any], *, w_sample: float | None = None) -> dict[str, Any]:
    """The sampling metadata of a loaded config (load_config's output): typed values, not strings yet."""
    from .config import align_section
    from .objective import make_guidance_scale

    align = align_section(config)
    w_train = make_guidance_scale(align['w_train'])
    aligned = align['mix'] > 0 and w_train != 0
    w = float(align['w_sample'] if w_sample is None else w_sample)
    if not math.isfinite(w):
        raise MetadataError(f'w_sample must be a finite number (the paper\'s w), got {w_sample!r}')
    interval = check_sigma_interval(align['sigma_interval'])
    return {
        'format_version': FORMAT_VERSION,
        'objective': 'aligned-cfg' if aligned else 'standard-cfg',
        'w_train': align['w_train'] if isinstance(align['w_train'], Mapping) else float(align['w_train']),
        'w_sample': w,
        'cfg_scale': w_to_cfg_scale(w),
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


def parse_metadata(header: Mapping[str, str] | None) -> dict[str, Any] | None:
    """Typed metadata from safetensors metadata strings; None when the file carries none of ours."""
    if not header or not any(k.startswith(PREFIX) for k in header):
        return None
    meta = {}
    for key in KEYS:
        raw = header.get(PREFIX + key)
        if raw is None:
            if key == 'cfg_scale' and 'w_sample' in meta:
                continue
            if key == 'sigma_convention':  # exports before the key: all k-diffusion sigma
                meta[key] = 'k-diffusion'
                continue
            raise MetadataError(f'safetensors metadata has kdiff_align keys but lacks {PREFIX + key!r}')
        if key == 'convention':
            meta[key] = raw
            continue
        try:
            meta[key] = json.loads(raw)
        except json.JSONDecodeError:
            raise MetadataError(f'safetensors metadata {PREFIX + key!r} is not JSON: {raw!r}') from None
    if meta['objective'] not in OBJECTIVES:
        raise MetadataError(f'{PREFIX}objective is {meta["objective"]!r}; expected one of {OBJECTIVES}')
    w = meta['w_sample']
    if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w):
        raise MetadataError(f'{PREFIX}w_sample must be a finite number (the paper\'s w), got {w!r}')
    meta['w_sample'] = float(w)
    # cfg_scale is derived; the paper's w is the source of truth (docs/design.md section 3).
    meta['cfg_scale'] = w_to_cfg_scale(meta['w_sample'])
    try:
        interval = check_sigma_interval(meta['sigma_interval'])
    except ValueError as err:
        raise MetadataError(f'{PREFIX}sigma_interval: {err}') from None
    meta['sigma_interval'] = list(interval) if interval is not None else None
    if meta['sigma_convention'] not in SIGMA_CONVENTIONS:
        raise MetadataError(f'{PREFIX}sigma_convention is {meta["sigma_convention"]!r}; expected one of '
                            f'{SIGMA_CONVENTIONS}')
    return meta


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
