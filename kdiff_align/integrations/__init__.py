"""Host integrations: ComfyUI nodes, an A1111/Forge extension, a diffusers guider.

Each host runs the conditional and unconditional passes itself and hands over the two predictions. This
module is the one place that turns them into kdiff-align's guided prediction, by running the core's
GuidedDenoiser on them, so every host gets exactly its semantics: the paper's w (w = 0 is unguided), a
guidance interval in k-diffusion sigma (outside it: the conditional prediction, and no unconditional pass
needed), and an optional w schedule. Host glue translates host arguments into one call of HostGuidance;
exports.py holds the rules for one-pass exports (gft, mg, distill). Nothing here imports a host, and the core
never imports this package.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ..core.guidance import GuidedDenoiser, cfg_scale_to_w, check_sigma_interval, w_to_cfg_scale
from ..storage.metadata import SIGMA_CONVENTIONS

__all__ = ['HostGuidance', 'log_linear_schedule', 'make_cfg_function', 'w_to_cfg_scale', 'cfg_scale_to_w']


def log_linear_schedule(w_start: float, w_end: float, sigma_hi: float, sigma_lo: float) -> Callable:
    """A w schedule sigma -> w: w_start at sigma_hi, w_end at sigma_lo, linear in log sigma, held outside."""
    if not 0 < sigma_lo < sigma_hi:
        raise ValueError(f'a w schedule needs 0 < sigma_lo < sigma_hi, got [{sigma_lo}, {sigma_hi}]')
    log_lo, log_hi = math.log(sigma_lo), math.log(sigma_hi)

    def schedule(sigma: torch.Tensor) -> torch.Tensor:
        t = ((sigma.log() - log_lo) / (log_hi - log_lo)).clamp(0, 1)
        return w_end + (w_start - w_end) * t

    return schedule


class _Precomputed(nn.Module):
    """An inner model that returns the host's predictions: uncond_pred on null rows, cond_pred elsewhere."""

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, *, cond_pred: torch.Tensor,
                uncond_pred: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        null = branch.bool().view(-1, *[1] * (cond_pred.ndim - 1))
        return torch.where(null, uncond_pred, cond_pred)


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f'{name} must be a finite number (the paper\'s w), got {value!r}')
    return float(value)


