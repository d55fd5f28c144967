"""Training-time guidance objectives (docs/design.md sections 1 and 6; Patel et al., arXiv 2311.00938).

Upstream k-diffusion trains F toward T = (x0 - c_skip x) / c_out with loss lambda(sigma) mean((F - T)^2).
Sampling with guidance uses F_w = (1 + w) F_c - w F_u, so the aligned objective trains that combination:

    L_aligned = lambda(sigma) mean((F_w - T)^2)                                  (eq. A)

A fraction uncond_prob of rows (the anchor) gets the standard loss on the null condition, and on the
conditional rows L = mix L_aligned + (1 - mix) L_standard. mix = 0 or w = 0 is upstream CFG training.

The family: AlignedDenoiser and GFTDenoiser are one coefficient form, a G + b F_u -> T, on either side of
beta = 1 (a = beta = 1 + w, or 1 / (1 + w) with G told w); TeacherTargetDenoiser trains F_c toward a guided
target built by a no-grad teacher (model-guidance with the EMA model, or guidance distillation). GFT, MG
and distillation models sample guided in one network evaluation per step (guidance.OnePassDenoiser).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

import torch
from torch import nn

from . import conditioning

WEIGHTINGS = ('karras', 'soft-min-snr', 'snr')
# The family (docs/design.md section 6): gft, mg and distill sample guided in one network evaluation per step.
OBJECTIVES = ('aligned', 'gft', 'mg', 'distill')
ONE_PASS = ('gft', 'mg', 'distill')
TELLS_W = ('gft', 'distill')     # the network is told w (a guidance embedding)
SCALE_DISTRIBUTIONS = ('uniform', 'log-uniform')


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """Appends singleton dimensions to x until it has target_dims dimensions."""
    return x[(...,) + (None,) * (target_dims - x.ndim)]


def check_sigma_interval(sigma_interval: Sequence[float] | None) -> tuple[float, float] | None:
    """Validates a guidance interval [sigma_lo, sigma_hi]."""
    if sigma_interval is None:
        return None
    try:
        lo, hi = (float(s) for s in sigma_interval)
    except (TypeError, ValueError):
        raise ValueError(f'sigma_interval must be two noise levels [sigma_lo, sigma_hi], got {sigma_interval!r}')
    if not 0 <= lo <= hi:
        raise ValueError(f'sigma_interval must satisfy 0 <= sigma_lo <= sigma_hi, got [{lo}, {hi}]')
    return lo, hi


def zero_outside(w: torch.Tensor, sigma: torch.Tensor, sigma_interval: tuple[float, float] | None) -> torch.Tensor:
    """w per row, 0 where sigma lies outside sigma_interval (None: everywhere inside)."""
    if sigma_interval is None:
        return w
    lo, hi = sigma_interval
    return torch.where((sigma >= lo) & (sigma <= hi), w, torch.zeros_like(w))


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


def mg_effective_w(w_train: float) -> float:
    """The CFG w that a model-guidance model trained at w samples in one pass: w / (1 - w) (docs/design.md 6(b))."""
    return w_train / (1 - w_train)


def trained_w_range(kind: str, w_train: GuidanceScale) -> tuple[float, float]:
    """[lo, hi] of the w a model of objective kind was trained for ([w, w] for a fixed w; mg: its effective w)."""
    w = make_guidance_scale(w_train)
    lo, hi = (w.min_value, w.max_value) if isinstance(w, ScaleDistribution) else (w, w)
    return (mg_effective_w(lo), mg_effective_w(hi)) if kind == 'mg' else (lo, hi)


def default_w_sample(kind: str, w_train: GuidanceScale) -> float:
    """align.w_sample's default: the trained w (a distribution's mean; mg: its effective w)."""
    w = make_guidance_scale(w_train)
    w = w.mean if isinstance(w, ScaleDistribution) else w
    return mg_effective_w(w) if kind == 'mg' else w


def parameterization(inner_model: nn.Module) -> str:
    """'eps' or 'v' for k-diffusion's DDPM wrappers, 'karras' for a network F(c_in x, sigma, **cond)."""
    if hasattr(inner_model, 'get_eps') and hasattr(inner_model, 'sigma_to_t'):
        return 'eps'
    if hasattr(inner_model, 'get_v') and hasattr(inner_model, 'sigma_to_t'):
        return 'v'
    return 'karras'


