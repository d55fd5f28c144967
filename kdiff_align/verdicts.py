"""The claims benchmark's comparisons and verdicts, computed from its results rows alone (docs/claims/results.json).

One rule for every comparison, stated before the numbers (docs/design.md section 5): lower metric is better; a
comparison of an objective a with a reference b over training seeds is *better* / *worse* when the difference of
their means exceeds Z = 2 standard errors, sqrt(s_a^2 / n_a + s_b^2 / n_b), else a *tie*. A statistic that a seed
cannot produce (digits: no w reaches the accuracy level) is infinite: finite in every seed of one side only is
better for that side; infinite on both sides is *unreached* and not counted.

Comparison families (objective X against a reference R):

- equal steps: X and R at the same sampler and step count; on the toy, energy distance to the exact p_w at each
  guided target w (X at its w_target = w: an aligned model at w_train + w (1 + w_train)); on digits, the lowest FD
  among the cells whose class accuracy reaches each level (FD at matched accuracy);
- equal NFE (one-pass X): X at 2N steps against R at N steps, N in grid['nfe_steps'], counting only X's cells
  whose counted NFE is at most 2N (the cells that ran in one pass);
- equal training FLOPs: equal steps against standard CFG trained for the FLOPs of the most expensive objective;
- against the guidance interval: equal steps against standard CFG sampled with a guidance interval;
- reproduction of guidance (one-pass X): the distance between X's samples and the standard model's CFG samples
  at the same w and seed (grid['repro_steps'] steps), against the distance between two standard models' CFG
  samples (seed k and k + 1): a tie means X reproduces CFG within the spread of training seeds;
- the paper's claims for aligned (C1, C2, C1 at matched effective guidance), as in the first round.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import registry

Z = 2.0  # "beyond the spread": |difference of means| > Z standard errors over training seeds
FEW_STEPS = (4, 8)
Rows = Sequence[Mapping[str, Any]]

REFERENCES = {'baseline': 'standard CFG', 'baseline_equal_flops': 'standard CFG at equal FLOPs',
              'baseline_interval': 'standard CFG with a guidance interval'}


def matched_w(w: float, w_train: float) -> float:
    """The aligned model's sampling w whose effective guidance equals w for the true pair (docs/design.md section 2):
    (w_sample - w_train) / (1 + w_train) = w."""
    return w_train + w * (1 + w_train)


def wkey(w: float) -> float:
    """w rounded for matching cells: effective guidances computed in floating point."""
    return round(float(w), 6)


@dataclass
class Comparison:
    """An objective (a) against a reference (b): one statistic per training seed each; lower is better."""
    label: str
    a: np.ndarray
    b: np.ndarray

    @property
    def reached(self) -> bool:
        return bool(np.isfinite(self.a).all() and np.isfinite(self.b).all())

    @property
    def diff(self) -> float:
        return float(self.a.mean() - self.b.mean()) if self.reached else math.nan

    @property
    def se(self) -> float:
        var = lambda x: x.var(ddof=1) / len(x) if len(x) > 1 else 0.  # noqa: E731
        return float(math.sqrt(var(self.a) + var(self.b))) if self.reached else math.nan

    @property
    def outcome(self) -> str:
        """'better' / 'worse' (lower = better) beyond Z standard errors, else 'tie'; 'unreached' when neither side
        has a finite statistic in every seed."""
        if not self.reached:
            a_ok, b_ok = bool(np.isfinite(self.a).all()), bool(np.isfinite(self.b).all())
            return 'better' if a_ok else 'worse' if b_ok else 'unreached'
        if self.diff < -Z * self.se:
            return 'better'
        if self.diff > Z * self.se:
            return 'worse'
        return 'tie'


def counts(comparisons: Sequence[Comparison]) -> dict[str, int]:
    return {k: sum(c.outcome == k for c in comparisons) for k in ('better', 'tie', 'worse')}


def verdict(comparisons: Sequence[Comparison]) -> tuple[str, dict[str, int]]:
    """The paper's claims: held = better in every comparison; partly = better in more than worse; else did not hold."""
    n = counts(comparisons)
    if comparisons and n['better'] == len(comparisons):
        return 'held', n
    if n['better'] > n['worse'] and n['better'] > 0:
        return 'partly', n
    return 'did not hold', n


