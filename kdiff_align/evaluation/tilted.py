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

from .metrics import energy_distance
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
        reach = float(mixture.means.abs().max()) + margin * mixture.std
        self.grid = Grid(-reach, reach, resolution)
        x = self.grid.centres()
        k = mixture.num_classes
        self.log_uncond = mixture_log_density(x, mixture.means, mixture.std)   # p(x) = mean_c p(x | c)
        self.log_cond = [mixture_log_density(x, mixture.means[[c, c + k]], mixture.std) for c in range(k)]
        self._floors: dict[tuple, float] = {}
        self._references: dict[tuple, torch.Tensor] = {}

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