class HostGuidance:
    """GuidedDenoiser's semantics for a host that computes both branches: combine(cond, uncond, sigma).

    w is the paper's w (a host's CFG scale s is w = s - 1: use from_cfg_scale). sigma_interval is
    [sigma_lo, sigma_hi] in the noise levels of sigma_convention: 'k-diffusion' (k-diffusion's sigma; for VP
    models sqrt((1 - abar) / abar)) or 'flow' (t in [0, 1], ComfyUI's sigma for flow models). w_end (needs
    sigma_interval with sigma_lo > 0) makes w a schedule: w at sigma_hi, w_end at sigma_lo, linear in log sigma.
    """

    def __init__(self, w: float, *, sigma_interval: Sequence[float] | None = None, w_end: float | None = None,
                 sigma_convention: str = 'k-diffusion'):
        if sigma_convention not in SIGMA_CONVENTIONS:
            raise ValueError(f'sigma_convention must be one of {SIGMA_CONVENTIONS}, got {sigma_convention!r}')
        self.sigma_convention = sigma_convention
        self.w = _number('w', w)
        self.sigma_interval = check_sigma_interval(sigma_interval)
        self.w_end = None if w_end is None else _number('w_end', w_end)
        schedule: float | Callable = self.w
        if self.w_end is not None:
            if self.sigma_interval is None:
                raise ValueError('w_end (a w schedule) needs sigma_interval [sigma_lo, sigma_hi]: w ramps from w '
                                 'at sigma_hi to w_end at sigma_lo')
            schedule = log_linear_schedule(self.w, self.w_end, self.sigma_interval[1], self.sigma_interval[0])
        # The core's guided denoiser, run on predictions the host has already made.
        self.denoiser = GuidedDenoiser(_Precomputed(), schedule, uncond={'branch': 1},
                                       sigma_interval=self.sigma_interval)

    @classmethod
    def from_cfg_scale(cls, cfg_scale: float, **kwargs: Any) -> HostGuidance:
        """From a host's CFG scale s = 1 + w."""
        return cls(cfg_scale_to_w(_number('cfg_scale', cfg_scale)), **kwargs)

    @classmethod
    def from_metadata(cls, meta: Mapping[str, Any], *, w: float | None = None, w_end: float | None = None,
                      host: str = 'this host', model: str = 'this model', w_inputs: Collection[str] = ()
                      ) -> HostGuidance:
        """The host's own CFG for an export's recommended sampling (kdiff_align.storage.metadata), by its passes:

        - two passes: CFG at the export's cfg_scale (w = cfg_scale - 1; `w` overrides it) with its sigma_interval;
        - one pass: no host CFG (w = 0: cfg 1, the unconditional pass skipped), since the guidance is in the
          network. A model told w whose w_input the host cannot pass (not in w_inputs) raises HostCannotPassW
          naming `model` and what to do; a host that can pass it does so itself (diffusers: guidance_scale).
        """
        from .exports import check_w_input

        check_w_input(meta, host=host, model=model, w_inputs=w_inputs)
        if meta.get('passes', 2) == 1:
            if w is not None or w_end is not None:
                raise ValueError(f'{model} is a one-pass {meta["objective"]} model (its guidance is in the network, '
                                 'sampled at cfg 1): a host w or w schedule cannot apply; use a constant schedule')
            return cls(0.0, sigma_convention=meta.get('sigma_convention', 'k-diffusion'))
        host_w = cfg_scale_to_w(meta.get('cfg_scale', w_to_cfg_scale(meta['w_sample']))) if w is None else w
        return cls(host_w, sigma_interval=meta.get('sigma_interval'), w_end=w_end,
                   sigma_convention=meta.get('sigma_convention', 'k-diffusion'))

    @property
    def unguided(self) -> bool:
        """Whether this guidance never needs the unconditional prediction (w = 0 at every sigma): the host's step
        is one conditional pass."""
        return self.w == 0 and (self.w_end is None or self.w_end == 0)

    @property
    def uses_sigma(self) -> bool:
        """Whether w depends on sigma (an interval or a schedule), so that the sigma convention matters."""
        return self.sigma_interval is not None or self.w_end is not None

    def check_convention(self, host_convention: str, where: str) -> None:
        """Refuses an interval given in another family's sigma than the host samples in."""
        if self.uses_sigma and host_convention != self.sigma_convention:
            raise ValueError(f'{where} samples in {host_convention!r} noise levels, but this guidance\'s sigma '
                             f'interval is in {self.sigma_convention!r} ones (kdiff_align.sigma_convention); use '
                             'an export made for this model family, or enter the interval for it by hand')

    @property
    def peak_w(self) -> float:
        """The largest w this guidance uses (hosts that take one CFG scale are set to 1 + peak_w)."""
        return self.w if self.w_end is None else max(self.w, self.w_end)

    def scale_at(self, sigma: torch.Tensor | float) -> torch.Tensor:
        """The paper's w for each row at noise level sigma; 0 outside the guidance interval."""
        return self.denoiser.scale_at(torch.as_tensor(sigma, dtype=torch.float32).reshape(-1))

    def needs_uncond(self, sigma: torch.Tensor | float) -> bool:
        """Whether any row needs the unconditional prediction at this sigma."""
        return bool((self.scale_at(sigma) != 0).any())

    def combine(self, cond: torch.Tensor, uncond: torch.Tensor | None, sigma: torch.Tensor | float) -> torch.Tensor:
        """cond + w (cond - uncond) per row, cond exactly where w = 0 (uncond may then be None).

        Works in any space affine in the denoised prediction: denoised x0, eps, v, or ComfyUI's x - denoised.
        """
        batch_size = cond.shape[0]
        sigma = torch.as_tensor(sigma, device=cond.device)
        sigma = (sigma.reshape(-1) if sigma.ndim else sigma).to(torch.float32).expand(batch_size)
        if uncond is None:
            if self.needs_uncond(sigma):
                raise ValueError(f'w != 0 at sigma {sigma[0].item():g}, so the unconditional prediction is needed')
            uncond = cond
        branch = torch.zeros(batch_size, dtype=torch.long, device=cond.device)
        return self.denoiser(cond, sigma, cond_pred=cond, uncond_pred=uncond.to(cond.dtype), branch=branch)

    def describe(self) -> dict[str, Any]:
        """The settings, for infotext / logs, in the paper's w."""
        out: dict[str, Any] = {'w': self.w}
        if self.w_end is not None:
            out['w_end'] = self.w_end
        if self.sigma_interval is not None:
            out['sigma_interval'] = list(self.sigma_interval)
        return out

    def __repr__(self) -> str:
        return f'HostGuidance({", ".join(f"{k}={v}" for k, v in self.describe().items())})'


def make_cfg_function(guidance: HostGuidance | Callable[[float], HostGuidance]) -> Callable[[dict], torch.Tensor]:
    """A `sampler_cfg_function` for ComfyUI's (and Forge's) model patcher: args -> x - D_w.

    The host passes args with 'input' (x), 'sigma', 'cond_scale' (s = 1 + w), 'cond_denoised' and
    'uncond_denoised'. guidance is fixed, or a function of the host's cond_scale (then w = s - 1).
    """
    cache: dict[float, HostGuidance] = {}

    def cfg_function(args: dict) -> torch.Tensor:
        if isinstance(guidance, HostGuidance):
            g = guidance
        else:
            scale = float(args['cond_scale'])
            g = cache[scale] if scale in cache else cache.setdefault(scale, guidance(scale))
        x = args['input']
        return x - g.combine(args['cond_denoised'], args['uncond_denoised'], args['sigma'])

    return cfg_function
