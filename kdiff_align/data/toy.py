"""A 2-D class-conditional Gaussian mixture with exact samples, and a small MLP network for it.

Class c of K owns two of 2K Gaussians equally spaced on a circle (components c and c + K, opposite each
other), so p(x | c) is known in closed form and can be sampled exactly: the ground truth for the toy
evidence benchmark (docs/design.md section 5).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..core.models import GuidanceEmbedding, guidance_term


class ToyMixture:
    """p(x | c): an equal mixture of N(mu_c, std^2 I) and N(-mu_c, std^2 I), mu_c on a circle of radius."""

    def __init__(self, num_classes: int = 4, radius: float = 2.0, std: float = 0.25):
        if num_classes < 1:
            raise ValueError(f'num_classes must be >= 1, got {num_classes}')
        self.num_classes, self.radius, self.std = num_classes, radius, std
        angles = torch.arange(2 * num_classes) * math.pi / num_classes
        self.means = radius * torch.stack([angles.cos(), angles.sin()], dim=1)

    def sample_class(self, label: int, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples of p(x | c = label), shape [n, 2]."""
        component = label + self.num_classes * torch.randint(0, 2, (n,), generator=generator)
        return self.means[component] + self.std * torch.randn(n, 2, generator=generator)

    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n exact samples of p(x, c) with uniform classes: (x [n, 2], labels [n])."""
        labels = torch.randint(0, self.num_classes, (n,), generator=generator)
        component = labels + self.num_classes * torch.randint(0, 2, (n,), generator=generator)
        return self.means[component] + self.std * torch.randn(n, 2, generator=generator), labels


class FourierFeatures(nn.Module):
    def __init__(self, out_features: int, std: float = 1.):
        super().__init__()
        self.register_buffer('weight', torch.randn(out_features // 2, 1) * std)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * input @ self.weight.T
        return torch.cat([f.cos(), f.sin()], dim=-1)


class ToyMLP(nn.Module):
    """F(c_in x; sigma, class_cond) for 2-D data: an MLP with noise-level and class embeddings (label
    num_classes is the null condition)."""

    def __init__(self, num_classes: int, width: int = 128, depth: int = 3, input_channels: int = 2,
                 guidance_embed: bool = False):
        super().__init__()
        self.num_classes = num_classes
        self.sigma_embed = FourierFeatures(width)
        self.class_embed = nn.Embedding(num_classes + 1, width)
        self.guidance_embed = GuidanceEmbedding(width) if guidance_embed else None
        self.proj_in = nn.Linear(input_channels, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Linear(width, width)) for _ in range(depth))
        self.proj_out = nn.Sequential(nn.SiLU(), nn.Linear(width, input_channels))

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, class_cond: torch.Tensor | None = None,
                guidance_cond: torch.Tensor | None = None) -> torch.Tensor:
        if class_cond is None:
            raise ValueError(f'class_cond is required: labels in 0..{self.num_classes - 1}, '
                             f'or {self.num_classes} for the null condition')
        embed = self.class_embed(class_cond)
        cond = self.sigma_embed(sigma.log()[:, None] / 4) + (embed + guidance_term(self.guidance_embed,
                                                                                    guidance_cond, embed))
        h = self.proj_in(input)
        for block in self.blocks:
            h = h + block(h + cond)
        return self.proj_out(h)