def standing(comparisons: Sequence[Comparison], family: str = '') -> tuple[str, dict[str, int]]:
    """Where an objective stands against a reference: wins (better in every counted comparison), mostly wins
    (more better than worse), ties (as many better as worse, e.g. all ties), mostly loses, loses (worse in every
    one); for the reproduction family: reproduces (never worse), partly, does not reproduce (always worse)."""
    n = counts(comparisons)
    total = sum(n.values())
    if not total:
        return 'n/a', n
    if family == 'reproduction':
        return ('reproduces' if n['worse'] == 0 else 'does not reproduce' if n['worse'] == total else 'partly'), n
    if n['better'] == total:
        return 'wins', n
    if n['worse'] == total:
        return 'loses', n
    if n['better'] > n['worse']:
        return 'mostly wins', n
    if n['worse'] > n['better']:
        return 'mostly loses', n
    return 'ties', n


# ---------------------------------------------------------------------------------------------------------------
# Statistics per training seed.

def _seeds(rows: Rows, bench: str) -> list[int]:
    return sorted({r['train_seed'] for r in rows if r['bench'] == bench and r.get('kind', 'cell') == 'cell'})


def _cells(rows: Rows, bench: str, variant: str) -> dict[int, list[Mapping[str, Any]]]:
    out: dict[int, list] = {}
    for r in rows:
        if r['bench'] == bench and r['variant'] == variant and r.get('kind', 'cell') == 'cell':
            out.setdefault(r['train_seed'], []).append(r)
    return out


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


def equal_nfe(rows: Rows, grid: Mapping[str, Any], bench: str, variant: str, reference: str = 'baseline'
              ) -> list[Comparison]:
    """A one-pass variant at 2N steps (its cells with counted NFE <= 2N) against the reference at N steps."""
    points, name = _points(grid, bench, variant)
    out = []
    for sampler in grid['benches'][bench]['samplers']:
        for n in grid['nfe_steps']:
            budget = 2 * n
            ref_nfe = _mean_nfe(rows, bench, reference, sampler, n)
            for p in points:
                a = _statistic(rows, grid, bench, variant, sampler, 2 * n, p, max_nfe=budget)
                b = _statistic(rows, grid, bench, reference, sampler, n, p, max_nfe=budget)
                if a is not None and b is not None:
                    out.append(Comparison(f'{sampler}, NFE {budget:g} ({2 * n} one-pass steps vs {n} CFG steps, '
                                          f'CFG counted {ref_nfe:g}), {name.format(p)}', a, b))
    return out


def reproduction(rows: Rows, bench: str, variant: str) -> list[Comparison]:
    """Per w: distance(variant seed k, standard CFG seed k) against distance(standard CFG seed k, seed k + 1)."""
    repro = [r for r in rows if r.get('kind') == 'reproduction' and r['bench'] == bench]
    ws = sorted({r['w'] for r in repro if r['variant'] == variant})
    out = []
    for w in ws:
        a = np.array([r['distance'] for r in sorted(repro, key=lambda r: r['train_seed'])
                      if r['variant'] == variant and r['w'] == w])
        b = np.array([r['distance'] for r in sorted(repro, key=lambda r: r['train_seed'])
                      if r['variant'] == 'baseline' and r['w'] == w])
        if len(a) and len(b):
            out.append(Comparison(f'w = {w:.3g}, {repro[0]["steps"]} steps', a, b))
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
    if variant not in present or reference not in present or variant == reference:
        return None
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
            comps = claim_comparisons(rows, bench, metric, 'aligned', ref, steps_grid=grid['steps'],
                                      samplers=info['samplers'], ws=info['ws'])
            if ref == 'baseline':
                comps['C1 (matched effective w)'] = matched_comparisons(
                    rows, bench, metric, info['w_train'], steps_grid=grid['steps'], samplers=info['samplers'],
                    ws=info['ws'])
            out += [(bench, claim, REFERENCES[ref], cs) for claim, cs in comps.items()]
    return out


def verdicts(rows: Rows, grid: Mapping[str, Any]) -> dict[str, list[dict[str, Any]]]:
    """Every verdict of a run: 'needs' (one row per need, benchmark and objective) and 'claims' (the paper's)."""
    needs = []
    for key, _, _ in NEEDS:
        for bench in grid['benches']:
            for variant in (*OBJECTIVES, 'baseline_interval'):
                comps = need_comparisons(rows, grid, bench, key, variant)
                if comps is None:
                    continue
                label, n = standing(comps, key)
                needs.append({'need': key, 'bench': bench, 'variant': variant, 'standing': label, **n})
    claims = []
    for bench, claim, ref_name, cs in claims_families(rows, grid):
        v, n = verdict(cs)
        claims.append({'claim': claim, 'bench': bench, 'metric': grid['benches'][bench]['claims_metric'],
                       'reference': ref_name, 'verdict': v, **n,
                       'ratio': float(np.median([c.a.mean() / c.b.mean() for c in cs]))})
    return {'needs': needs, 'claims': claims}
