"""The objective registry: one Spec per training-time guidance objective (docs/design.md section 6).

Every objective of the family trains one equation, written once in objective.GuidanceObjective.loss:

    L = lambda(sigma) mean((a(w) F_c + b(w) F_u - target)^2)

with F_c the network's conditional output (told w or not), F_u its null-condition output (with gradient,
without, or not evaluated), and the target T (upstream's), T + w sg(teacher_c - teacher_u) or the teacher's
own guided prediction. A Spec says which: its coefficients, how F_u is evaluated, the target, whether the
network is told w, how a model of it samples (two-pass CFG, one pass told w, one pass at its trained
guidance), its default w_train, its knobs and their checks, its teacher and its training FLOP ratio. The
schema, the config, sampling, export metadata, both trainers, the benchmarks and the Stable Diffusion path
read these fields instead of comparing names; `register` adds an objective from outside the package.

Standard CFG training is not an entry of its own: it is "aligned" at w_train = 0 (or mix = 0), which equals
upstream's loss bit for bit. Metadata reads the older export names 'aligned-cfg' and 'standard-cfg' as
"aligned" (OLD_NAMES).

This module also holds what every reader of w shares: the w distribution (ScaleDistribution,
make_w) and sigma intervals; Spec.w_range is the w range a model was trained for.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Union

if TYPE_CHECKING:   # torch is imported where tensors are made, so that the statistics can read the registry
    import torch

from ..errors import ConfigError, choice, fail, number

# ---------------------------------------------------------------------------------------------------------------
# w: a number or a distribution drawn per row; sigma intervals.

SCALE_DISTRIBUTIONS = ('uniform', 'log-uniform')


class ScaleDistribution:
    """A training-time guidance weight w drawn per row: uniform or log-uniform on [min_value, max_value]."""

    def __init__(self, type: str, min_value: float, max_value: float):
        if type not in SCALE_DISTRIBUTIONS:
            raise ValueError(f'a w distribution\'s type must be one of {SCALE_DISTRIBUTIONS}, got {type!r}')
        if not 0 <= min_value <= max_value:
            raise ValueError(f'a w distribution needs 0 <= min_value <= max_value, got [{min_value}, {max_value}]')
        if type == 'log-uniform' and min_value <= 0:
            raise ValueError(f'a log-uniform w distribution needs min_value > 0, got {min_value}')
        self.type, self.min_value, self.max_value = type, float(min_value), float(max_value)

    def __call__(self, n: int, device: torch.device | str = 'cpu') -> torch.Tensor:
        import torch

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


def make_w(spec: GuidanceScale) -> float | ScaleDistribution:
    """The paper's w for training: a number, or {'type': 'uniform' | 'log-uniform', 'min_value': a, 'max_value': b}."""
    if isinstance(spec, ScaleDistribution):
        return spec
    if isinstance(spec, bool) or not isinstance(spec, (int, float, Mapping)):
        raise TypeError(f'w_train must be a number (the paper\'s w) or a dict '
                        f'{{"type": "uniform"|"log-uniform", "min_value": a, "max_value": b}}, got {spec!r}')
    if isinstance(spec, Mapping):
        unknown = set(spec) - {'type', 'min_value', 'max_value'}
        if unknown or not {'type', 'min_value', 'max_value'} <= set(spec):
            raise ValueError(f'a w distribution needs exactly the keys type, min_value, max_value; '
                             f'got {sorted(spec)}')
        return ScaleDistribution(spec['type'], spec['min_value'], spec['max_value'])
    if not math.isfinite(spec) or spec < 0:
        raise ValueError(f'w_train (the paper\'s w) must be a finite number >= 0, got {spec}')
    return float(spec)


make_guidance_scale = make_w   # the older name


def w_bounds(w_train: GuidanceScale) -> tuple[float, float]:
    """[lo, hi] of a w or w distribution ([w, w] for a fixed w)."""
    w = make_w(w_train)
    return (w.min_value, w.max_value) if isinstance(w, ScaleDistribution) else (w, w)


