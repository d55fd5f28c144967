"""The claims benchmark's comparisons and verdicts, computed from its results rows alone (docs/claims/results.json).

The rule, stated before the numbers (docs/design.md section 7). Lower metric is better. Models of the same training
seed share initialisation and data order (distill also its teacher), so every comparison is *paired by training
seed*. A verdict is ONE test per cell (an objective against a reference on one need and benchmark):

1. per comparison j of the cell (a grid point: sampler, steps, w or accuracy level) and training seed s, the
   relative difference r_js = (a_js - b_js) / mean_s(b_js) (scale-free, so that points of large metric values do
   not dominate; defined for any sign of the metric as long as the reference's mean is positive);
2. per seed, the seed-level aggregate R_s = mean over the cell's comparisons of r_js;
3. the effect: the mean relative difference mean_s(R_s) with a 95% t interval on the n seed values (n - 1 degrees
   of freedom: a seed-level bootstrap is unreliable at n = 5), and beside it the paired mean difference
   mean_s mean_j (a_js - b_js) with its own 95% t interval, in the metric's units;
4. the label: *better* when its whole interval is below 0, *worse* when it is above 0, else *no difference
   detected* (not equality: the interval says how large a difference the seeds could have missed).

Per-comparison outcomes (the same paired t interval on one comparison's per-seed differences) are counted as
description only: the comparisons of a cell reuse the same models and are not independent evidence. A statistic a
seed cannot produce (digits: no w reaches the accuracy level) is infinite: such a comparison is counted by where it was
reached and left out of the test; a cell with no finite comparison is *untested*.

Reproduction of guidance (one-pass X) is an equivalence claim: per w, d_X = the distance between X's samples of seed
k and standard CFG's samples of seed k + 1 (a DIFFERENT seed: a same-seed reference shares initialisation and, for
distill, the teacher), against d_B = the distance between standard CFG of seeds k and k + 1 (the seed-to-seed spread;
paired: both use the reference of seed k + 1). The cell's relative excess (d_X - d_B) / d_B with its 95% interval as
above; *reproduces* when the whole interval is below the margin REPRO_MARGIN (X is at most 50% further from CFG than
another training seed of CFG is), *differs* when it is above 0, else *not shown*.

The paper's claims for aligned (C1, C2, C1 at matched effective guidance) use the same test: *held* (better), *reversed*
(worse), *not shown* (no difference detected).

Comparison families (objective X against a reference R):

- equal steps: X and R at the same sampler and step count; on the toy, energy distance to the exact p_w at each
  guided target w (X at its w_target = w: an aligned model at w_train + w (1 + w_train)); on digits, the lowest FD
  among the cells whose class accuracy reaches each level (FD at matched accuracy);
- equal NFE (one-pass X): X at 2N steps against R at N steps, N in grid['nfe_steps'], counting only X's cells
  whose counted NFE is at most 2N (the cells that ran in one pass);
- equal training FLOPs: equal steps against standard CFG trained for the objective's own counted training FLOPs
  (grid['benches'][bench]['equal_flops']; distill's include its teacher's training);
- against the guidance interval: equal steps against standard CFG sampled with a guidance interval (autoguidance,
  a sampling method beside the interval: at equal steps and counted NFE, scored at each model's best w; below);
- reproduction of guidance and the paper's claims for aligned, as above;
- costs (issue 20): each knob ablation against its shipped variant at equal steps (ablation_verdicts), and each
  one-pass objective's reproduction test at every training length (convergence_verdicts, training_needed).
- sampling cost (nfe_verdicts): equal NFE by N, and one-pass models and autoguidance against the guidance interval at
  equal counted NFE (the section "Sampling cost" below).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from scipy import stats

from ..core import registry

ALPHA = 0.05            # every interval is a two-sided 1 - ALPHA = 95% interval
REPRO_MARGIN = 0.5      # "reproduces": X's distance to CFG exceeds the distance between two CFG seeds by < 50%
FEW_STEPS = (4, 8)
Rows = Sequence[Mapping[str, Any]]

BETTER, WORSE, NO_DIFFERENCE, UNTESTED = 'better', 'worse', 'no difference detected', 'untested'
REPRODUCES, DIFFERS, NOT_SHOWN = 'reproduces', 'differs', 'not shown'
HELD, REVERSED = 'held', 'reversed'
COUNT_KEYS = ('better', 'no_difference', 'worse')   # per-comparison outcomes: description only

REFERENCES = {'baseline': 'standard CFG', 'baseline_equal_flops': 'standard CFG at equal FLOPs',
              'baseline_interval': 'standard CFG with a guidance interval'}


def matched_w(w: float, w_train: float) -> float:
    """The aligned model's sampling w whose effective guidance equals w for the true pair (docs/design.md section 2):
    (w_sample - w_train) / (1 + w_train) = w."""
    return w_train + w * (1 + w_train)


def wkey(w: float) -> float:
    """w rounded for matching cells: effective guidances computed in floating point."""
    return round(float(w), 6)


@functools.lru_cache(maxsize=None)
def t_quantile(n: int) -> float:
    """The 95% interval's multiplier for n paired seeds: the t quantile with n - 1 degrees of freedom."""
    return float(stats.t.ppf(1 - ALPHA / 2, n - 1)) if n > 1 else math.inf


