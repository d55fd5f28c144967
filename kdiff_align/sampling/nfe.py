"""Counting network evaluations (NFE) while sampling, instead of assuming them (docs/design.md section 4).

`CountingDenoiser` wraps a denoiser D(x; sigma, **cond) and counts the rows it is called with: a two-pass CFG
step calls it once with 2B rows for B samples (2 NFE per sample), a one-pass step once with B rows (1 NFE),
a step outside a guidance interval once with B rows. Wrapped around an AutoGuidedDenoiser, it also counts
the rows of every call to its guide model (2 NFE per guided step: main and guide). NFE per sample = rows / samples.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class CountingDenoiser(nn.Module):
    """denoiser(x, sigma, **kwargs), counting calls and rows (network evaluations of one sample each)."""

    def __init__(self, denoiser: nn.Module):
        super().__init__()
        self.inner_model = denoiser
        self.calls = 0
        self.rows = 0

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self._count(input)
        guide = getattr(self.inner_model, 'guide_model', None)   # autoguidance: the guide's calls count too
        if not isinstance(guide, nn.Module):
            return self.inner_model(input, sigma, **kwargs)
        handle = guide.register_forward_pre_hook(lambda module, args: self._count(args[0]))
        try:
            return self.inner_model(input, sigma, **kwargs)
        finally:
            handle.remove()

    def _count(self, input: torch.Tensor) -> None:
        self.calls += 1
        self.rows += input.shape[0]

    def reset(self) -> None:
        self.calls = self.rows = 0

    def nfe(self, samples: int) -> float:
        """Network evaluations per sample since the last reset."""
        return self.rows / samples
