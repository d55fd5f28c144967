"""Exact samples of the distribution guidance aims for, on a 2-D grid (docs/design.md section 5).

Classifier-free guidance at w targets the tilted conditional

    p_w(x | c) = p(x | c)^(1 + w) p(x)^(-w) / Z_w(c)                                    (eq. T)

(Ho & Salimans 2022, sec. 3.2: p(x | c) p(c | x)^w). Where both densities are known in closed form, as for
the toy mixture (kdiff_align.data.toy.ToyMixture, p(x) = the class average of p(x | c)), eq. T is sampled exactly
up to a grid: evaluate the unnormalised log density at the centres of a fine square grid, draw a cell with
probability proportional to it, then a point uniformly inside that cell. The only approximations are the
cell width h (the density is taken constant inside a cell; stated by `Grid.cell`) and the mass outside the
grid, which `ToyTarget`'s margin (8 component standard deviations) makes negligible: for w >= 0,
p_w <= K^w p(x | c) / Z_w with Z_w of order K^w, so p_w has Gaussian tails no heavier than p(x | c)'s.
eq. T is a normalisable density for w >= -1 (w in [-1, 0): a geometric mixture of p(x | c) and p(x)).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .metrics import energy_distance, energy_distance_vu
from ..data.toy import ToyMixture

LogDensity = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Grid:
    """The square [low, high]^2 cut into resolution x resolution cells of width (high - low) / resolution."""
    low: float
    high: float
    resolution: int

    def __post_init__(self) -> None:
        if not self.high > self.low or self.resolution < 1:
            raise ValueError(f'a grid needs high > low and resolution >= 1, got {self}')

    @property
    def cell(self) -> float:
        """The cell width h: the resolution up to which samples are exact."""
        return (self.high - self.low) / self.resolution

    def centres(self) -> torch.Tensor:
        """Cell centres [resolution^2, 2] (float64), row-major: index = i * resolution + j for (x_i, y_j)."""
        c = self.low + (torch.arange(self.resolution, dtype=torch.float64) + 0.5) * self.cell
        return torch.cartesian_prod(c, c)


class GridDistribution:
    """The distribution whose unnormalised log density is log_density [resolution^2] at grid.centres(), constant
    inside each cell: sampling draws a cell by inverting the cumulative distribution of the cells, then a
    uniform point inside it."""

    def __init__(self, log_density: torch.Tensor, grid: Grid):
        if log_density.shape != (grid.resolution ** 2,):
            raise ValueError(f'log_density must have one value per cell, {grid.resolution ** 2}, got '
                             f'{tuple(log_density.shape)}')
        if not torch.isfinite(log_density.max()):
            raise ValueError('log_density has no finite maximum: the density is zero or infinite on the grid')
        self.grid = grid
        self.cdf = torch.softmax(log_density.double(), 0).cumsum(0)

    @property
    def probs(self) -> torch.Tensor:
        """The probability of each cell [resolution^2], cell index = x index * resolution + y index."""
        return torch.diff(self.cdf, prepend=self.cdf.new_zeros(1))

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples [n, 2] (float64)."""
        u = torch.rand(n, generator=generator, dtype=torch.float64) * self.cdf[-1]
        cells = torch.searchsorted(self.cdf, u, right=True).clamp(max=self.cdf.shape[0] - 1)
        r = self.grid.resolution
        corner = self.grid.low + self.grid.cell * torch.stack([cells // r, cells % r], 1).double()
        return corner + self.grid.cell * torch.rand(n, 2, generator=generator, dtype=torch.float64)


def grid_sample(log_density: torch.Tensor, grid: Grid, n: int, generator: torch.Generator | None = None
                ) -> torch.Tensor:
    """n samples [n, 2] of GridDistribution(log_density, grid)."""
    return GridDistribution(log_density, grid).sample(n, generator)


def tilted_log_density(log_cond: torch.Tensor, log_uncond: torch.Tensor, w: float) -> torch.Tensor:
    """The unnormalised log of eq. T: (1 + w) log p(x | c) - w log p(x), for w >= -1."""
    if not w >= -1:
        raise ValueError(f'the tilted density p(x|c)^(1+w) p(x)^(-w) needs w >= -1, got {w}')
    return (1 + w) * log_cond - w * log_uncond


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """log N(x; mean, std^2 I) for points x [N, d]."""
    d = x.shape[1]
    sq = ((x - torch.as_tensor(mean, dtype=x.dtype)) ** 2).sum(1)
    return -sq / (2 * std ** 2) - d * math.log(std) - d / 2 * math.log(2 * math.pi)


def mixture_log_density(x: torch.Tensor, means: torch.Tensor, std: float) -> torch.Tensor:
    """log of the equal mixture of N(mean_k, std^2 I) over the rows of means, at points x [N, d]."""
    logs = torch.stack([gaussian_log_density(x, m, std) for m in means.to(x.dtype)])
    return torch.logsumexp(logs, 0) - math.log(means.shape[0])


class ToyTarget:
    """Exact (up to the grid) samples of p_w(x | c), eq. T, for a ToyMixture with uniform classes.

    The grid covers the mixture's components plus `margin` standard deviations on every side, with
    `resolution` cells per axis (default 1024: h = 0.0078 for the shipped toy, 0.03 standard deviations; 0.012
    for the claims benchmark's std 0.5, 0.023 standard deviations).
    """

    def __init__(self, mixture: ToyMixture, resolution: int = 1024, margin: float = 8.0):
        self.mixture = mixture
        self.grid = self.make_grid(mixture, resolution, margin)
        x = self.grid.centres()
        k = mixture.num_classes
        self.log_uncond = mixture_log_density(x, mixture.means, mixture.std)   # p(x) = mean_c p(x | c)
        self.log_cond = [mixture_log_density(x, mixture.means[[c, c + k]], mixture.std) for c in range(k)]
        self._floors: dict[tuple, float] = {}
        self._references: dict[tuple, torch.Tensor] = {}

    @staticmethod
    def make_grid(mixture: ToyMixture, resolution: int = 1024, margin: float = 8.0) -> Grid:
        """The grid a ToyTarget of mixture samples on."""
        reach = float(mixture.means.abs().max()) + margin * mixture.std
        return Grid(-reach, reach, resolution)

    def distribution(self, label: int, w: float) -> GridDistribution:
        """p_w(x | c = label) on the grid."""
        return GridDistribution(tilted_log_density(self.log_cond[label], self.log_uncond, w), self.grid)

    def sample(self, label: int, w: float, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples [n, 2] (float64) of p_w(x | c = label)."""
        return self.distribution(label, w).sample(n, generator)

    def floor(self, w: float, n: int, *, pairs: int = 5, seed: int = 0) -> float:
        """The energy distance between two independent exact sample sets of n points per class, averaged over
        classes and `pairs` pairs: what a perfect sampler scores against p_w at this n (cached)."""
        key = (float(w), n, pairs, seed)
        if key not in self._floors:
            gen = torch.Generator().manual_seed(2_000_003 + seed)
            draws = []
            for c in range(self.mixture.num_classes):
                dist = self.distribution(c, w)
                draws += [energy_distance(dist.sample(n, gen), dist.sample(n, gen)) for _ in range(pairs)]
            self._floors[key] = float(sum(draws) / len(draws))
        return self._floors[key]

    def reference(self, label: int, w: float, n: int, seed: int = 0) -> torch.Tensor:
        """The exact sample set [n, 2] that distance() compares class label's samples with (cached: every cell
        at this (w, n) meets the same reference, as common random numbers)."""
        key = (label, float(w), n, seed)
        if key not in self._references:
            gen = torch.Generator().manual_seed(3_000_017 + 7919 * label + seed)
            self._references[key] = self.sample(label, w, n, gen)
        return self._references[key]

    def distance(self, samples: torch.Tensor, labels: torch.Tensor, w: float, *, seed: int = 0) -> float:
        """The energy distance between each class's samples and as many exact samples of p_w(x | c), averaged
        over the classes present in labels."""
        out = []
        for c in labels.unique().tolist():
            x = samples[labels == c].double()
            if x.shape[0] < 2:
                raise ValueError(f'class {c} has {x.shape[0]} samples; need at least 2 per class')
            out.append(energy_distance(x, self.reference(c, w, x.shape[0], seed)))
        return float(sum(out) / len(out))


# ---------------------------------------------------------------------------------------------------------------
# Floors from many draws, and the separation between p_w and p(x | c) against the right null.

MEAN_DISTANCE_IN_UNIT_SQUARE = (2 + math.sqrt(2) + 5 * math.asinh(1)) / 15   # E|U - U'|, U, U' uniform on [0, 1]^2


def population_energy(a: GridDistribution, b: GridDistribution, coarsen: int = 8) -> float:
    """The population energy distance 2 E|X - Y| - E|X - X'| - E|Y - Y'| = -sum r_i r_j |x_i - x_j| (r = a - b, the
    cell probabilities), numerically on the grid coarsened `coarsen` times per axis (distances between cell
    centres; within a cell the mean distance of two uniform points)."""
    g = a.grid
    if b.grid != g or g.resolution % coarsen:
        raise ValueError(f'population_energy needs one grid whose resolution is a multiple of {coarsen}')
    k = g.resolution // coarsen
    r = (a.probs - b.probs).reshape(k, coarsen, k, coarsen).sum((1, 3)).flatten()
    keep = ((a.probs + b.probs).reshape(k, coarsen, k, coarsen).sum((1, 3)).flatten() > 1e-13).nonzero()[:, 0]
    h = g.cell * coarsen
    idx = torch.stack([keep // k, keep % k], 1).double()
    centres, r = g.low + h * (idx + 0.5), r[keep]
    total = 0.
    for i in range(0, len(keep), 4096):
        dist = torch.cdist(centres[i:i + 4096], centres)
        dist[torch.arange(dist.shape[0]), torch.arange(i, i + dist.shape[0])] = MEAN_DISTANCE_IN_UNIT_SQUARE * h
        total += float(r[i:i + 4096] @ (dist @ r))
    return -total


def _summary(values: list[float]) -> dict[str, float]:
    v = torch.tensor(values, dtype=torch.float64)
    return {'mean': float(v.mean()), 'sd': float(v.std()), 'lo': float(v.quantile(0.025)),
            'hi': float(v.quantile(0.975))}


def monte_carlo_p(observed: float, null_draws: list[float]) -> float:
    """(1 + #{null draws >= observed}) / (K + 1): P(p <= alpha) <= alpha when observed is exchangeable with the
    K null draws (Monte Carlo test; exactly alpha when alpha (K + 1) is an integer)."""
    return (1 + sum(d >= observed for d in null_draws)) / (len(null_draws) + 1)


def detectable(observed_u: float, floor_u: list[float], alpha: float = 0.05) -> bool:
    """The check: a separation draw (U-statistic) is distinguishable from the floor draws when its Monte Carlo p-value
    against them is at most alpha."""
    return monte_carlo_p(observed_u, floor_u) <= alpha


def floors_and_separation(target: ToyTarget, ws, n: int, *, draws: int = 39, seed: int = 0, alpha: float = 0.05,
                          population: bool = True) -> list[dict]:
    """Per w: the floor of p_w at n samples per class (the class-averaged energy distance between two independent
    exact sets of p_w, `draws` draws, V- and U-statistic: mean, sd, 2.5-97.5% range), the same distance between an
    n-set of p_w and an n-set of p(x | c) (`draws` draws), the population separation (population_energy,
    class-averaged), and the test: is the separation distinguishable at n from the distance between two n-sets of
    one distribution? `detectable`: the Monte Carlo test of the first separation draw's U-statistic against the
    floor draws (the null: p_w = p(x | c), under which the two are exchangeable) at level alpha; `power`: the
    fraction of separation draws it detects (about alpha under the null). `raw`: every draw. Deterministic from
    seed (and each w's value)."""
    out = []
    k = target.mixture.num_classes
    for w in ws:
        gen = torch.Generator().manual_seed(6_000_011 + 7919 * int(round(1000 * (float(w) + 1))) + seed)
        pw = [target.distribution(c, w) for c in range(k)]
        p0 = [target.distribution(c, 0.) for c in range(k)]
        floor_v, floor_u, sep_v, sep_u = [], [], [], []
        for _ in range(draws):
            for same, v_out, u_out in ((True, floor_v, floor_u), (False, sep_v, sep_u)):
                pairs = [(pw[c].sample(n, gen), (pw[c] if same else p0[c]).sample(n, gen)) for c in range(k)]
                vu = [energy_distance_vu(a, b) for a, b in pairs]
                v_out.append(sum(v for v, _ in vu) / k)
                u_out.append(sum(u for _, u in vu) / k)
        row = {'w': float(w), 'n_per_class': n, 'draws': draws, 'alpha': alpha, 'seed': seed,
               'floor_v': _summary(floor_v), 'floor_u': _summary(floor_u), 'separation_v': _summary(sep_v),
               'separation_u': _summary(sep_u), 'p_value': monte_carlo_p(sep_u[0], floor_u),
               'detectable': detectable(sep_u[0], floor_u, alpha),
               'power': sum(detectable(u, floor_u, alpha) for u in sep_u) / draws,
               'raw': {'floor_v': floor_v, 'floor_u': floor_u, 'separation_v': sep_v, 'separation_u': sep_u}}
        if population:
            row['population'] = sum(population_energy(pw[c], p0[c]) for c in range(k)) / k
        out.append(row)
    return out