def _quantile(n: int, threshold: float | None) -> float:
    """t_quantile(n), or a fixed threshold (the self-tests' hook to run a broken rule)."""
    return t_quantile(n) if threshold is None else threshold


def _interval(x: np.ndarray, threshold: float | None = None) -> tuple[float, float, float]:
    """(mean, low, high): the 95% t interval of the mean of the per-seed values x."""
    m = float(x.mean())
    if len(x) < 2:
        return m, -math.inf, math.inf
    half = _quantile(len(x), threshold) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - half, m + half


@dataclass
class Comparison:
    """An objective (a) against a reference (b) at one grid point: one statistic per training seed each, both in the
    order of the same sorted training seeds (paired); lower is better."""
    label: str
    a: np.ndarray
    b: np.ndarray

    def __post_init__(self) -> None:
        self.a, self.b = np.asarray(self.a, dtype=float), np.asarray(self.b, dtype=float)
        if self.a.shape != self.b.shape:
            raise ValueError(f'comparison {self.label!r}: {len(self.a)} seeds against {len(self.b)}; a paired '
                             'comparison needs the same training seeds on both sides')
        self._reached = bool(np.isfinite(self.a).all() and np.isfinite(self.b).all())

    @property
    def reached(self) -> bool:
        return self._reached

    @property
    def diff(self) -> float:
        """The paired mean difference a - b over seeds."""
        return float((self.a - self.b).mean()) if self.reached else math.nan

    @property
    def half_width(self) -> float:
        """Half the width of the 95% t interval of the paired mean difference."""
        if not self.reached:
            return math.nan
        m, lo, _ = _interval(self.a - self.b)
        return m - lo

    @property
    def outcome(self) -> str:
        """Description only: 'better' / 'worse' when the 95% interval of the paired difference excludes 0, else
        'no_difference'; a side with a finite statistic in every seed beats one without; 'unreached' on both."""
        if not self.reached:
            a_ok, b_ok = bool(np.isfinite(self.a).all()), bool(np.isfinite(self.b).all())
            return 'better' if a_ok else 'worse' if b_ok else 'unreached'
        d = self.a - self.b
        if len(d) > 1 and float(d.std(ddof=1)) == 0.:   # identical differences in every seed: their sign decides
            return 'better' if d[0] < 0 else 'worse' if d[0] > 0 else 'no_difference'
        _, lo, hi = _interval(d)
        return 'better' if hi < 0 else 'worse' if lo > 0 else 'no_difference'


def counts(comparisons: Sequence[Comparison]) -> dict[str, int]:
    """Per-comparison outcomes (description, not evidence): better / no_difference / worse."""
    outcomes = [c.outcome for c in comparisons]
    return {k: outcomes.count(k) for k in COUNT_KEYS}


@dataclass(frozen=True)
class Effect:
    """One cell's test: the label and the effect with its 95% interval (see the module's rule)."""
    label: str
    n: int                  # training seeds (pairs)
    k: int                  # comparisons in the seed-level aggregate
    rel: float              # mean relative difference (a - b) / b, e.g. -0.1 = 10% lower (better)
    rel_lo: float
    rel_hi: float
    diff: float             # paired mean difference a - b, metric units
    diff_lo: float
    diff_hi: float
    counts: dict = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {'label': self.label, 'n': self.n, 'k': self.k, 'rel': self.rel, 'rel_lo': self.rel_lo,
                'rel_hi': self.rel_hi, 'diff': self.diff, 'diff_lo': self.diff_lo, 'diff_hi': self.diff_hi,
                **self.counts}


def seed_aggregates(comparisons: Sequence[Comparison]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per training seed over the cell's reached comparisons: (R_s the mean relative difference, the mean difference
    a - b, the mean of a / m_j, the mean of b / m_j), m_j the reference's mean at comparison j."""
    used = [c for c in comparisons if c.reached]
    if not used:
        raise ValueError('no reached comparison')
    scale = np.array([c.b.mean() for c in used])[:, None]
    if (scale <= 0).any():
        bad = used[int(np.argmax(scale[:, 0] <= 0))].label
        raise ValueError(f'comparison {bad!r}: the reference\'s mean is not positive; the relative difference needs '
                         'a positive reference metric')
    a, b = np.stack([c.a for c in used]), np.stack([c.b for c in used])
    return ((a - b) / scale).mean(0), (a - b).mean(0), (a / scale).mean(0), (b / scale).mean(0)


def cell_test(comparisons: Sequence[Comparison], *, paired: bool = True, threshold: float | None = None,
              describe: bool = True) -> Effect:
    """The cell's one test (the module's rule). paired=False (an unpaired, Welch-like standard error of the seed
    aggregates) and threshold (a fixed multiplier instead of the t quantile, e.g. 1 SE) break the rule on purpose:
    the self-tests show that they then fail. describe=False skips the per-comparison counts."""
    n_counts = counts(comparisons) if describe else {}
    used = [c for c in comparisons if c.reached]
    if not used:
        nan = math.nan
        return Effect(UNTESTED, len(comparisons[0].a) if comparisons else 0, 0, nan, nan, nan, nan, nan, nan,
                      n_counts)
    rel, diff, a_s, b_s = seed_aggregates(used)
    n = len(rel)
    m, lo, hi = _interval(rel, threshold)
    if not paired and n > 1:
        half = _quantile(n, threshold) * math.sqrt(a_s.var(ddof=1) / n + b_s.var(ddof=1) / n)
        lo, hi = m - half, m + half
    d, d_lo, d_hi = _interval(diff, threshold)
    label = BETTER if hi < 0 else WORSE if lo > 0 else NO_DIFFERENCE
    return Effect(label, n, len(used), m, lo, hi, d, d_lo, d_hi, n_counts)


