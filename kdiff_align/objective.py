"""The aligned classifier-free-guidance objective (docs/design.md section 1; Patel et al., arXiv 2311.00938).

Upstream k-diffusion trains F toward T = (x0 - c_skip x) / c_out with loss lambda(sigma) mean((F - T)^2).
Sampling with guidance uses F_w = (1 + w) F_c - w F_u, so the aligned objective trains that combination:

    L_aligned = lambda(sigma) mean((F_w - T)^2)                                  (eq. A)

A fraction uncond_prob of rows (the anchor) gets the standard loss on the null condition, and on the
conditional rows L = mix L_aligned + (1 - mix) L_standard. mix = 0 or w = 0 is upstream CFG training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any, Union

import torch
from torch import nn

from . import conditioning

WEIGHTINGS = ('karras', 'soft-min-snr', 'snr')
SCALE_DISTRIBUTIONS = ('uniform', 'log-uniform')


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Appends singleton dimensions to x until it has target_dims dimensions."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


class ScaleDistribution:
    """A training-time guidance weight w drawn per row: uniform or log-uniform on [min_value, max_value]."""

    def __init__(self, type: str, min_value: float, max_value: float):
        if type not in SCALE_DISTRIBUTIONS:
            raise ValueError(f'guidance_scale type must be one of {SCALE_DISTRIBUTIONS}, got {type!r}')
        if not 0 <= min_value <= max_value:
            raise ValueError(f'guidance_scale needs 0 <= min_value <= max_value, got [{min_value}, {max_value}]')
        if type == 'log-uniform' and min_value <= 0:
            raise ValueError(f'log-uniform guidance_scale needs min_value > 0, got {min_value}')
        self.type, self.min_value, self.max_value = type, float(min_value), float(max_value)

    def __call__(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        u = torch.rand(n, device=device)
        if self.type == 'uniform':
            return self.min_value + (self.max_value - self.min_value) * u
        lo, hi = math.log(self.min_value), math.log(self.max_value)
        return torch.exp(lo + (hi - lo) * u)

    @property
    def mean(self) -> float:
        if self.type == 'uniform' or self.min_value == self.max_value:
            return (self.min_value + self.max_value) / 2
        return (self.max_value - self.min_value) / math.log(self.max_value / self.min_value)

    def __repr__(self) -> str:
        return f'ScaleDistribution({self.type!r}, {self.min_value}, {self.max_value})'


GuidanceScale = Union[float, ScaleDistribution, Mapping[str, Any]]


def make_guidance_scale(spec: GuidanceScale) -> float | ScaleDistribution:
    """A number, or {'type': 'uniform' | 'log-uniform', 'min_value': a, 'max_value': b}."""
    if isinstance(spec, ScaleDistribution):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, (int, float, Mapping)):
        raise TypeError(f'guidance_scale must be a number (the paper\'s w) or a dict '
                        f'{{"type": "uniform"|"log-uniform", "min_value": a, "max_value": b}}, got {spec!r}')
    if isinstance(spec, Mapping):
        unknown = set(spec) - {'type', 'min_value', 'max_value'}
        if unknown or not {'type', 'min_value', 'max_value'} <= set(spec):
            raise ValueError(f'guidance_scale distribution needs exactly the keys type, min_value, max_value; '
                             f'got {sorted(spec)}')
        return ScaleDistribution(spec['type'], spec['min_value'], spec['max_value'])
    if not math.isfinite(spec) or spec < 0:
        raise ValueError(f'guidance_scale (the paper\'s w) must be a finite number >= 0, got {spec}')
    return float(spec)


class AlignedDenoiser(nn.Module):
    """A drop-in for k_diffusion.layers.Denoiser whose loss trains the guided prediction (eq. A).

    inner_model is a Karras network F(c_in x, sigma, **cond), or one of k-diffusion's DDPM wrappers
    (DiscreteEpsDDPMDenoiser and subclasses, DiscreteVDDPMDenoiser), whose own preconditioning and
    eps / v target are then used.
    """

    def __init__(self, inner_model: nn.Module, sigma_data: float = 1., weighting: str | Callable = 'karras', *,
                 guidance_scale: GuidanceScale = 2., uncond: Mapping[str, Any] | None = None,
                 uncond_prob: float = 0.1, stop_grad_uncond: bool = False, mix: float = 1.):
        super().__init__()
        self.inner_model = inner_model
        if hasattr(inner_model, 'get_eps') and hasattr(inner_model, 'sigma_to_t'):
            self.parameterization = 'eps'
        elif hasattr(inner_model, 'get_v') and hasattr(inner_model, 'sigma_to_t'):
            self.parameterization = 'v'
        else:
            self.parameterization = 'karras'
        self.sigma_data = getattr(inner_model, 'sigma_data', sigma_data) if self.parameterization != 'karras' \
            else sigma_data
        if callable(weighting):
            self.weighting = weighting
        elif weighting == 'karras':
            self.weighting = torch.ones_like
        elif weighting == 'soft-min-snr':
            self.weighting = self._weighting_soft_min_snr
        elif weighting == 'snr':
            self.weighting = self._weighting_snr
        else:
            raise ValueError(f'weighting must be one of {WEIGHTINGS} or a callable, got {weighting!r}')
        self.guidance_scale = make_guidance_scale(guidance_scale)
        self.uncond = conditioning.check_uncond(uncond)
        if not 0 <= uncond_prob <= 1:
            raise ValueError(f'uncond_prob must lie in [0, 1], got {uncond_prob}')
        if not 0 <= mix <= 1:
            raise ValueError(f'mix must lie in [0, 1], got {mix}')
        self.uncond_prob, self.stop_grad_uncond, self.mix = float(uncond_prob), bool(stop_grad_uncond), float(mix)
        needs_null = self.uncond_prob > 0 or (self.mix > 0 and self.guidance_scale != 0)
        if needs_null and not self.uncond:
            raise ValueError('uncond (the null condition) is required when uncond_prob > 0 or guidance_scale != 0; '
                             'pass e.g. uncond={"class_cond": num_classes}')

    def _weighting_soft_min_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        return (sigma * self.sigma_data) ** 2 / (sigma ** 2 + self.sigma_data ** 2) ** 2

    def _weighting_snr(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)

    def get_scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """(c_skip, c_out, c_in) of the preconditioning (Karras et al. 2022, table 1)."""
        if self.parameterization == 'eps':
            c_out, c_in = self.inner_model.get_scalings(sigma)
            return torch.ones_like(sigma), c_out, c_in
        if self.parameterization == 'v':
            return self.inner_model.get_scalings(sigma)
        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2) ** 0.5
        return c_skip, c_out, c_in

    def network(self, input: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The raw prediction F (eps or v for the DDPM wrappers) for preconditioned input c_in x."""
        if self.parameterization == 'eps':
            return self.inner_model.get_eps(input, self.inner_model.sigma_to_t(sigma), **kwargs)
        if self.parameterization == 'v':
            return self.inner_model.get_v(input, self.inner_model.sigma_to_t(sigma), **kwargs)
        return self.inner_model(input, sigma, **kwargs)

    def sample_guidance_scale(self, n: int, device: torch.device | str) -> torch.Tensor:
        """The training-time w for n rows."""
        if isinstance(self.guidance_scale, ScaleDistribution):
            return self.guidance_scale(n, device)
        return torch.full((n,), self.guidance_scale, device=device)

    def loss(self, input: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The per-row loss [B]: eq. A on conditional rows, the standard loss on the null anchor rows."""
        batch_size, device = input.shape[0], input.device
        c_skip, c_out, c_in = [append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        c_weight = self.weighting(sigma)
        noised_input = input + noise * append_dims(sigma, input.ndim)
        target = noise if self.parameterization == 'eps' else (input - c_skip * noised_input) / c_out

        # Anchor rows (CFG's condition dropout) are trained on the null condition.
        anchor = torch.rand(batch_size, device=device) < self.uncond_prob if self.uncond_prob > 0 else None
        if anchor is not None and anchor.any():
            all_rows = torch.arange(batch_size, device=device)
            null = conditioning.null_rows(kwargs, self.uncond, all_rows, batch_size, device)
            main_kwargs = conditioning.where_rows(anchor, null, kwargs)
        else:
            main_kwargs = kwargs

        # Conditional rows with w != 0 also need F_u, in the same batched call.
        guided = torch.zeros(batch_size, dtype=torch.bool, device=device)
        w = None
        if self.mix > 0 and self.guidance_scale != 0:
            w = self.sample_guidance_scale(batch_size, device)
            guided = w != 0 if anchor is None else (w != 0) & ~anchor
        rows = guided.nonzero().squeeze(1)
        n = rows.shape[0]
        model_input = noised_input * c_in
        if n == 0:
            model_output = self.network(model_input, sigma, **main_kwargs)
        else:
            null = conditioning.null_rows(kwargs, self.uncond, rows, batch_size, device)
            if self.stop_grad_uncond:
                model_output = self.network(model_input, sigma, **main_kwargs)
                with torch.no_grad():
                    uncond_output = self.network(model_input[rows], sigma[rows], **null)
            else:
                both = conditioning.cat_rows(main_kwargs, null, batch_size, n)
                output = self.network(torch.cat([model_input, model_input[rows]]), torch.cat([sigma, sigma[rows]]),
                                      **both)
                model_output, uncond_output = output[:batch_size], output[batch_size:]

        sq_error = ((model_output - target) ** 2).flatten(1).mean(1)
        if n:
            w_rows = append_dims(w[rows], input.ndim).to(model_output.dtype)
            guided_output = (1 + w_rows) * model_output[rows] - w_rows * uncond_output
            aligned = ((guided_output - target[rows]) ** 2).flatten(1).mean(1)
            if self.mix < 1:
                aligned = self.mix * aligned + (1 - self.mix) * sq_error[rows]
            sq_error = sq_error.index_put((rows,), aligned)
        return sq_error * c_weight

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The denoiser D(x; sigma, c) = c_skip x + c_out F(c_in x; sigma, c)."""
        if self.parameterization != 'karras':
            return self.inner_model(input, sigma, **kwargs)
        c_skip, c_out, c_in = [append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        return self.inner_model(input * c_in, sigma, **kwargs) * c_out + input * c_skip
