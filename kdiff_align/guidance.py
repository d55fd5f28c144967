"""Classifier-free guidance for every k-diffusion sampler.

Convention (docs/design.md section 3): kdiff-align speaks the paper's w (Ho & Salimans 2022), where w = 0 is the
unguided conditional denoiser. Hosts speak the scale s = 1 + w (k-diffusion's cfg_scale, ComfyUI's cfg,
diffusers' guidance_scale, A1111's CFG scale). `w_to_cfg_scale` and `cfg_scale_to_w` are the only place
the two are converted.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from . import conditioning
from .objective import OBJECTIVES, TELLS_W, check_sigma_interval, zero_outside  # noqa: F401 (re-exported)

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

    guidance_scale is the paper's w: a number, or a schedule sigma -> w (a callable of the sigma tensor [B]).
    uncond holds the keyword arguments that replace extra_args for the unconditional branch. Both branches
    run in one batched call; rows with w = 0 or sigma outside sigma_interval (guidance interval,
    Kynkäänniemi et al. 2024) skip the unconditional branch, and a step where every row does so makes a
    single conditional call.
    """

    def __init__(self, denoiser: nn.Module, guidance_scale: GuidanceSchedule, *,
                 uncond: Mapping[str, Any] | None = None,
                 sigma_interval: Sequence[float] | None = None):
        super().__init__()
        if not callable(guidance_scale) and not isinstance(guidance_scale, (int, float)):
            raise TypeError(f'guidance_scale must be a number (the paper\'s w) or a callable sigma -> w, '
                            f'got {type(guidance_scale).__name__}')
        self.inner_model = denoiser
        self.guidance_scale = guidance_scale
        self.uncond = conditioning.check_uncond(uncond)
        self.sigma_interval = check_sigma_interval(sigma_interval)
        if not self.uncond and not (isinstance(guidance_scale, (int, float)) and guidance_scale == 0):
            raise ValueError('guidance needs the null condition: pass uncond, e.g. {"class_cond": num_classes} '
                             'or {"cond": empty_prompt_embedding}')

    def scale_at(self, sigma: torch.Tensor) -> torch.Tensor:
        """The paper's w for each row, 0 where sigma lies outside the guidance interval."""
        w = self.guidance_scale(sigma) if callable(self.guidance_scale) else self.guidance_scale
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


W_REL_TOL = 1e-5   # a w as the tools print it ('%g': 6 significant digits) names the w it was printed from


def same_w(a: float, b: float) -> bool:
    """Whether two w are the same up to W_REL_TOL, so that a w copied from any printout (e.g. an MG model's trained
    w_mg = w / (1 - w), printed as 0.818182) selects the path of the w it was printed from."""
    return math.isclose(a, b, rel_tol=W_REL_TOL, abs_tol=1e-9)


def sampling_passes(objective: str, w: float, w_range: Sequence[float] | None) -> int:
    """Network evaluations per sampling step at w: 1 for gft and distill, and for mg at its trained w_mg
    (w_range's, up to same_w); 2 otherwise (CFG, also on top of an mg model at any other w)."""
    if objective in TELLS_W or (objective == 'mg' and same_w(w, w_range[1])):
        return 1
    return 2


def trained_w(objective: str, w_range: Sequence[float] | None, w_sample: float) -> float:
    """The w to sample at when none is given (`--w trained`): an mg model's trained w_mg (its one-pass w), else
    w_sample (gft, distill: within the trained range; aligned: the config's)."""
    return float(w_range[1]) if objective == 'mg' else float(w_sample)


def w_on_top_of_mg(w: float, w_mg: float) -> float:
    """The CFG w' that samples an MG model (trained guidance w_mg) at effective guidance w:
    (1 + w')(1 + w_mg) - 1 = w."""
    return (1 + w) / (1 + w_mg) - 1


def check_w(objective: str, w: float, w_range: Sequence[float] | None) -> None:
    """Raises ValueError for a w a model of this objective cannot be sampled at (gft, distill: outside w_range)."""
    if objective not in OBJECTIVES:
        raise ValueError(f'objective must be one of {", ".join(map(repr, OBJECTIVES))}; got {objective!r}')
    if objective != 'aligned' and w_range is None:
        raise ValueError(f'a {objective} model needs the w range it was trained for (w_range)')
    inside = w_range is not None and (w_range[0] <= w <= w_range[1] or any(same_w(w, end) for end in w_range))
    if objective in TELLS_W and not inside:
        raise ValueError(f'w {w:g} is outside the range [{w_range[0]:g}, {w_range[1]:g}] that this {objective} model '
                         'was trained for (align.w_train); sample it at a w in that range')


def guided_denoiser(denoiser: nn.Module, objective: str, w: float, *, w_range: Sequence[float] | None = None,
                    uncond: Mapping[str, Any] | None = None, sigma_interval: Sequence[float] | None = None
                    ) -> nn.Module:
    """The k-diffusion denoiser that samples a model of the given objective at the paper's w (docs/design.md
    section 6). w_range is the w range a one-pass model was trained for (mg: its effective guidance w_mg).

    - 'aligned' (and standard CFG): two-pass CFG, GuidedDenoiser, with the guidance interval;
    - 'gft', 'distill': ONE network evaluation per step, the network told w (OnePassDenoiser), for w in
      w_range (check_w's ValueError otherwise); the guidance interval tells it w = 0 outside;
    - 'mg': one pass of the plain conditional model at w = w_mg; any other w is two-pass CFG on top of it at
      w_on_top_of_mg(w, w_mg).
    """
    check_w(objective, w, w_range)
    if objective in TELLS_W:
        return OnePassDenoiser(denoiser, w, sigma_interval=sigma_interval)
    if objective == 'mg' and sampling_passes(objective, w, w_range) == 1:
        return OnePassDenoiser(denoiser)
    cfg_w = w_on_top_of_mg(w, w_range[1]) if objective == 'mg' else w
    return GuidedDenoiser(denoiser, cfg_w, uncond=uncond, sigma_interval=sigma_interval)