def reproduction_test(comparisons: Sequence[Comparison], margin: float = REPRO_MARGIN, **rule: Any) -> Effect:
    """Equivalence (CI inside the margin): 'reproduces' when the 95% interval of the relative excess (d_X - d_B) / d_B
    lies below margin, 'differs' when it lies above 0, else 'not shown'."""
    e = cell_test(comparisons, **rule)
    if e.label == UNTESTED:
        return e
    label = REPRODUCES if e.rel_hi < margin else DIFFERS if e.rel_lo > 0 else NOT_SHOWN
    return Effect(label, e.n, e.k, e.rel, e.rel_lo, e.rel_hi, e.diff, e.diff_lo, e.diff_hi, e.counts)


def claim_test(comparisons: Sequence[Comparison], **rule: Any) -> Effect:
    """A claim that aligned is better: 'held' (better), 'reversed' (worse), 'not shown' (no difference detected)."""
    e = cell_test(comparisons, **rule)
    label = {BETTER: HELD, WORSE: REVERSED, NO_DIFFERENCE: NOT_SHOWN}.get(e.label, e.label)
    return Effect(label, e.n, e.k, e.rel, e.rel_lo, e.rel_hi, e.diff, e.diff_lo, e.diff_hi, e.counts)


def verdict(comparisons: Sequence[Comparison]) -> tuple[str, dict[str, int]]:
    """The paper's claims: (held / reversed / not shown, the per-comparison counts)."""
    e = claim_test(comparisons)
    return e.label, e.counts


def standing(comparisons: Sequence[Comparison], family: str = '') -> tuple[str, dict[str, int]]:
    """Where an objective stands against a reference: (label of its cell's test, the per-comparison counts)."""
    e = reproduction_test(comparisons) if family == 'reproduction' else cell_test(comparisons)
    return (e.label if comparisons else 'n/a'), e.counts


# ---------------------------------------------------------------------------------------------------------------
# Statistics per training seed.

def _seeds(rows: Rows, bench: str) -> list[int]:
    return sorted({r['train_seed'] for r in rows if r['bench'] == bench and r.get('kind', 'cell') == 'cell'})


def _cells(rows: Rows, bench: str, variant: str) -> dict[int, list[Mapping[str, Any]]]:
    """{seed: the variant's cells}, in the order of the sorted training seeds (every per-seed array is paired)."""
    out: dict[int, list] = {}
    for r in rows:
        if r['bench'] == bench and r['variant'] == variant and r.get('kind', 'cell') == 'cell':
            out.setdefault(r['train_seed'], []).append(r)
    return dict(sorted(out.items()))


def check_paired(rows: Rows, bench: str, variant: str, reference: str) -> None:
    """Refuses a comparison whose two sides were trained on different seeds: pairing needs the same seeds."""
    a, b = list(_cells(rows, bench, variant)), list(_cells(rows, bench, reference))
    if a and b and a != b:
        raise ValueError(f'{bench}: {variant} has training seeds {a}, {reference} {b}; the paired comparison needs '
                         'the same seeds on both sides')


def at_target(rows: Rows, bench: str, variant: str, metric: str, sampler: str, steps: int, w_target: float,
              max_nfe: float | None = None) -> np.ndarray | None:
    """Per seed: the metric of the cell at (sampler, steps) whose effective guidance is w_target (and whose counted
    NFE is at most max_nfe); None when a seed lacks it."""
    out = []
    cells = _cells(rows, bench, variant)
    if not cells:
        return None
    for seed_rows in cells.values():
        match = [r[metric] for r in seed_rows if r['sampler'] == sampler and r['steps'] == steps
                 and wkey(r['w_target']) == wkey(w_target) and (max_nfe is None or r['nfe'] <= max_nfe + 1e-9)]
        if not match:
            return None
        out.append(float(match[0]))
    return np.array(out)


def fd_at_accuracy(rows: Rows, bench: str, variant: str, sampler: str, steps: int, level: float,
                   targets: Sequence[float], max_nfe: float | None = None) -> np.ndarray | None:
    """Per seed: the lowest FD among the cells at (sampler, steps) with w_target in targets (and counted NFE at most
    max_nfe) whose class accuracy reaches level; inf when none does; None when the variant has no such cells."""
    keys = {wkey(w) for w in targets}
    out = []
    cells = _cells(rows, bench, variant)
    for seed_rows in cells.values():
        pool = [r for r in seed_rows if r['sampler'] == sampler and r['steps'] == steps and wkey(r['w_target']) in keys
                and (max_nfe is None or r['nfe'] <= max_nfe + 1e-9)]
        if not pool:
            return None
        fds = [float(r['fd']) for r in pool if float(r['accuracy']) >= level]
        out.append(min(fds) if fds else math.inf)
    return np.array(out) if out else None


