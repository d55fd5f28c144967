"""Training-time guidance objectives (docs/design.md sections 1 and 6; Patel et al., arXiv 2311.00938).

Upstream k-diffusion trains F toward T = (x0 - c_skip x) / c_out with loss lambda(sigma) mean((F - T)^2).
Sampling with guidance uses F_w = (1 + w) F_c - w F_u, so the aligned objective trains that combination:

    L_aligned = lambda(sigma) mean((F_w - T)^2)                                  (eq. A)

The family is one equation with one loss body (GuidanceObjective.loss), its rules read from the objective's
registry.Spec:

    L = lambda(sigma) mean((a(w) F_c + b(w) F_u - target)^2)

aligned: (a, b) = (1 + w, -w), target T; gft: (1 / (1 + w), w / (1 + w)) with F_c told w and F_u without
gradient; mg and distill: a = 1, b = 0 and a target built by a no-grad teacher, T + w (F^t_c - F^t_u) or
(1 + w) F^t_c - w F^t_u. A fraction uncond_prob of rows (the anchor) gets the standard loss on the null
condition; with mix < 1, L = mix L + (1 - mix) L_standard on the conditional rows. w = 0 (or mix = 0) is
upstream's loss bit for bit. GFT, MG and distillation models sample guided in one network evaluation per step
(guidance.OnePassDenoiser).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from . import conditioning, registry
from .registry import (GuidanceScale, ScaleDistribution, Spec, check_sigma_interval,  # noqa: F401 (re-exported)
                       make_guidance_scale, make_w, mg_effective_w, zero_outside)

WEIGHTINGS = ('karras', 'soft-min-snr', 'snr')
SCALE_DISTRIBUTIONS = registry.SCALE_DISTRIBUTIONS


def append_dims(x: torch.Tensor, target_dims: int) -> torch.Tensor:
    """k_diffusion.utils.append_dims (imported when first used: importing this module loads no k-diffusion)."""
    from k_diffusion.utils import append_dims as upstream

    return upstream(x, target_dims)


def parameterization(inner_model: nn.Module) -> str:
    """'eps' or 'v' for k-diffusion's DDPM wrappers, 'karras' for a network F(c_in x, sigma, **cond)."""
    if hasattr(inner_model, 'get_eps') and hasattr(inner_model, 'sigma_to_t'):
        return 'eps'
    if hasattr(inner_model, 'get_v') and hasattr(inner_model, 'sigma_to_t'):
        return 'v'
    return 'karras'


# The raw prediction F of each parameterisation, for preconditioned input c_in x.
PREDICTIONS: dict[str, Callable[..., torch.Tensor]] = {
    'karras': lambda model, input, sigma, **kwargs: model(input, sigma, **kwargs),
    'eps': lambda model, input, sigma, **kwargs: model.get_eps(input, model.sigma_to_t(sigma), **kwargs),
    'v': lambda model, input, sigma, **kwargs: model.get_v(input, model.sigma_to_t(sigma), **kwargs),
}


def raw_prediction(model: nn.Module, kind: str, input: torch.Tensor, sigma: torch.Tensor, **kwargs: Any
                   ) -> torch.Tensor:
    """The raw prediction F of a model of parameterization kind (eps or v for the DDPM wrappers)."""
    return PREDICTIONS[kind](model, input, sigma, **kwargs)


def _alias(new: Any, old: Any, new_name: str, old_name: str) -> Any:
    """A keyword argument under its new name or its older one (not both)."""
    if old is not None and new is not None:
        raise TypeError(f'pass {new_name} or its older name {old_name}, not both')
    return old if new is None else new