def check_sigma_interval(sigma_interval: Sequence[float] | None) -> tuple[float, float] | None:
    """Validates a noise-level interval [sigma_lo, sigma_hi] (the sampling-time guidance interval
    `sigma_interval`, or the training-time `target_sigma_range` of a teacher target)."""
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
    import torch

    if sigma_interval is None:
        return w
    lo, hi = sigma_interval
    return torch.where((sigma >= lo) & (sigma <= hi), w, torch.zeros_like(w))


def mg_effective_w(w_train: float) -> float:
    """The CFG w that a model-guidance model trained at w samples in one pass: w / (1 - w) (docs/design.md 6(b))."""
    return w_train / (1 - w_train)


W_REL_TOL = 1e-5   # a w as the tools print it ('%g': 6 significant digits) names the w it was printed from


def same_w(a: float, b: float) -> bool:
    """Whether two w are the same up to W_REL_TOL, so that a w copied from any printout (e.g. an MG model's trained
    w_mg = w / (1 - w), printed as 0.818182) selects the path of the w it was printed from."""
    return math.isclose(a, b, rel_tol=W_REL_TOL, abs_tol=1e-9)


def w_on_top(w: float, w_model: float) -> float:
    """The CFG w' that samples a model whose one pass carries guidance w_model at effective guidance w:
    (1 + w')(1 + w_model) - 1 = w."""
    return (1 + w) / (1 + w_model) - 1


# ---------------------------------------------------------------------------------------------------------------
# Knobs: align keys that belong to some objectives only. Every objective not owning a knob must leave it at
# its default; the owners' values are checked here.

@dataclasses.dataclass(frozen=True)
class Knob:
    """An align key of some objectives: its default, how the default reads in an error message, why it exists,
    and the check of a value (None: the owner's Spec.check does it)."""

    default: Any
    off: str
    purpose: str
    check: Callable[[str, Any], None] | None = None


def _bool(key: str, value: Any) -> None:
    if not isinstance(value, bool):
        fail(key, value, 'true or false')


def _interval(key: str, value: Any) -> None:
    try:
        check_sigma_interval(value)
    except ValueError as err:
        raise ConfigError(f'config key {key!r}: got {value!r}; {err}') from None


KNOBS: dict[str, Knob] = {
    'stop_grad_uncond': Knob(False, 'False (the default)', 'no gradient through F_u', _bool),
    'mix': Knob(1.0, '1.0 (the default)', 'L = mix L_guided + (1 - mix) L_standard',
                lambda k, v: number(k, v, lo=0, hi=1)),
    'teacher': Knob(None, 'null', 'the teacher of a teacher target'),
    'warmup_steps': Knob(0, '0', 'steps with the standard loss before the guided target applies',
                         lambda k, v: number(k, v, lo=0, integer=True)),
    'target_sigma_range': Knob(None, 'null', '[sigma_lo, sigma_hi] where the teacher target applies', _interval),
}

# ---------------------------------------------------------------------------------------------------------------
# The registry.

UNCOND_MODES = ('grad', 'stop-grad', 'teacher')   # F_u with gradient, without, or only the teacher's
TARGETS = ('T', 'T+teacher', 'teacher')          # T; T + w sg(teacher_c - teacher_u); (1 + w) teacher_c - w teacher_u
SAMPLING = ('cfg', 'told-w', 'trained-w')         # two-pass CFG at w; one pass told w; one pass at its trained w
TEACHERS = (None, 'ema', 'frozen')                # the model's own EMA (or "online"); a frozen CFG-trained model


def identity(w: float) -> float:
    return w