def by_w(rows: Rows, bench: str, variant: str, metric: str) -> dict[int, dict[tuple, float]]:
    """{seed: {(sampler, steps, w): metric}}: the cells by their sampling w (the paper's claims)."""
    out: dict[int, dict[tuple, float]] = {}
    for seed, seed_rows in _cells(rows, bench, variant).items():
        out[seed] = {(r['sampler'], r['steps'], r['w']): float(r[metric]) for r in seed_rows if metric in r}
    return out


def best_over_w(rows, bench, variant, metric, sampler, steps, ws) -> np.ndarray:
    """Per training seed: min over the w grid of the metric (each model at its best w)."""
    return np.array([min(v[(sampler, steps, w)] for w in ws) for v in by_w(rows, bench, variant, metric).values()])


def worst_over_w(rows, bench, variant, metric, sampler, steps, ws) -> np.ndarray:
    """Per training seed: max over the w grid of the metric (the worst a user picking any w in the grid gets)."""
    return np.array([max(v[(sampler, steps, w)] for w in ws) for v in by_w(rows, bench, variant, metric).values()])


def at_w(rows, bench, variant, metric, sampler, steps, w) -> np.ndarray:
    return np.array([v[(sampler, steps, w)] for v in by_w(rows, bench, variant, metric).values()])


# ---------------------------------------------------------------------------------------------------------------
# Comparison families.

def targets(grid: Mapping[str, Any], bench: str, variant: str) -> list[float]:
    """The guided targets w at which a variant is compared: the bench's compare_ws, plus mg's one-pass w for mg."""
    info = grid['benches'][bench]
    ws = list(info['compare_ws'])
    trained_w = variant in registry.names() and registry.get(variant).sampling == 'trained-w'
    if trained_w and info.get('mg_w') is not None:   # a one-pass model of its trained guidance (mg)
        ws.append(info['mg_w'])
    return ws


def _statistic(rows, grid, bench, variant, sampler, steps, point, max_nfe=None):
    info = grid['benches'][bench]
    if info['metric'] == 'fd':
        return fd_at_accuracy(rows, bench, variant, sampler, steps, point, info['fd_targets'], max_nfe)
    return at_target(rows, bench, variant, info['target_metric'], sampler, steps, point, max_nfe)


def _points(grid, bench, variant) -> tuple[list[float], str]:
    """(the points compared, how to name one): guided targets w (toy) or accuracy levels (digits)."""
    info = grid['benches'][bench]
    if info['metric'] == 'fd':
        return list(info['accuracy_levels']), 'accuracy >= {:g}'
    return targets(grid, bench, variant), 'w = {:.3g}'


def equal_steps(rows: Rows, grid: Mapping[str, Any], bench: str, variant: str, reference: str) -> list[Comparison]:
    """variant against reference at the same sampler and step count, at every compared point."""
    points, name = _points(grid, bench, variant)
    check_paired(rows, bench, variant, reference)
    out = []
    for sampler in grid['benches'][bench]['samplers']:
        for steps in grid['steps']:
            for p in points:
                a = _statistic(rows, grid, bench, variant, sampler, steps, p)
                b = _statistic(rows, grid, bench, reference, sampler, steps, p)
                if a is not None and b is not None:
                    out.append(Comparison(f'{sampler}, {steps} steps, {name.format(p)}', a, b))
    return out


def _mean_nfe(rows, bench, variant, sampler, steps) -> float | None:
    values = [r['nfe'] for r in rows if r['bench'] == bench and r['variant'] == variant and r['sampler'] == sampler
              and r['steps'] == steps and r.get('kind', 'cell') == 'cell' and r['w_target'] > 0]
    return min(values) if values else None


def equal_nfe(rows: Rows, grid: Mapping[str, Any], bench: str, variant: str, reference: str = 'baseline',
              ns: Sequence[int] | None = None) -> list[Comparison]:
    """A one-pass variant at 2N steps (its cells with counted NFE <= 2N) against the reference at N steps, N in ns
    (default grid['nfe_steps'])."""
    points, name = _points(grid, bench, variant)
    check_paired(rows, bench, variant, reference)
    out = []
    for sampler in grid['benches'][bench]['samplers']:
        for n in (grid['nfe_steps'] if ns is None else ns):
            budget = 2 * n
            ref_nfe = _mean_nfe(rows, bench, reference, sampler, n)
            for p in points:
                a = _statistic(rows, grid, bench, variant, sampler, 2 * n, p, max_nfe=budget)
                b = _statistic(rows, grid, bench, reference, sampler, n, p, max_nfe=budget)
                if a is not None and b is not None:
                    ref = 'interval' if reference == INTERVAL_REF else 'CFG'
                    out.append(Comparison(f'{sampler}, NFE {budget:g} ({2 * n} one-pass steps vs {n} {ref} steps, '
                                          f'{ref} counted {ref_nfe:g}), {name.format(p)}', a, b))
    return out