def raw_prediction(model: nn.Module, kind: str, input: torch.Tensor, sigma: torch.Tensor, **kwargs: Any
                   ) -> torch.Tensor:
    """The raw prediction F of a model of parameterization kind (eps or v for the DDPM wrappers)."""
    if kind == 'eps':
        return model.get_eps(input, model.sigma_to_t(sigma), **kwargs)
    if kind == 'v':
        return model.get_v(input, model.sigma_to_t(sigma), **kwargs)
    return model(input, sigma, **kwargs)


class GuidanceObjective(nn.Module):
    """What every training-time guidance objective shares: k-diffusion's preconditioning and weighting, the
    null condition, the anchor rows and the one-shape option. Subclasses define loss().

    inner_model is a Karras network F(c_in x, sigma, **cond), or one of k-diffusion's DDPM wrappers
    (DiscreteEpsDDPMDenoiser and subclasses, DiscreteVDDPMDenoiser), whose own preconditioning and
    eps / v target are then used.

    fixed_rows evaluates F_u for every row, anchors included, and drops the anchors' afterwards, so the
    network always sees the same number of rows instead of a count that changes with each draw of the anchor
    rows: the loss is the same, at 2 / (2 - uncond_prob) of the FLOPs, and every step has one shape, which
    cuDNN's plan cache and torch.compile need (on an H200 a new row count per step made the aligned step
    several times slower and recompiled a compiled model; docs/gpu.md). None: on CUDA only.
    """

    def __init__(self, inner_model: nn.Module, sigma_data: float = 1., weighting: str | Callable = 'karras', *,
                 guidance_scale: GuidanceScale = 2., uncond: Mapping[str, Any] | None = None,
                 uncond_prob: float = 0.1, fixed_rows: bool | None = None):
        super().__init__()
        self.inner_model = inner_model
        self.parameterization = parameterization(inner_model)
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
        self.uncond_prob, self.fixed_rows = float(uncond_prob), fixed_rows

    def _require_null(self, needed: bool) -> None:
        if needed and not self.uncond:
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
        return raw_prediction(self.inner_model, self.parameterization, input, sigma, **kwargs)

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The denoiser D(x; sigma, c) = c_skip x + c_out F(c_in x; sigma, c)."""
        if self.parameterization != 'karras':
            return self.inner_model(input, sigma, **kwargs)
        c_skip, c_out, c_in = [append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        return self.inner_model(input * c_in, sigma, **kwargs) * c_out + input * c_skip

    def sample_guidance_scale(self, n: int, device: torch.device | str) -> torch.Tensor:
        """The training-time w for n rows."""
        if isinstance(self.guidance_scale, ScaleDistribution):
            return self.guidance_scale(n, device)
        return torch.full((n,), self.guidance_scale, device=device)

    def uses_fixed_rows(self, input: torch.Tensor) -> bool:
        return self.fixed_rows if self.fixed_rows is not None else input.is_cuda

    def prepare(self, input: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, kwargs: Mapping[str, Any]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """(c_in x, target T, lambda(sigma), anchor mask, the kwargs with the anchors' null condition)."""
        batch_size, device = input.shape[0], input.device
        c_skip, c_out, c_in = [append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        noised_input = input + noise * append_dims(sigma, input.ndim)
        target = noise if self.parameterization == 'eps' else (input - c_skip * noised_input) / c_out
        # Anchor rows (CFG's condition dropout) are trained on the null condition.
        anchor = torch.rand(batch_size, device=device) < self.uncond_prob if self.uncond_prob > 0 else None
        if anchor is not None and anchor.any():
            all_rows = torch.arange(batch_size, device=device)
            null = conditioning.null_rows(kwargs, self.uncond, all_rows, batch_size, device)
            kwargs = conditioning.where_rows(anchor, null, kwargs)
        return noised_input * c_in, target, self.weighting(sigma), anchor, dict(kwargs)

class AlignedDenoiser(GuidanceObjective):
    """A drop-in for k_diffusion.layers.Denoiser whose loss trains the guided prediction (eq. A).

    The coefficient form of docs/design.md section 6(a): on guided rows L = lambda mean((a G + b F_u - T)^2)
    with (a, b) = coefficients(w); here (1 + w, -w), so a G + b F_u = (1 + w) F_c - w F_u is CFG's
    combination at the training w. GFTDenoiser is the same loss with other coefficients. Anchor rows get the
    standard loss on the null condition; on the other rows L = mix L_aligned + (1 - mix) L_standard.
    See GuidanceObjective for inner_model and fixed_rows.
    """

    tells_w = False   # whether the network is told w (guidance_cond), as GFT's is

    def __init__(self, inner_model: nn.Module, sigma_data: float = 1., weighting: str | Callable = 'karras', *,
                 guidance_scale: GuidanceScale = 2., uncond: Mapping[str, Any] | None = None,
                 uncond_prob: float = 0.1, stop_grad_uncond: bool = False, mix: float = 1.,
                 fixed_rows: bool | None = None):
        super().__init__(inner_model, sigma_data, weighting, guidance_scale=guidance_scale, uncond=uncond,
                         uncond_prob=uncond_prob, fixed_rows=fixed_rows)
        if not 0 <= mix <= 1:
            raise ValueError(f'mix must lie in [0, 1], got {mix}')
        self.stop_grad_uncond, self.mix = bool(stop_grad_uncond), float(mix)
        self._require_null(self.uncond_prob > 0 or (self.mix > 0 and self.guidance_scale != 0))

    @staticmethod
    def coefficients(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(a, b) with a + b = 1 of the guided prediction a G + b F_u: (1 + w, -w), i.e. beta = 1 + w."""
        return 1 + w, -w

    def loss(self, input: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The per-row loss [B]: the coefficient form on guided rows, the standard loss on anchor rows."""
        batch_size, device = input.shape[0], input.device
        model_input, target, c_weight, anchor, main_kwargs = self.prepare(input, noise, sigma, kwargs)

        # Conditional rows with w != 0 also need F_u, in the same batched call.
        guided = torch.zeros(batch_size, dtype=torch.bool, device=device)
        w = None
        if self.mix > 0 and self.guidance_scale != 0:
            w = self.sample_guidance_scale(batch_size, device)
            guided = w != 0 if anchor is None else (w != 0) & ~anchor
            if self.tells_w:  # the network is told w on guided rows, 0 elsewhere (anchors: the standard loss)
                main_kwargs['guidance_cond'] = torch.where(guided, w, torch.zeros_like(w))
        elif self.tells_w:
            main_kwargs['guidance_cond'] = torch.zeros(batch_size, device=device)
        rows = guided.nonzero().squeeze(1)
        n = rows.shape[0]
        if n == 0:
            model_output = self.network(model_input, sigma, **main_kwargs)
        else:
            fixed = self.uses_fixed_rows(input)
            twins = torch.arange(batch_size, device=device) if fixed else rows  # the rows that get F_u
            null = conditioning.null_rows(main_kwargs, self.uncond, twins, batch_size, device)
            if self.stop_grad_uncond:
                model_output = self.network(model_input, sigma, **main_kwargs)
                with torch.no_grad():
                    uncond_output = self.network(model_input[twins], sigma[twins], **null)
            else:
                both = conditioning.cat_rows(main_kwargs, null, batch_size, twins.shape[0])
                output = self.network(torch.cat([model_input, model_input[twins]]),
                                      torch.cat([sigma, sigma[twins]]), **both)
                model_output, uncond_output = output[:batch_size], output[batch_size:]
            if fixed:
                uncond_output = uncond_output[rows]

        sq_error = ((model_output - target) ** 2).flatten(1).mean(1)
        if n:
            a, b = (append_dims(c, input.ndim).to(model_output.dtype) for c in self.coefficients(w[rows]))
            guided_output = a * model_output[rows] + b * uncond_output
            aligned = ((guided_output - target[rows]) ** 2).flatten(1).mean(1)
            if self.mix < 1:
                aligned = self.mix * aligned + (1 - self.mix) * sq_error[rows]
            sq_error = sq_error.index_put((rows,), aligned)
        return sq_error * c_weight


class GFTDenoiser(AlignedDenoiser):
    """Guidance-free training (Chen et al. 2025): the coefficient form at beta = 1 / (1 + w).

    Guided rows train a G + b F_u toward T with (a, b) = (1 / (1 + w), w / (1 + w)), G the network told w
    (keyword argument guidance_cond) and F_u its null-condition output at w = 0 without gradient; anchor rows
    get the standard loss at w = 0. At the optimum G(x; sigma, c, w) = T_c + w (T_c - T_u), CFG's guided
    prediction, so sampling is ONE network evaluation per step (guidance.OnePassDenoiser). w is drawn per
    row (default uniform on [0, 4]); the network needs a w input (models.GuidanceEmbedding).
    """

    tells_w = True

    def __init__(self, inner_model: nn.Module, sigma_data: float = 1., weighting: str | Callable = 'karras', *,
                 guidance_scale: GuidanceScale | None = None, uncond: Mapping[str, Any] | None = None,
                 uncond_prob: float = 0.1, fixed_rows: bool | None = None):
        if guidance_scale is None:
            guidance_scale = {'type': 'uniform', 'min_value': 0., 'max_value': 4.}
        super().__init__(inner_model, sigma_data, weighting, guidance_scale=guidance_scale, uncond=uncond,
                         uncond_prob=uncond_prob, stop_grad_uncond=True, mix=1., fixed_rows=fixed_rows)
        self.uncond = {**self.uncond, 'guidance_cond': 0.}

    @staticmethod
    def coefficients(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(1 / (1 + w), w / (1 + w)): beta = 1 / (1 + w)."""
        return 1 / (1 + w), w / (1 + w)


TEACHER_KINDS = ('mg', 'distill')


class TeacherTargetDenoiser(GuidanceObjective):
    """The teacher-target form (docs/design.md section 6(b)): L = lambda mean((G - T')^2) on conditional rows,
    with a guided target T' = base + w (F^t_c - F^t_u) from a teacher evaluated without gradient.

    - kind 'mg' (model-guidance, Tang et al. 2025): base = T, teacher = the EMA of the model itself (None:
      the model's current weights), w fixed in [0, 1); rows with sigma outside sigma_range, and every row
      during the first warmup_steps optimizer steps (counted by the training loop's steps_done), get the
      standard loss. The fixed point is CFG at
      w / (1 - w) with no w input: one-pass sampling of the plain conditional model.
    - kind 'distill' (guidance distillation, Meng et al. 2023, stage 1): base = F^t_c, a frozen teacher
      trained with CFG, w drawn per row and told to the student (guidance_cond).

    The teacher is held outside the module's parameters and state_dict: it gets no gradient, is not in the
    optimizer and is not saved with the student. Anchor rows get the standard loss on the null condition.
    """

    def __init__(self, inner_model: nn.Module, teacher: nn.Module | None, sigma_data: float = 1.,
                 weighting: str | Callable = 'karras', *, kind: str, guidance_scale: GuidanceScale = 0.45,
                 uncond: Mapping[str, Any] | None = None, uncond_prob: float = 0.1,
                 sigma_range: Sequence[float] | None = None, warmup_steps: int = 0,
                 steps_done: Callable[[], int] | None = None, fixed_rows: bool | None = None):
        super().__init__(inner_model, sigma_data, weighting, guidance_scale=guidance_scale, uncond=uncond,
                         uncond_prob=uncond_prob, fixed_rows=fixed_rows)
        if kind not in TEACHER_KINDS:
            raise ValueError(f'kind must be one of {TEACHER_KINDS}, got {kind!r}')
        if kind == 'mg' and not (isinstance(self.guidance_scale, float) and 0 <= self.guidance_scale < 1):
            raise ValueError(f"model-guidance needs a fixed w in [0, 1) (its fixed point is CFG at w / (1 - w)), "
                             f"got {self.guidance_scale!r}")
        if teacher is not None and parameterization(teacher) != self.parameterization:
            raise ValueError(f'the teacher predicts {parameterization(teacher)!r}, the student '
                             f'{self.parameterization!r}; both must be the same kind of model')
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f'warmup_steps must be an integer >= 0, got {warmup_steps!r}')
        if warmup_steps and steps_done is None:
            raise ValueError('warmup_steps needs steps_done, the training loop\'s count of optimizer steps')
        self.kind, self.tells_w = kind, kind == 'distill'
        self.sigma_range = check_sigma_interval(sigma_range)
        self.warmup_steps, self.steps_done = warmup_steps, steps_done
        self._teacher = [teacher]   # a list: not a submodule, so no parameters, gradient or state_dict entries
        self._require_null(True)

    @property
    def active(self) -> bool:
        """Whether the guided target applies: after warmup_steps optimizer steps (steps_done())."""
        return not self.warmup_steps or self.steps_done() >= self.warmup_steps

    @property
    def teacher(self) -> nn.Module:
        """The teacher network (the model itself under no_grad for MG without an EMA)."""
        return self._teacher[0] if self._teacher[0] is not None else self.inner_model

    def loss(self, input: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The per-row loss [B]: (G - T')^2 on conditional rows, the standard loss on anchor rows."""
        if self.kind == 'distill' and self._teacher[0] is None:
            raise ValueError('guidance distillation needs a teacher to train: a frozen model trained with CFG on '
                             'the same data (without one, this wrapper only samples)')
        batch_size, device = input.shape[0], input.device
        model_input, target, c_weight, anchor, main_kwargs = self.prepare(input, noise, sigma, kwargs)
        conditional = torch.ones(batch_size, dtype=torch.bool, device=device) if anchor is None else ~anchor
        w = self.sample_guidance_scale(batch_size, device)
        if not self.active:
            w = torch.zeros_like(w)
        w = zero_outside(w, sigma, self.sigma_range)
        # MG changes the target of rows with w != 0; distillation replaces the target of every conditional row.
        targeted = conditional & (w != 0) if self.kind == 'mg' else conditional
        teacher_kwargs = dict(main_kwargs)
        if self.tells_w:
            main_kwargs['guidance_cond'] = torch.where(conditional, w, torch.zeros_like(w))
        rows = targeted.nonzero().squeeze(1)
        if rows.shape[0]:
            twins = torch.arange(batch_size, device=device) if self.uses_fixed_rows(input) else rows
            n = twins.shape[0]
            cond = conditioning.take_rows(teacher_kwargs, twins, batch_size)
            null = conditioning.null_rows(teacher_kwargs, self.uncond, twins, batch_size, device)
            with torch.no_grad():
                out = raw_prediction(self.teacher, self.parameterization, model_input[twins].repeat(2, *[1] * (
                    input.ndim - 1)), sigma[twins].repeat(2), **conditioning.cat_rows(cond, null, n, n))
            if twins.shape[0] != rows.shape[0]:
                out = torch.cat([out[:n][rows], out[n:][rows]])
            t_cond, t_uncond = out.chunk(2)
            w_rows = append_dims(w[rows], input.ndim).to(t_cond.dtype)
            base = target[rows] if self.kind == 'mg' else t_cond
            target = target.index_put((rows,), (base + w_rows * (t_cond - t_uncond)).to(target.dtype))
        output = self.network(model_input, sigma, **main_kwargs)
        return ((output - target) ** 2).flatten(1).mean(1) * c_weight