@dataclasses.dataclass(frozen=True)
class Spec:
    """One objective of the family (see the module docstring for the equation)."""

    name: str
    summary: str
    # The loss: (a, b) of a(w) F_c + b(w) F_u (None: the teacher-target form, a = 1, b = 0, F_u not evaluated).
    coefficients: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None
    uncond: str = 'grad'                 # UNCOND_MODES: how F_u is evaluated
    target: str = 'T'                    # TARGETS
    tells_w: bool = False                # the network gets w (guidance_cond / timestep_cond)
    # Sampling.
    sampling: str = 'cfg'                # SAMPLING
    effective_w: Callable[[float], float] = identity   # the guidance a model trained at w samples in one pass
    # Config.
    w_train_default: Any = 2.0
    w_train_ok: Callable[[float | ScaleDistribution], bool] | None = None
    w_train_rule: str = ''               # what w_train_ok allows, for its error messages
    knobs: tuple[str, ...] = ()          # the KNOBS this objective owns
    teacher: str | None = None           # TEACHERS
    needs_classes: bool = True           # False: also trains unconditional models (as upstream)
    check: Callable[[Mapping[str, Any]], None] | None = None   # further checks of a resolved align section
    # Cost: training FLOPs per step relative to upstream at the same batch, from the resolved align section.
    flop_ratio: Callable[[Mapping[str, Any]], float] = lambda align: 1.0

    def __post_init__(self) -> None:
        for field, value, allowed in (('uncond', self.uncond, UNCOND_MODES), ('target', self.target, TARGETS),
                                      ('sampling', self.sampling, SAMPLING), ('teacher', self.teacher, TEACHERS)):
            if value not in allowed:
                raise ValueError(f'Spec {self.name!r}: {field} must be one of {allowed}, got {value!r}')
        if (self.coefficients is None) != (self.uncond == 'teacher'):
            raise ValueError(f'Spec {self.name!r}: the coefficient form evaluates F_u itself (uncond "grad" or '
                             '"stop-grad"); the teacher-target form (coefficients None) uses the teacher\'s')
        unknown = [k for k in self.knobs if k not in KNOBS]
        if unknown:
            raise ValueError(f'Spec {self.name!r}: unknown knob {unknown[0]!r}; knobs: {", ".join(KNOBS)}')

    # -- sampling --------------------------------------------------------------------------------------------
    @property
    def one_pass(self) -> bool:
        """Whether the model is trained to sample guided in one network evaluation per step."""
        return self.sampling != 'cfg'

    def w_range(self, w_train: GuidanceScale) -> tuple[float, float]:
        """[lo, hi] of the w a model trained at w_train samples ([w, w] for a fixed w; mg: its effective w)."""
        lo, hi = w_bounds(w_train)
        return self.effective_w(lo), self.effective_w(hi)

    def default_w_sample(self, w_train: GuidanceScale) -> float:
        """align.w_sample's default: the trained w (a distribution's mean; mg: its effective w)."""
        w = make_w(w_train)
        return self.effective_w(w.mean if isinstance(w, ScaleDistribution) else w)

    def plan(self, w: float, w_range: Sequence[float] | None) -> tuple[str, float | None]:
        """How to sample at the paper's w: ('cfg', w' of two-pass CFG) or ('one-pass', the w the network is told,
        None for a model not told w). Raises ValueError for a w this model cannot be sampled at."""
        if self.sampling == 'cfg':
            return 'cfg', w
        if w_range is None:
            raise ValueError(f'a {self.name} model needs the w range it was trained for (w_range)')
        if self.sampling == 'told-w':
            if not (w_range[0] <= w <= w_range[1] or any(same_w(w, end) for end in w_range)):
                raise ValueError(f'w {w:g} is outside the range [{w_range[0]:g}, {w_range[1]:g}] that this '
                                 f'{self.name} model was trained for (align.w_train); sample it at a w in that range')
            return 'one-pass', w
        if same_w(w, w_range[1]):
            return 'one-pass', None
        return 'cfg', w_on_top(w, w_range[1])

    def trained_w(self, w_range: Sequence[float] | None, w_sample: float) -> float:
        """The w to sample at when none is given (`--w trained`): a model of its trained guidance (mg) at that
        guidance, its one-pass w; any other at w_sample (told w: within the trained range)."""
        return float(w_range[1]) if self.sampling == 'trained-w' else float(w_sample)

    def passes(self, w: float, w_range: Sequence[float] | None) -> int:
        """Network evaluations per sampling step at w."""
        return 1 if self.plan(w, w_range)[0] == 'one-pass' else 2


_REGISTRY: dict[str, Spec] = {}
# Export metadata before format 3 named "aligned" models by whether they were guided.
OLD_NAMES = {'aligned-cfg': 'aligned', 'standard-cfg': 'aligned'}
UNGUIDED_OLD_NAMES = ('standard-cfg',)   # trained without guidance: w_range [0, 0]