# ---------------------------------------------------------------------------------------------------------------
# Sampling cost (issue 20 item 4): equal counted NFE by N; one-pass models and autoguidance against the guidance
# interval at equal counted NFE. The rule is the module's (one paired test per cell); the cells are:
#
# - equal NFE by N: the equal-NFE family at one N (X at 2N steps, standard CFG at N);
# - one-pass X against the interval at N: X at 2N steps (its one-pass cells) against standard CFG with the guidance
#   interval at N steps: X counts 2N NFE per sample, the interval at most 2N (it skips the unconditional pass
#   outside the interval), so X never spends less than the interval. mg's one-pass cells exist only at its trained w;
# - autoguidance against the interval at N: both at N steps with the same interval (the same counted NFE), each at
#   its best point: autoguidance does not aim at CFG's p_w, so the toy scores both by the energy distance to
#   p(x | c), each model at the best w of the bench's w grid (per seed, min over w), and digits by the lowest FD
#   among a model's cells over the grid whose class accuracy reaches each level (FD at matched accuracy, as for
#   every digits cell). Both grids hold w = 0, the same baseline model: the cell asks whose guidance improves on it
#   more.

INTERVAL_REF = 'baseline_interval'
AUTOGUIDANCE = 'autoguidance'


def counted_nfe(rows: Rows, bench: str, variant: str, steps: int, max_nfe: float | None = None
                ) -> tuple[float, float] | None:
    """(min, max) counted NFE per sample over a variant's guided cells at steps (w > 0; at most max_nfe), every
    sampler and seed; None without such cells."""
    nfe = [r['nfe'] for r in rows if r['bench'] == bench and r['variant'] == variant and r.get('kind', 'cell') == 'cell'
           and r['steps'] == steps and r['w'] > 0 and (max_nfe is None or r['nfe'] <= max_nfe + 1e-9)]
    return (min(nfe), max(nfe)) if nfe else None


def best_energy(rows: Rows, bench: str, variant: str, sampler: str, steps: int, ws: Sequence[float]
                ) -> np.ndarray | None:
    """Per seed: the lowest energy distance to p(x | c) (the 'energy' column) over the variant's cells at
    (sampler, steps) with sampling w in ws; None when a seed lacks them."""
    keys = {wkey(w) for w in ws}
    out = []
    for seed_rows in _cells(rows, bench, variant).values():
        pool = [float(r['energy']) for r in seed_rows if r['sampler'] == sampler and r['steps'] == steps
                and wkey(r['w']) in keys]
        if not pool:
            return None
        out.append(min(pool))
    return np.array(out) if out else None


def autoguidance_vs_interval(rows: Rows, grid: Mapping[str, Any], bench: str, n: int) -> list[Comparison]:
    """Autoguidance against the guidance interval, both at n steps (equal counted NFE), by the rule above."""
    info = grid['benches'][bench]
    check_paired(rows, bench, AUTOGUIDANCE, INTERVAL_REF)
    out = []
    for sampler in info['samplers']:
        if info['metric'] == 'fd':
            for level in info['accuracy_levels']:
                a = fd_at_accuracy(rows, bench, AUTOGUIDANCE, sampler, n, level, [0.])
                b = fd_at_accuracy(rows, bench, INTERVAL_REF, sampler, n, level, info['ws'])   # the same grid
                if a is not None and b is not None:
                    out.append(Comparison(f'{sampler}, {n} steps, accuracy >= {level:g} (lowest FD over w)', a, b))
        else:
            a = best_energy(rows, bench, AUTOGUIDANCE, sampler, n, info['ws'])
            b = best_energy(rows, bench, INTERVAL_REF, sampler, n, info['ws'])
            if a is not None and b is not None:
                out.append(Comparison(f'{sampler}, {n} steps, energy to p(x | c) at the best w', a, b))
    return out


NFE_FAMILIES = (   # (key, what, reference): the sampling-cost table's rows
    ('equal_nfe_by_n', 'equal counted NFE, by N: one-pass at 2N steps vs standard CFG at N', 'baseline'),
    ('vs_interval_nfe', 'against the guidance interval at equal counted NFE: one-pass at 2N steps, autoguidance '
     'at N (same interval), vs the interval at N', INTERVAL_REF),
)


def nfe_comparisons(rows: Rows, grid: Mapping[str, Any], bench: str, family: str, variant: str, n: int
                    ) -> tuple[list[Comparison], dict[str, Any]] | None:
    """(comparisons, cost) of one sampling-cost cell (None: not applicable); cost: the steps and counted NFE per
    sample (min, max over the guided cells) of each side."""
    present = {r['variant'] for r in rows if r['bench'] == bench}
    reference = dict((k, ref) for k, _, ref in NFE_FAMILIES)[family]
    if variant not in present or reference not in present:
        return None
    if variant == AUTOGUIDANCE:
        if family != 'vs_interval_nfe':
            return None
        comps, steps_a = autoguidance_vs_interval(rows, grid, bench, n), n
    elif variant in ONE_PASS:
        comps, steps_a = equal_nfe(rows, grid, bench, variant, reference, ns=[n]), 2 * n
    else:
        return None
    cost = {'steps': steps_a, 'nfe': counted_nfe(rows, bench, variant, steps_a, max_nfe=2 * n),
            'ref_steps': n, 'ref_nfe': counted_nfe(rows, bench, reference, n)}
    return comps, cost


