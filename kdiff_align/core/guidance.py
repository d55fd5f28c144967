"""Classifier-free guidance for every k-diffusion sampler.

Convention (docs/design.md section 3): kdiff-align speaks the paper's w (Ho & Salimans 2022), where w = 0 is the
unguided conditional denoiser. Hosts speak the scale s = 1 + w (k-diffusion's cfg_scale, ComfyUI's cfg,
diffusers' guidance_scale, A1111's CFG scale). `w_to_cfg_scale` and `cfg_scale_to_w` are the only place
the two are converted.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from . import conditioning, registry
from .registry import check_sigma_interval, same_w, zero_outside  # noqa: F401 (re-exported)

GuidanceSchedule = Union[float, Callable[[torch.Tensor], Union[torch.Tensor, float]]]


def w_to_cfg_scale(w: float) -> float:
    """The host's CFG scale s = 1 + w for the paper's guidance weight w."""
    return 1.0 + w


def cfg_scale_to_w(cfg_scale: float) -> float:
    """The paper's guidance weight w = s - 1 for a host's CFG scale s."""
    return cfg_scale - 1.0


def guide(denoised_cond: torch.Tensor, denoised_uncond: torch.Tensor, w: torch.Tensor | float) -> torch.Tensor:
    """D_w = D_u + (1 + w)(D_c - D_u) (Ho & Salimans 2022, eq. 6), w broadcast over trailing dims."""
    if isinstance(w, torch.Tensor) and w.ndim:
        w = w.view(-1, *[1] * (denoised_cond.ndim - 1)).to(denoised_cond.dtype)
    return denoised_uncond + (1 + w) * (denoised_cond - denoised_uncond)


class GuidedDenoiser(nn.Module):
    """A k-diffusion denoiser with classifier-free guidance: model(x, sigma, **extra_args) -> D_w.

    w is the paper's w (older keyword: guidance_scale): a number, or a schedule sigma -> w (a callable of the
    sigma tensor [B]). uncond holds the keyword arguments that replace extra_args for the unconditional
    branch. Both branches run in one batched call; rows with w = 0 or sigma outside sigma_interval (the
    guidance interval, Kynkäänniemi et al. 2024) skip the unconditional branch, and a step where every row
    does so makes a single conditional call.
    """

    def __init__(self, denoiser: nn.Module, w: GuidanceSchedule | None = None, *,
                 uncond: Mapping[str, Any] | None = None,
                 sigma_interval: Sequence[float] | None = None, guidance_scale: GuidanceSchedule | None = None):
        super().__init__()
        if w is not None and guidance_scale is not None:
            raise TypeError('pass w or its older name guidance_scale, not both')
        w = guidance_scale if w is None else w
        if not callable(w) and not isinstance(w, (int, float)):
            raise TypeError(f'w must be a number (the paper\'s w) or a callable sigma -> w, '
                            f'got {type(w).__name__}')
        self.inner_model = denoiser
        self.w = w
        self.uncond = conditioning.check_uncond(uncond)
        self.sigma_interval = check_sigma_interval(sigma_interval)
        if not self.uncond and not (isinstance(w, (int, float)) and w == 0):
            raise ValueError('guidance needs the null condition: pass uncond, e.g. {"class_cond": num_classes} '
                             'or {"cond": empty_prompt_embedding}')

    guidance_scale = property(lambda self: self.w)   # the older name of the paper's w

    def scale_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The paper's w for each row, 0 where sigma lies outside the guidance interval."""
        w = self.w(sigma) if callable(self.w) else self.w
        return zero_outside(torch.as_tensor(w, dtype=sigma.dtype, device=sigma.device).expand(sigma.shape), sigma,
                            self.sigma_interval)

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        batch_size = input.shape[0]
        sigma = torch.as_tensor(sigma, device=input.device).expand(batch_size)
        w = self.scale_at(sigma)
        guided = (w != 0).nonzero().squeeze(1)
        n = guided.shape[0]
        if n == 0:
            return self.inner_model(input, sigma, **extra_args)
        null = conditioning.null_rows(extra_args, self.uncond, guided, batch_size, input.device)
        both = conditioning.cat_rows(extra_args, null, batch_size, n)
        denoised = self.inner_model(torch.cat([input, input[guided]]), torch.cat([sigma, sigma[guided]]), **both)
        cond, uncond = denoised[:batch_size], denoised[batch_size:]
        if n == batch_size:
            return guide(cond, uncond, w)
        return cond.index_put((guided,), guide(cond[guided], uncond, w[guided]))