class GuidanceObjective(nn.Module):
    """The family's one loss (docs/design.md section 6; the objective's rules come from its registry.Spec):

        L = lambda(sigma) mean((a(w) F_c + b(w) F_u - target)^2)

    on guided rows; anchor rows (uncond_prob, CFG's condition dropout) get the standard loss on the null
    condition, and with mix < 1, L = mix L + (1 - mix) L_standard. objective: a registered name or a Spec.

    inner_model is a Karras network F(c_in x, sigma, **cond), or one of k-diffusion's DDPM wrappers
    (DiscreteEpsDDPMDenoiser and subclasses, DiscreteVDDPMDenoiser), whose own preconditioning and eps / v
    target are then used; the Karras preconditioning and weighting are upstream's k_diffusion.layers.Denoiser.
    w_train (older name guidance_scale): the paper's w, a number or a distribution drawn per row (None: the
    objective's default). teacher: a teacher-target objective's teacher (None: the model itself under no_grad
    for an EMA teacher). target_sigma_range (older name sigma_range): where the teacher target applies;
    warmup_steps: optimizer steps (steps_done()) with the standard loss first.

    fixed_rows evaluates F_u for every row, anchors included, and drops the anchors' afterwards, so the
    network always sees the same number of rows instead of a count that changes with each draw of the anchor
    rows: the loss is the same, at 2 / (2 - uncond_prob) of the FLOPs, and every step has one shape, which
    cuDNN's plan cache and torch.compile need (on an H200 a new row count per step made the aligned step
    several times slower and recompiled a compiled model; docs/gpu.md). None: on CUDA only.
    """

    def __init__(self, inner_model: nn.Module, sigma_data: float = 1., weighting: str | Callable = 'karras', *,
                 objective: str | Spec = 'aligned', w_train: GuidanceScale | None = None,
                 guidance_scale: GuidanceScale | None = None, uncond: Mapping[str, Any] | None = None,
                 uncond_prob: float = 0.1, teacher: nn.Module | None = None, stop_grad_uncond: bool = False,
                 mix: float = 1., target_sigma_range: Sequence[float] | None = None,
                 sigma_range: Sequence[float] | None = None, warmup_steps: int = 0,
                 steps_done: Callable[[], int] | None = None, fixed_rows: bool | None = None):
        import k_diffusion as K

        super().__init__()
        self.spec = objective if isinstance(objective, Spec) else registry.get(objective)
        self.inner_model = inner_model
        # The parameterisation, chosen once: the preconditioning (c_skip, c_out, c_in), the raw prediction F, the
        # denoiser D and the target. A Karras network gets upstream's Denoiser (its scalings, weighting and
        # forward, held outside this module's tree); a DDPM wrapper its own scalings and eps / v prediction.
        self.parameterization = kind = parameterization(inner_model)
        if kind != 'karras':
            sigma_data = getattr(inner_model, 'sigma_data', sigma_data)
        if not callable(weighting) and weighting not in WEIGHTINGS:
            raise ValueError(f'weighting must be one of {WEIGHTINGS} or a callable, got {weighting!r}')
        upstream = K.layers.Denoiser(inner_model, sigma_data, 'karras' if callable(weighting) else weighting)
        self._upstream = (upstream,)
        self.sigma_data = sigma_data
        self.weighting = weighting if callable(weighting) else upstream.weighting
        self.get_scalings = {
            'karras': upstream.get_scalings,
            'eps': lambda sigma: (torch.ones_like(sigma), *inner_model.get_scalings(sigma)),
            'v': lambda sigma: inner_model.get_scalings(sigma)}[kind]
        self._denoise = upstream.__call__ if kind == 'karras' else inner_model.__call__   # bound: no submodule
        self._eps_target = kind == 'eps'   # the eps wrapper's target is the noise itself

        spec = self.spec
        given = _alias(w_train, guidance_scale, 'w_train', 'guidance_scale')
        self.w_train = make_w(spec.w_train_default if given is None else given)
        if spec.w_train_ok is not None and not spec.w_train_ok(self.w_train):
            raise ValueError(f'w_train: got {self.w_train!r}; allowed: {spec.w_train_rule}')
        self.uncond = conditioning.check_uncond(uncond)
        if spec.tells_w and spec.uncond != 'teacher':   # the network's own F_u is evaluated at w = 0
            self.uncond = {**self.uncond, 'guidance_cond': 0.}
        if not 0 <= uncond_prob <= 1:
            raise ValueError(f'uncond_prob must lie in [0, 1], got {uncond_prob}')
        if not 0 <= mix <= 1:
            raise ValueError(f'mix must lie in [0, 1], got {mix}')
        if teacher is not None and parameterization(teacher) != self.parameterization:
            raise ValueError(f'the teacher predicts {parameterization(teacher)!r}, the student '
                             f'{self.parameterization!r}; both must be the same kind of model')
        if not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f'warmup_steps must be an integer >= 0, got {warmup_steps!r}')
        if warmup_steps and steps_done is None:
            raise ValueError('warmup_steps needs steps_done, the training loop\'s count of optimizer steps')
        self.uncond_prob, self.fixed_rows = float(uncond_prob), fixed_rows
        self.stop_grad_uncond, self.mix = spec.uncond == 'stop-grad' or bool(stop_grad_uncond), float(mix)
        self.target_sigma_range = check_sigma_interval(_alias(target_sigma_range, sigma_range,
                                                              'target_sigma_range', 'sigma_range'))
        self.warmup_steps, self.steps_done = warmup_steps, steps_done
        self._teacher = [teacher]   # a list: not a submodule, so no parameters, gradient or state_dict entries
        if self.uncond_prob > 0 or spec.uncond == 'teacher' or self.guides:
            self._require_null()

    # Names: the paper's w is w_train; guidance_scale, kind and sigma_range are the older names.
    guidance_scale = property(lambda self: self.w_train, lambda self, value: setattr(self, 'w_train', value))
    sigma_range = property(lambda self: self.target_sigma_range)
    objective = property(lambda self: self.spec.name)
    kind = objective
    tells_w = property(lambda self: self.spec.tells_w)

    @property
    def guides(self) -> bool:
        """Whether any row can get the guided loss (w_train != 0 and mix > 0)."""
        return self.mix > 0 and self.w_train != 0

    def _require_null(self) -> None:
        if not self.uncond:
            raise ValueError('uncond (the null condition) is required when uncond_prob > 0 or w_train != 0; '
                             'pass e.g. uncond={"class_cond": num_classes}')

    @property
    def active(self) -> bool:
        """Whether the guided target applies: after warmup_steps optimizer steps (steps_done())."""
        return not self.warmup_steps or self.steps_done() >= self.warmup_steps

    @property
    def teacher(self) -> nn.Module:
        """The teacher network (the model itself under no_grad for an EMA teacher without an EMA)."""
        return self._teacher[0] if self._teacher[0] is not None else self.inner_model

    def network(self, input: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The raw prediction F (eps or v for the DDPM wrappers) for preconditioned input c_in x."""
        return raw_prediction(self.inner_model, self.parameterization, input, sigma, **kwargs)

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The denoiser D(x; sigma, c) = c_skip x + c_out F(c_in x; sigma, c)."""
        return self._denoise(input, sigma, **kwargs)

    def sample_w(self, n: int, device: torch.device | str) -> torch.Tensor:
        """The training-time w for n rows."""
        if isinstance(self.w_train, ScaleDistribution):
            return self.w_train(n, device)
        return torch.full((n,), self.w_train, device=device)

    sample_guidance_scale = sample_w   # the older name

    def uses_fixed_rows(self, input: torch.Tensor) -> bool:
        return self.fixed_rows if self.fixed_rows is not None else input.is_cuda

    def prepare(self, input: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, kwargs: Mapping[str, Any]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, dict[str, Any]]:
        """(c_in x, target T, lambda(sigma), anchor mask, the kwargs with the anchors' null condition)."""
        batch_size, device = input.shape[0], input.device
        c_skip, c_out, c_in = [append_dims(x, input.ndim) for x in self.get_scalings(sigma)]
        noised_input = input + noise * append_dims(sigma, input.ndim)
        target = noise if self._eps_target else (input - c_skip * noised_input) / c_out
        # Anchor rows (CFG's condition dropout) are trained on the null condition.
        anchor = torch.rand(batch_size, device=device) < self.uncond_prob if self.uncond_prob > 0 else None
        if anchor is not None and anchor.any():
            all_rows = torch.arange(batch_size, device=device)
            null = conditioning.null_rows(kwargs, self.uncond, all_rows, batch_size, device)
            kwargs = conditioning.where_rows(anchor, null, kwargs)
        return noised_input * c_in, target, self.weighting(sigma), anchor, dict(kwargs)

    def paired(self, network: nn.Module, model_input: torch.Tensor, sigma: torch.Tensor, kwargs: Mapping[str, Any],
               rows: torch.Tensor, *, whole_batch: bool = True, grad_uncond: bool = True
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """The paired conditional / null-condition evaluation: (F_c, F_u[rows]), in one batched call where
        possible. whole_batch: F_c of every row (the student), else of `rows` only (a teacher, one call of
        both halves). grad_uncond False: F_u under no_grad in a second call. With fixed_rows, F_u is evaluated
        for every row and the others' dropped, so that every call has one shape."""
        batch_size, device = model_input.shape[0], model_input.device
        fixed = self.uses_fixed_rows(model_input)
        twins = torch.arange(batch_size, device=device) if fixed else rows   # the rows that get F_u
        n = twins.shape[0]
        null = conditioning.null_rows(kwargs, self.uncond, twins, batch_size, device)

        def call(x: torch.Tensor, s: torch.Tensor, kw: Mapping[str, Any]) -> torch.Tensor:
            return raw_prediction(network, self.parameterization, x, s, **kw)

        if not whole_batch:
            cond = conditioning.take_rows(kwargs, twins, batch_size)
            out = call(model_input[twins].repeat(2, *[1] * (model_input.ndim - 1)), sigma[twins].repeat(2),
                       conditioning.cat_rows(cond, null, n, n))
            f_c, f_u = out[:n], out[n:]
            if fixed:
                f_c = f_c[rows]
        elif grad_uncond:
            out = call(torch.cat([model_input, model_input[twins]]), torch.cat([sigma, sigma[twins]]),
                       conditioning.cat_rows(kwargs, null, batch_size, n))
            f_c, f_u = out[:batch_size], out[batch_size:]
        else:
            f_c = call(model_input, sigma, kwargs)
            with torch.no_grad():
                f_u = call(model_input[twins], sigma[twins], null)
        return f_c, f_u[rows] if fixed else f_u

    def loss(self, input: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The per-row loss [B]: lambda mean((a F_c + b F_u - target)^2) on guided rows, the standard loss on
        the others (anchor rows on the null condition)."""
        spec = self.spec
        if spec.teacher == 'frozen' and self._teacher[0] is None:
            raise ValueError(f'{spec.name} needs a teacher to train: a frozen model trained with CFG on the same data '
                             '(without one, this wrapper only samples)')
        batch_size, device = input.shape[0], input.device
        model_input, target, c_weight, anchor, cond_kwargs = self.prepare(input, noise, sigma, kwargs)
        conditional = torch.ones(batch_size, dtype=torch.bool, device=device) if anchor is None else ~anchor
        w = self.sample_w(batch_size, device) if self.guides else torch.zeros(batch_size, device=device)
        if not self.active:
            w = torch.zeros_like(w)
        w = zero_outside(w, sigma, self.target_sigma_range)
        # The rows trained toward a guided target: a teacher's own target replaces every conditional row's.
        guided = conditional if spec.target == 'teacher' else conditional & (w != 0)
        rows = guided.nonzero().squeeze(1)
        student_kwargs = dict(cond_kwargs)
        if spec.tells_w:   # told w on conditional rows, 0 on anchors (the standard loss)
            student_kwargs['guidance_cond'] = torch.where(conditional, w, torch.zeros_like(w))
        f_u = None
        if rows.shape[0] and spec.uncond == 'teacher':
            with torch.no_grad():
                t_c, t_u = self.paired(self.teacher, model_input, sigma, cond_kwargs, rows, whole_batch=False)
            w_rows = append_dims(w[rows], input.ndim).to(t_c.dtype)
            base = t_c if spec.target == 'teacher' else target[rows]
            target = target.index_put((rows,), (base + w_rows * (t_c - t_u)).to(target.dtype))
            f_c = self.network(model_input, sigma, **student_kwargs)
        elif rows.shape[0]:
            f_c, f_u = self.paired(self.inner_model, model_input, sigma, student_kwargs, rows,
                                   grad_uncond=not self.stop_grad_uncond)
        else:
            f_c = self.network(model_input, sigma, **student_kwargs)
        prediction = f_c
        if f_u is not None:
            a, b = (append_dims(c, input.ndim).to(f_c.dtype) for c in spec.coefficients(w[rows]))
            prediction = f_c.index_put((rows,), a * f_c[rows] + b * f_u)
        sq_error = ((prediction - target) ** 2).flatten(1).mean(1)
        if f_u is not None and self.mix < 1:
            standard = ((f_c - target) ** 2).flatten(1).mean(1)
            sq_error = standard.index_put((rows,), self.mix * sq_error[rows] + (1 - self.mix) * standard[rows])
        return sq_error * c_weight


# The seed paper's name for the family's loss (its default objective): a drop-in for k_diffusion.layers.Denoiser
# whose loss trains the guided prediction (1 + w) F_c - w F_u (eq. A); w = 0 or mix = 0 is upstream's loss.
AlignedDenoiser = GuidanceObjective


class GFTDenoiser(GuidanceObjective):
    """Guidance-free training (Chen et al. 2025): the family's loss with objective "gft", beta = 1 / (1 + w).

    Guided rows train a G + b F_u toward T with (a, b) = (1 / (1 + w), w / (1 + w)), G the network told w
    (keyword argument guidance_cond) and F_u its null-condition output at w = 0 without gradient; anchor rows
    get the standard loss at w = 0. At the optimum G(x; sigma, c, w) = T_c + w (T_c - T_u), CFG's guided
    prediction, so sampling is ONE network evaluation per step (guidance.OnePassDenoiser). w is drawn per
    row (default uniform on [0, 4]); the network needs a w input (models.GuidanceEmbedding).
    """

    def __init__(self, inner_model: nn.Module, sigma_data: float = 1., weighting: str | Callable = 'karras', *,
                 guidance_scale: GuidanceScale | None = None, w_train: GuidanceScale | None = None,
                 uncond: Mapping[str, Any] | None = None, uncond_prob: float = 0.1, fixed_rows: bool | None = None):
        super().__init__(inner_model, sigma_data, weighting, objective='gft', w_train=w_train,
                         guidance_scale=guidance_scale, uncond=uncond, uncond_prob=uncond_prob,
                         fixed_rows=fixed_rows)


class TeacherTargetDenoiser(GuidanceObjective):
    """The teacher-target form (docs/design.md section 6(b)): L = lambda mean((F_c - T')^2) on conditional rows,
    with a guided target T' = base + w (F^t_c - F^t_u) from a teacher evaluated without gradient.

    - "mg" (model-guidance, Tang et al. 2025): base = T, teacher = the EMA of the model itself (None: the
      model's current weights), w fixed in [0, 1); rows with sigma outside target_sigma_range, and every row
      during the first warmup_steps optimizer steps (counted by the training loop's steps_done), get the
      standard loss. The fixed point is CFG at w / (1 - w) with no w input: one-pass sampling of the plain
      conditional model.
    - "distill" (guidance distillation, Meng et al. 2023, stage 1): base = F^t_c, a frozen teacher trained
      with CFG, w drawn per row and told to the student (guidance_cond).

    objective (older name kind): a registered teacher-target objective. The teacher is held outside the
    module's parameters and state_dict: it gets no gradient, is not in the optimizer and is not saved with the
    student. Anchor rows get the standard loss on the null condition.
    """

    def __init__(self, inner_model: nn.Module, teacher: nn.Module | None, sigma_data: float = 1.,
                 weighting: str | Callable = 'karras', *, objective: str | Spec | None = None,
                 kind: str | None = None, guidance_scale: GuidanceScale | None = None,
                 w_train: GuidanceScale | None = None, uncond: Mapping[str, Any] | None = None,
                 uncond_prob: float = 0.1, target_sigma_range: Sequence[float] | None = None,
                 sigma_range: Sequence[float] | None = None, warmup_steps: int = 0,
                 steps_done: Callable[[], int] | None = None, fixed_rows: bool | None = None):
        objective = _alias(objective, kind, 'objective', 'kind')
        teacher_kinds = tuple(n for n in registry.names() if registry.get(n).uncond == 'teacher')
        spec = objective if isinstance(objective, Spec) else \
            registry.get(objective) if objective in teacher_kinds else None
        if spec is None or spec.uncond != 'teacher':
            raise ValueError(f'kind must be one of {teacher_kinds} (the teacher-target objectives), got {objective!r}')
        if (w_train, guidance_scale) == (None, None):
            w_train = 0.45   # this class's default since its first version
        super().__init__(inner_model, sigma_data, weighting, objective=spec, w_train=w_train,
                         guidance_scale=guidance_scale, uncond=uncond, uncond_prob=uncond_prob, teacher=teacher,
                         target_sigma_range=target_sigma_range, sigma_range=sigma_range,
                         warmup_steps=warmup_steps, steps_done=steps_done, fixed_rows=fixed_rows)