def nfe_verdicts(rows: Rows, grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every sampling-cost cell of a run: family, bench, nfe_n (N), variant, the steps and counted NFE per sample of
    each side, and the cell test (Effect.as_dict)."""
    out = []
    for family, _, reference in NFE_FAMILIES:
        for bench in grid['benches']:
            for n in grid['nfe_steps']:
                for variant in (*ONE_PASS, AUTOGUIDANCE):
                    got = nfe_comparisons(rows, grid, bench, family, variant, n)
                    if got is None or not got[0]:
                        continue
                    comps, cost = got
                    out.append({'family': family, 'bench': bench, 'nfe_n': n, 'variant': variant,
                                'reference': reference, **cost, **cell_test(comps).as_dict()})
    return out


def reproduction(rows: Rows, bench: str, variant: str) -> list[Comparison]:
    """Per w: d_X = distance(variant seed k, standard CFG seed k' != k) against d_B = distance(standard CFG seed k,
    seed k'), paired by k (both measured from the same reference seed k'). Rows measured against the standard model
    of the SAME seed (results written before issue 20) are not used: that reference shares initialisation (and
    distill's teacher) and biases the test toward "reproduces"."""
    repro = [r for r in rows if r.get('kind') == 'reproduction' and r['bench'] == bench
             and r['reference_seed'] != r['train_seed']]
    out = []
    for w in sorted({r['w'] for r in repro if r['variant'] == variant}):
        a = {(r['train_seed'], r['reference_seed']): r['distance'] for r in repro if r['variant'] == variant
             and r['w'] == w}
        b = {(r['train_seed'], r['reference_seed']): r['distance'] for r in repro if r['variant'] == 'baseline'
             and r['w'] == w}
        pairs = sorted(set(a) & set(b))
        if pairs:
            steps = next(r['steps'] for r in repro if r['variant'] == variant and r['w'] == w)
            out.append(Comparison(f'w = {w:.3g}, {steps} steps', [a[k] for k in pairs], [b[k] for k in pairs]))
    return out


def claim_comparisons(rows, bench: str, metric: str, a: str, b: str, *, steps_grid, samplers, ws
                      ) -> dict[str, list[Comparison]]:
    """The paper's C1 (best w at few steps) and C2 (worst w at every step count), by sampling w."""
    few = [s for s in FEW_STEPS if s in steps_grid] or [min(steps_grid)]
    c1 = [Comparison(f'{s}, {k} steps, best w', best_over_w(rows, bench, a, metric, s, k, ws),
                     best_over_w(rows, bench, b, metric, s, k, ws)) for s in samplers for k in few]
    c2 = [Comparison(f'{s}, {k} steps, worst w', worst_over_w(rows, bench, a, metric, s, k, ws),
                     worst_over_w(rows, bench, b, metric, s, k, ws)) for s in samplers for k in steps_grid]
    return {'C1': c1, 'C2': c2}


def matched_comparisons(rows, bench, metric, w_train, *, steps_grid, samplers, ws) -> list[Comparison]:
    """C1 at matched effective guidance: aligned at matched_w(w) against standard CFG at w, few steps."""
    few = [s for s in FEW_STEPS if s in steps_grid] or [min(steps_grid)]
    return [Comparison(f'{s}, {k} steps, w_eff = {w:g} (aligned w = {matched_w(w, w_train):g})',
                       at_w(rows, bench, 'aligned', metric, s, k, matched_w(w, w_train)),
                       at_w(rows, bench, 'baseline', metric, s, k, w)) for s in samplers for k in few for w in ws]


# ---------------------------------------------------------------------------------------------------------------
# The verdicts of a run.

# The benchmark's objective variants are named after their objectives (registry).
OBJECTIVES = registry.names()
SEED_VARIANT = 'aligned'   # the variant whose paper's claims (C1, C2) are checked
ONE_PASS = tuple(n for n in OBJECTIVES if registry.get(n).one_pass)
NEEDS = (   # (key, what a user asks, reference)
    ('equal_steps', 'best samples at equal sampling steps', 'baseline'),
    ('equal_nfe', 'best samples at equal sampling cost (NFE, counted)', 'baseline'),
    ('equal_flops', 'best samples at equal training cost (FLOPs)', 'baseline_equal_flops'),
    ('vs_interval', 'better than the cheap fix: a guidance interval on standard CFG', 'baseline_interval'),
    ('reproduction', 'does what CFG does, in one network evaluation per step', 'baseline'),
)


def need_comparisons(rows: Rows, grid: Mapping[str, Any], bench: str, need: str, variant: str
                     ) -> list[Comparison] | None:
    """The comparisons behind one cell of the "which objective for which need" table (None: not applicable)."""
    present = {r['variant'] for r in rows if r['bench'] == bench}
    reference = dict((k, ref) for k, _, ref in NEEDS)[need]
    if need == 'equal_flops':
        reference = flops_reference(grid, bench, variant)
    if variant not in present or reference not in present or variant == reference:
        return None
    if variant == AUTOGUIDANCE:   # a sampling method beside the interval: only its row, at equal counted NFE
        return [c for n in grid['steps'] for c in autoguidance_vs_interval(rows, grid, bench, n)] \
            if need == 'vs_interval' else None
    if need == 'equal_nfe':
        if variant not in ONE_PASS:   # two-pass CFG: equal NFE is equal steps
            return None
        return equal_nfe(rows, grid, bench, variant, reference)
    if need == 'reproduction':
        return reproduction(rows, bench, variant) if variant in ONE_PASS else None
    if variant == 'baseline_interval' and need != 'equal_steps':
        return None
    return equal_steps(rows, grid, bench, variant, reference)


def claims_families(rows: Rows, grid: Mapping[str, Any]) -> list[tuple[str, str, str, list[Comparison]]]:
    """(bench, claim, reference name, comparisons) of the paper's claims for aligned, in the report's order."""
    out = []
    for bench, info in grid['benches'].items():
        metric = info['claims_metric']
        present = {r['variant'] for r in rows if r['bench'] == bench}
        if SEED_VARIANT not in present:
            continue
        for ref in ('baseline', 'baseline_equal_flops'):
            if ref not in present:
                continue
            check_paired(rows, bench, 'aligned', ref)
            comps = claim_comparisons(rows, bench, metric, 'aligned', ref, steps_grid=grid['steps'],
                                      samplers=info['samplers'], ws=info['ws'])
            if ref == 'baseline':
                comps['C1 (matched effective w)'] = matched_comparisons(
                    rows, bench, metric, info['w_train'], steps_grid=grid['steps'], samplers=info['samplers'],
                    ws=info['ws'])
            out += [(bench, claim, REFERENCES[ref], cs) for claim, cs in comps.items()]
    return out


def verdicts(rows: Rows, grid: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every verdict of a run: 'needs' (one row per need, benchmark and objective) and 'claims' (the paper's), each
    with its label, effect, 95% interval and per-comparison counts (Effect.as_dict)."""
    needs = []
    for key, _, _ in NEEDS:
        for bench in grid['benches']:
            for variant in (*OBJECTIVES, 'baseline_interval', AUTOGUIDANCE):
                comps = need_comparisons(rows, grid, bench, key, variant)
                if not comps:
                    continue
                e = reproduction_test(comps) if key == 'reproduction' else cell_test(comps)
                needs.append({'need': key, 'bench': bench, 'variant': variant, **e.as_dict(),
                              **(flops_info(grid, bench, variant) if key == 'equal_flops' else {})})
    claims = []
    for bench, claim, ref_name, cs in claims_families(rows, grid):
        claims.append({'claim': claim, 'bench': bench, 'metric': grid['benches'][bench]['claims_metric'],
                       'reference': ref_name, **claim_test(cs).as_dict()})
    return {'needs': needs, 'claims': claims}


# ---------------------------------------------------------------------------------------------------------------
# Costs (issue 20 items 4 and 6): equal training FLOPs per objective, knob ablations, convergence over training length.

def flops_info(grid: Mapping[str, Any], bench: str, variant: str) -> dict[str, Any]:
    """{'reference', 'flop_ratio'}: the baseline an objective is compared with at equal training FLOPs and its
    counted FLOP ratio; {} for results written before the per-objective baselines."""
    info = grid['benches'][bench].get('equal_flops', {}).get(variant)
    return {'reference': info['reference'], 'flop_ratio': info['ratio']} if info else {}


def flops_reference(grid: Mapping[str, Any], bench: str, variant: str) -> str | None:
    """The standard-CFG variant trained for the objective's counted training FLOPs; None when it has none (never
    another objective's); results written before the per-objective baselines: the one 'baseline_equal_flops'."""
    if 'equal_flops' not in grid['benches'][bench]:
        return 'baseline_equal_flops'
    return flops_info(grid, bench, variant).get('reference')


def ablation_verdicts(rows: Rows, grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each knob ablation against its shipped variant (grid['ablations']), at equal steps, the paired rule:
    'better' = the ablation is better than the shipped setting."""
    out = []
    for bench in grid['benches']:
        present = {r['variant'] for r in rows if r['bench'] == bench and r.get('kind', 'cell') == 'cell'}
        for variant, shipped in grid.get('ablations', {}).items():
            if variant in present and shipped in present:
                comps = equal_steps(rows, grid, bench, variant, shipped)
                if comps:
                    out.append({'bench': bench, 'variant': variant, 'shipped': shipped, **cell_test(comps).as_dict()})
    return out


def convergence_verdicts(rows: Rows, grid: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Each one-pass objective's reproduction test (against another-seed CFG, relative to the seed-to-seed spread)
    at every training length it was trained for: x1 (the objective itself) and grid['convergence']'s longer ones."""
    lengths = [(o, o, 1.0) for o in ONE_PASS] + [(o, v, float(f)) for v, (o, f) in grid.get('convergence', {}).items()]
    out = []
    for bench in grid['benches']:
        longer = {o for o, v, f in lengths if f != 1.0 and any(r['variant'] == v and r['bench'] == bench
                                                               for r in rows)}
        for objective, variant, factor in sorted(lengths, key=lambda x: (ONE_PASS.index(x[0]), x[2])):
            comps = reproduction(rows, bench, variant) if objective in longer else []
            if comps:
                out.append({'bench': bench, 'objective': objective, 'variant': variant, 'factor': factor,
                            **reproduction_test(comps).as_dict()})
    return out


def training_needed(table: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], float | None]:
    """{(bench, objective): the shortest training length (x the bench's steps) from which its reproduction test says
    'reproduces' at every tested length, None when the longest does not}, from convergence_verdicts' rows."""
    out: dict[tuple[str, str], float | None] = {}
    for t in sorted(table, key=lambda t: t['factor']):
        key = (t['bench'], t['objective'])
        if t['label'] != REPRODUCES:
            out[key] = None
        elif out.get(key) is None:
            out[key] = t['factor']
    return out


# ---------------------------------------------------------------------------------------------------------------
# The rule tests itself: synthetic cells with a known answer, and the same checks on a run's own rows.

def synthetic_cells(rng: np.random.Generator, cells: int, seeds: int = 5, points: int = 8, shift: float = 0.,
                    seed_sd: float = 0.3, model_sd: float = 0.05, point_sd: float = 0.02) -> list[list[Comparison]]:
    """Cells of two variants that differ only by shift (in units of model_sd): per training seed s a shared effect
    u_s ~ N(0, seed_sd) (same-seed models share initialisation and data order), per model v ~ N(0, model_sd), per
    model and point e ~ N(0, point_sd); the metric at point j of level mu_j is mu_j (1 + u_s + v + e) (+ the shift
    on a). shift = 0: two sets of identical-variant models."""
    mu = np.geomspace(0.01, 1., points)[None, :, None]
    u = rng.normal(0, seed_sd, (cells, 1, seeds))

    def model(extra: float) -> np.ndarray:
        v = rng.normal(0, model_sd, (cells, 1, seeds))
        return mu * (1 + u + v + rng.normal(0, point_sd, (cells, points, seeds)) + extra)

    a, b = model(shift * model_sd), model(0.)
    return [[Comparison(f'point {j}', a[c, j], b[c, j]) for j in range(points)] for c in range(cells)]


def label_rates(cells: Sequence[Sequence[Comparison]], test: Callable[..., Effect] | None = None, **rule: Any
                ) -> dict[str, float]:
    """The fraction of cells given each label by test (cell_test by default) under rule."""
    labels = [(test or cell_test)(c, describe=False, **rule).label for c in cells]
    return {k: labels.count(k) / len(labels) for k in sorted(set(labels))}


def self_check(seeds: int = 5, cells: int = 2000, shift: float = 2.5, rng_seed: int = 0) -> dict[str, dict]:
    """The rule's own checks on synthetic cells (fixed random seed): label rates on identical variants (null) and on
    a planted difference of shift model sd, under the rule and under two broken rules (an unpaired standard error;
    a 1-SE threshold); and reproduction on identical models and on models exactly at the margin."""
    rng = np.random.default_rng(rng_seed)
    null = synthetic_cells(rng, cells, seeds)
    planted = synthetic_cells(rng, cells, seeds, shift=shift)
    rules = {'rule': {}, 'unpaired SE': {'paired': False}, '1 SE': {'threshold': 1.0}}
    out: dict[str, dict] = {name: {'null': label_rates(null, **r), 'planted': label_rates(planted, **r)}
                            for name, r in rules.items()}
    # Reproduction: d_X against d_B per seed, with a shared seed term (both measured from the same reference seed).
    at_margin = synthetic_cells(rng, cells, seeds, shift=REPRO_MARGIN / 0.05, seed_sd=0.)
    same = synthetic_cells(rng, cells, seeds, seed_sd=0.)
    out['reproduction'] = {'identical': label_rates(same, reproduction_test),
                           'at the margin': label_rates(at_margin, reproduction_test)}
    out['settings'] = {'seeds': seeds, 'cells': cells, 'shift_sd': shift, 'rng_seed': rng_seed}
    return out


def rows_check(rows: Rows, grid: Mapping[str, Any]) -> dict[str, list[tuple[str, Effect]]]:
    """The rule on a run's own rows, per benchmark, sampler and step count (the equal-steps points):
    'null': standard CFG of seed k against standard CFG of seed k + 1 (identical variants, different seeds; the
    pairing is then arbitrary, as for two independent sets); 'planted': standard CFG at N steps against the same
    models at the grid's most steps (the same models at fewer steps: should be worse)."""
    out: dict[str, list] = {'null': [], 'planted': []}
    most = max(grid['steps'])
    for bench in grid['benches']:
        if not _cells(rows, bench, 'baseline'):
            continue
        points, name = _points(grid, bench, 'baseline')
        for sampler in grid['benches'][bench]['samplers']:
            for steps in grid['steps']:
                stat = {p: _statistic(rows, grid, bench, 'baseline', sampler, steps, p) for p in points}
                stat = {p: x for p, x in stat.items() if x is not None and len(x) > 1}
                null = [Comparison(name.format(p), x, np.roll(x, -1)) for p, x in stat.items()]
                if null:
                    out['null'].append((f'{bench}, {sampler}, {steps} steps', cell_test(null)))
                if steps == most:
                    continue
                top = {p: _statistic(rows, grid, bench, 'baseline', sampler, most, p) for p in stat}
                planted = [Comparison(name.format(p), x, top[p]) for p, x in stat.items() if top[p] is not None]
                if planted:
                    out['planted'].append((f'{bench}, {sampler}, {steps} against {most} steps', cell_test(planted)))
    return out
