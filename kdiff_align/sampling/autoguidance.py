"""Autoguidance: guiding a model with a weaker version of itself, for every k-diffusion sampler.

Karras, Kynkäänniemi, Lehtinen, Aila, Laine, "Guiding a Diffusion Model with a Bad Version of Itself"
(NeurIPS 2024): D = D_guide + s·(D_main − D_guide), s ≥ 1. In this project's w (w = s − 1, the
convention of classifier-free guidance, docs/design.md section 3):

    D_w = D_main + w·(D_main − D_guide),    w = 0: D_main, the unguided conditional model.

The guide is a smaller and/or less trained model of the same task (an early EMA snapshot, a smaller config of
the same family). Both see the same condition. It costs 2 network evaluations per step like CFG (the guide's
training too, when it is trained separately).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..core.guidance import check_sigma_interval, zero_outside

__all__ = ['AutoGuidedDenoiser', 'autoguide', 'check_guide', 'load_guide', 'load_guided', 'resolve_guide']

GUIDE_SNAPSHOT = '_guide.safetensors'   # the engine's guide snapshot: <run_dir>/<name>_guide.safetensors
SAME_WEIGHTS = ('the guide is the main model itself (the same weights): autoguidance needs a weaker model of the '
                'same task, e.g. an early EMA snapshot or a smaller config')


def autoguide(denoised_main: torch.Tensor, denoised_guide: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """D_w = D_main + w·(D_main − D_guide) (Karras et al. 2024 with s = 1 + w), w broadcast per row."""
    if isinstance(w, torch.Tensor) and w.ndim:
        w = w.view(-1, *[1] * (denoised_main.ndim - 1)).to(denoised_main.dtype)
    return denoised_main + w * (denoised_main - denoised_guide)


class AutoGuidedDenoiser(nn.Module):
    """A k-diffusion denoiser with autoguidance: model(x, sigma, **extra_args) -> D_main + w·(D_main − D_guide).

    main and guide are k-diffusion denoisers (e.g. sample.build_denoiser's) of the same task; extra_args go to
    both. They have different weights, so a guided step is always two calls, one per model, each on the whole
    batch (2 NFE per step, like CFG). w is the paper's (w = s − 1). sigma_interval [sigma_lo, sigma_hi] is
    the guidance interval (Kynkäänniemi et al. 2024) as in GuidedDenoiser: rows whose sigma lies outside it
    (inclusive bounds) get D_main; a step where every row does, and every step at w = 0, calls only the main
    model (1 NFE).
    """

    def __init__(self, main: nn.Module, guide: nn.Module, w: float, *,
                 sigma_interval: Sequence[float] | None = None):
        super().__init__()
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
            raise ValueError(f"w must be a number >= 0 (the paper's w; autoguidance's s = 1 + w), got {w!r}")
        main_params = {id(p) for p in main.parameters()}
        if guide is main or (main_params and main_params == {id(p) for p in guide.parameters()}):
            raise ValueError(SAME_WEIGHTS)
        self.inner_model, self.guide_model, self.w = main, guide, float(w)
        self.sigma_interval = check_sigma_interval(sigma_interval)

    def scale_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The paper's w for each row, 0 where sigma lies outside the guidance interval."""
        return zero_outside(torch.full_like(sigma, self.w), sigma, self.sigma_interval)

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        sigma = torch.as_tensor(sigma, device=input.device).expand(input.shape[0])
        w = self.scale_at(sigma)
        denoised = self.inner_model(input, sigma, **extra_args)
        if not bool((w != 0).any()):
            return denoised
        return autoguide(denoised, self.guide_model(input, sigma, **extra_args), w)   # rows at w = 0: D_main


# What a guide must share with the main model: the task (data, condition) and the σ convention of D. Everything
# else (channels, depths, widths, patch size, training length) may differ: a smaller config of the same family.
_SAME_CONDITION = 'condition inputs (both models see the same condition)'
_SIGMA = 'σ convention (sigma_data, sigma_min, sigma_max and loss_config, its preconditioning)'
_MUST_MATCH = (
    ('model.input_channels', 'data shape'), ('model.input_size', 'data shape'),
    ('dataset.type', 'data'), ('dataset.location', 'data'), ('dataset.radius', 'data'), ('dataset.std', 'data'),
    ('dataset.num_classes', 'class count (both models see the same condition)'),
    ('model.mapping_cond_dim', _SAME_CONDITION), ('model.unet_cond_dim', _SAME_CONDITION),
    ('model.cross_cond_dim', _SAME_CONDITION),
    ('model.sigma_data', _SIGMA), ('model.sigma_min', _SIGMA), ('model.sigma_max', _SIGMA),
    ('model.loss_config', _SIGMA),
)
_TOY_DEFAULTS = {'radius': 2.0, 'std': 0.25}   # data.py's defaults for dataset type 'toy'


def _value(config: Mapping[str, Any], key: str) -> Any:
    section, name = key.split('.')
    if section == 'dataset' and config['dataset'].get('type') == 'toy':
        return config['dataset'].get(name, _TOY_DEFAULTS.get(name))
    return config[section].get(name)


def check_guide(main_config: str | Path | Mapping[str, Any], guide_config: str | Path | Mapping[str, Any]
                ) -> None:
    """Raises ConfigError, in one line naming the key and both values, for a guide that cannot autoguide the main
    model: another architecture family (model.type), data, input shape, class count, condition inputs or
    σ convention, or a one-pass objective (either model). Configs: paths or dicts, as load_config takes them."""
    from ..config import MODEL_TYPES, ConfigError, load_config
    from ..core import registry

    main, guide = load_config(main_config), load_config(guide_config)
    for role, config in (('main', main), ('guide', guide)):
        if config['model']['type'] not in MODEL_TYPES:
            raise ConfigError(f"{role} config key 'model.type': got {config['model']['type']!r}; autoguidance takes "
                              f"k-diffusion models ({', '.join(MODEL_TYPES)}); Stable Diffusion is not supported yet")
    if main['model']['type'] != guide['model']['type']:
        raise ConfigError(f"config key 'model.type': guide {guide['model']['type']!r}, main "
                          f"{main['model']['type']!r}; a guide must be of the main model's architecture family "
                          '(a smaller config of it, fewer channels or depths, is allowed)')
    for role, config in (('main', main), ('guide', guide)):
        if registry.of(config).one_pass:
            raise ConfigError(f"{role} config key 'align.objective': got {config['align']['objective']!r}; "
                              "autoguidance takes standard or aligned models ('aligned'): a gft or distill network "
                              "is told w and an mg model's one pass samples its trained guidance, so neither is "
                              'the plain conditional denoiser autoguidance extrapolates from')
    for key, what in _MUST_MATCH:
        if _value(main, key) != _value(guide, key):
            raise ConfigError(f'config key {key!r}: guide {_value(guide, key)!r}, main {_value(main, key)!r}; '
                              f"a guide must match the main model's {what}")


def resolve_guide(path: str | Path) -> Path:
    """The file or folder a guide is loaded from: a run folder holding the engine's guide snapshot
    (`<name>_guide.safetensors`) -> the snapshot; any other path as given (a checkpoint, an export, or a run folder
    without a snapshot: its latest checkpoint, load_for_inference's rules). CheckpointError for a missing path
    or a folder with several snapshots."""
    from ..storage.checkpoint import CheckpointError

    path = Path(path)
    if not path.exists():
        raise CheckpointError(f'guide {str(path)!r} does not exist; pass a .pth checkpoint, a .safetensors export '
                              f'or a run folder (its *{GUIDE_SNAPSHOT} snapshot, else its latest.json)')
    snapshots = sorted(path.glob(f'*{GUIDE_SNAPSHOT}')) if path.is_dir() else []
    if len(snapshots) > 1:
        raise CheckpointError(f'run folder {str(path)!r} holds several guide snapshots '
                              f'({", ".join(p.name for p in snapshots)}); pass one of them to --guide')
    return snapshots[0] if snapshots else path


def load_guide(main_config: Mapping[str, Any], main_state: Mapping[str, torch.Tensor], guide: str | Path, *,
               ema: bool = True, device: str | torch.device = 'cpu') -> tuple[Path, nn.Module]:
    """(resolved path, guide denoiser) of a guide for the main model (config and weights, loaded): resolve_guide,
    load_for_inference, check_guide; a ConfigError also when the guide's weights are the main model's."""
    from ..config import ConfigError, build_denoiser, load_config
    from ..storage.checkpoint import load_for_inference

    path = resolve_guide(guide)
    raw, state = load_for_inference(path, ema=ema)
    config = load_config(raw)
    check_guide(main_config, config)
    if state.keys() == main_state.keys() and all(torch.equal(state[k], main_state[k]) for k in state):
        raise ConfigError(SAME_WEIGHTS)
    return path, build_denoiser(config, state, device)


def load_guided(main_ckpt: str | Path, guide_ckpt: str | Path, w: float, *,
                sigma_interval: Sequence[float] | None = None, ema: bool = True,
                device: str | torch.device = 'cpu') -> tuple[dict[str, Any], AutoGuidedDenoiser]:
    """(main config, AutoGuidedDenoiser) from two checkpoints, run folders or exports (load_for_inference; a run
    folder as guide: its guide snapshot first, resolve_guide), the guide checked against the main model
    (check_guide's ConfigError)."""
    from ..storage.checkpoint import load_for_inference
    from ..config import build_denoiser, load_config

    main_raw, main_state = load_for_inference(main_ckpt, ema=ema)
    main_config = load_config(main_raw)
    _, guide = load_guide(main_config, main_state, guide_ckpt, ema=ema, device=device)
    return main_config, AutoGuidedDenoiser(build_denoiser(main_config, main_state, device), guide, w,
                                           sigma_interval=sigma_interval)
