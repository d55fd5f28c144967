"""Class conditioning for k-diffusion's image_v1 U-Net, which takes no class_cond of its own."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


class ClassConditionedModel(nn.Module):
    """Embeds class_cond (labels 0..num_classes, num_classes = the null label) into image_v1's mapping_cond.

    Build the inner model with mapping_cond_dim increased by embed_dim; the embedding is appended after any
    mapping_cond the caller passes (k-diffusion's augmentation wrapper prepends its 9 aug_cond features).
    """

    def __init__(self, inner_model: nn.Module, num_classes: int, embed_dim: int):
        super().__init__()
        self.inner_model = inner_model
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, embed_dim)

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, class_cond: torch.Tensor | None = None,
                mapping_cond: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
        if class_cond is None:
            raise ValueError(f'class_cond is required: labels in 0..{self.num_classes - 1}, '
                             f'or {self.num_classes} for the null condition')
        embed = self.class_embed(class_cond)
        mapping_cond = embed if mapping_cond is None else torch.cat([mapping_cond, embed], dim=1)
        return self.inner_model(input, sigma, mapping_cond=mapping_cond, **kwargs)

    def param_groups(self, base_lr: float) -> list[dict]:
        """The inner model's parameter groups plus the class embedding (no weight decay)."""
        groups = self.inner_model.param_groups(base_lr)
        return groups + [{'params': list(self.class_embed.parameters()), 'lr': base_lr, 'weight_decay': 0.0}]