def register(spec: Spec, *, replace: bool = False) -> Spec:
    """Adds an objective; every reader (schema, config, sampling, metadata, trainers) sees it at once."""
    if spec.name in _REGISTRY and not replace:
        raise ValueError(f'objective {spec.name!r} is already registered')
    _REGISTRY[spec.name] = spec
    return spec


def unregister(name: str) -> None:
    """Removes an objective added with register (tests)."""
    _REGISTRY.pop(name, None)


def names() -> tuple[str, ...]:
    """The registered objectives' names, in registration order."""
    return tuple(_REGISTRY)


def get(name: str) -> Spec:
    """The Spec of objective `name` (an older export name reads as its objective); ValueError naming the
    registered ones otherwise."""
    spec = _REGISTRY.get(OLD_NAMES.get(name, name)) if isinstance(name, str) else None
    if spec is None:
        raise ValueError(f'objective must be one of {", ".join(map(repr, _REGISTRY))}; got {name!r}')
    return spec


def of(config_or_align: Mapping[str, Any]) -> Spec:
    """The Spec of a config (or its align section)."""
    align = config_or_align.get('align', config_or_align)
    return get(align['objective'])


# ---------------------------------------------------------------------------------------------------------------
# The family (docs/design.md section 6).

def _aligned_flops(align: Mapping[str, Any]) -> float:
    p = float(align['uncond_prob'])
    if align['w_train'] == 0 or align['mix'] == 0:
        return 1.0
    return (4 - p) / 3 if align['stop_grad_uncond'] else 2 - p


def _ema_teacher(align: Mapping[str, Any]) -> None:
    choice('align.teacher', align['teacher'], ('ema', 'online'))


def _frozen_teacher(align: Mapping[str, Any]) -> None:
    teacher = align['teacher']
    if not isinstance(teacher, str) or not teacher:
        fail('align.teacher', teacher, f'for objective "{align["objective"]}", the path of the teacher: a training '
             'checkpoint (.pth), its run folder or a .safetensors export of a standard or aligned model of the same '
             'data')


register(Spec(
    'aligned', 'CFG training of the guided prediction (1 + w) F_c - w F_u (Patel et al.); w = 0: standard CFG',
    coefficients=lambda w: (1 + w, -w), uncond='grad', target='T', sampling='cfg', w_train_default=2.0,
    knobs=('stop_grad_uncond', 'mix'), needs_classes=False, flop_ratio=_aligned_flops))
register(Spec(
    'gft', 'guidance-free training (Chen et al. 2025): beta = 1 / (1 + w), the network told w',
    coefficients=lambda w: (1 / (1 + w), w / (1 + w)), uncond='stop-grad', target='T', tells_w=True,
    sampling='told-w', w_train_default={'type': 'uniform', 'min_value': 0.0, 'max_value': 4.0},
    flop_ratio=lambda align: (4 - float(align['uncond_prob'])) / 3))
register(Spec(
    'mg', "model-guidance (Tang et al. 2025): target T + w sg(EMA_c - EMA_u); one pass samples CFG at w / (1 - w)",
    uncond='teacher', target='T+teacher', sampling='trained-w', effective_w=mg_effective_w, w_train_default=0.45,
    w_train_ok=lambda w: isinstance(w, float) and 0 <= w < 1,
    w_train_rule='a number in [0, 1) for objective "mg" (a fixed w in [0, 1): its one pass samples CFG at w / (1 - w))',
    knobs=('teacher', 'warmup_steps', 'target_sigma_range'), teacher='ema', check=_ema_teacher,
    flop_ratio=lambda align: (5 - 2 * float(align['uncond_prob'])) / 3))
register(Spec(
    'distill', "guidance distillation (Meng et al. 2023, stage 1): target the frozen teacher's CFG, student told w",
    uncond='teacher', target='teacher', tells_w=True, sampling='told-w',
    w_train_default={'type': 'uniform', 'min_value': 0.0, 'max_value': 4.0},
    knobs=('teacher', 'target_sigma_range'), teacher='frozen', check=_frozen_teacher,
    flop_ratio=lambda align: (5 - 2 * float(align['uncond_prob'])) / 3))