class OnePassDenoiser(nn.Module):
    """One network evaluation per step for models trained to be guided (GFT, guidance distillation, MG).

    model(x, sigma, **extra_args) = denoiser(x, sigma, **extra_args, guidance_cond=w) for a model told w
    (GFTDenoiser, distillation), or the plain conditional denoiser for an MG model (w None), whose one pass
    samples the effective guidance it was trained for. With sigma_interval, rows outside it are told w = 0.
    """

    def __init__(self, denoiser: nn.Module, w: float | None = None, *,
                 sigma_interval: Sequence[float] | None = None):
        super().__init__()
        if w is not None and (isinstance(w, bool) or not isinstance(w, (int, float)) or w < 0):
            raise ValueError(f"w must be a number >= 0 (the paper's w) or None for a model not told w, got {w!r}")
        if w is None and sigma_interval is not None:
            raise ValueError('a guidance interval needs a model told w; an MG model samples its trained guidance')
        self.inner_model, self.w = denoiser, w
        self.sigma_interval = check_sigma_interval(sigma_interval)

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, **extra_args: Any) -> torch.Tensor:
        if self.w is not None:
            sigma_rows = torch.as_tensor(sigma, device=input.device).expand(input.shape[0])
            w = torch.full_like(sigma_rows, float(self.w), dtype=torch.float32)
            extra_args['guidance_cond'] = zero_outside(w, sigma_rows, self.sigma_interval)
        return self.inner_model(input, sigma, **extra_args)


def sampling_passes(objective: str, w: float, w_range: Sequence[float] | None) -> int:
    """Network evaluations per sampling step at w (registry.Spec.passes): 1 for a model told w, and for an mg
    model at its trained w_mg (w_range's); 2 otherwise (CFG, also on top of an mg model at any other w)."""
    return registry.get(objective).passes(w, w_range)


w_on_top_of_mg = registry.w_on_top


def trained_w(objective: str, w_range: Sequence[float] | None, w_sample: float) -> float:
    """The w to sample at when none is given (`--w trained`): registry.Spec.trained_w."""
    return registry.get(objective).trained_w(w_range, w_sample)


def check_w(objective: str, w: float, w_range: Sequence[float] | None) -> None:
    """Raises ValueError for a w a model of this objective cannot be sampled at (gft, distill: outside w_range)."""
    registry.get(objective).plan(w, w_range)


# The sampling-time methods: two-pass CFG (with the guidance interval) and one pass of a model trained to be
# guided. Every sampler, export and host integration chooses between them here, from the objective's Spec.
SAMPLING_METHODS: dict[str, Callable[..., nn.Module]] = {
    'cfg': lambda denoiser, w, uncond, sigma_interval: GuidedDenoiser(denoiser, w, uncond=uncond,
                                                                      sigma_interval=sigma_interval),
    'one-pass': lambda denoiser, w, uncond, sigma_interval: OnePassDenoiser(
        denoiser, w, sigma_interval=sigma_interval if w is not None else None),
}


def guided_denoiser(denoiser: nn.Module, objective: str, w: float, *, w_range: Sequence[float] | None = None,
                    uncond: Mapping[str, Any] | None = None, sigma_interval: Sequence[float] | None = None
                    ) -> nn.Module:
    """The k-diffusion denoiser that samples a model of the given objective at the paper's w (docs/design.md
    section 6), as its Spec plans it. w_range is the w range a one-pass model was trained for (mg: its
    effective guidance w_mg).

    - 'aligned' (and standard CFG): two-pass CFG, GuidedDenoiser, with the guidance interval;
    - 'gft', 'distill': ONE network evaluation per step, the network told w (OnePassDenoiser), for w in
      w_range (a ValueError otherwise); the guidance interval tells it w = 0 outside;
    - 'mg': one pass of the plain conditional model at w = w_mg; any other w is two-pass CFG on top of it at
      w_on_top_of_mg(w, w_mg).
    """
    method, method_w = registry.get(objective).plan(w, w_range)
    return SAMPLING_METHODS[method](denoiser, method_w, uncond, sigma_interval)
