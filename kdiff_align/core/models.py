"""Class and guidance-weight conditioning for k-diffusion's image_v1 U-Net, which takes neither of its own."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


class GuidanceEmbedding(nn.Module):
    """Embeds the guidance weight w [B] into a conditioning vector [B, dim] whose last layer starts at zero,
    so a model (or a fine-tune of a pretrained one) starts exactly at the model without it (docs/design.md
    section 6; FLUX-dev's guidance embedding, diffusers' time_cond_proj_dim)."""

    def __init__(self, dim: int, features: int = 64):
        super().__init__()
        self.register_buffer('freqs', torch.exp(torch.linspace(0., math.log(100.), features // 2)))
        self.mlp = nn.Sequential(nn.Linear(features, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        angles = w.float()[:, None] * self.freqs
        return self.mlp(torch.cat([angles.cos(), angles.sin()], dim=1))


class ClassConditionedModel(nn.Module):
    """Embeds class_cond (labels 0..num_classes, num_classes = the null label) into image_v1's mapping_cond.

    Build the inner model with mapping_cond_dim increased by embed_dim; the embedding is appended after any
    mapping_cond the caller passes (k-diffusion's augmentation wrapper prepends its 9 aug_cond features).
    With guidance_embed, guidance_cond (w per row) adds a GuidanceEmbedding to the class embedding.
    """

    def __init__(self, inner_model: nn.Module, num_classes: int, embed_dim: int, guidance_embed: bool = False):
        super().__init__()
        self.inner_model = inner_model
        self.num_classes = num_classes
        self.class_embed = nn.Embedding(num_classes + 1, embed_dim)
        self.guidance_embed = GuidanceEmbedding(embed_dim) if guidance_embed else None

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, class_cond: torch.Tensor | None = None,
                mapping_cond: torch.Tensor | None = None, guidance_cond: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        if class_cond is None:
            raise ValueError(f'class_cond is required: labels in 0..{self.num_classes - 1}, '
                             f'or {self.num_classes} for the null condition')
        embed = self.class_embed(class_cond)
        embed = embed + guidance_term(self.guidance_embed, guidance_cond, embed)
        mapping_cond = embed if mapping_cond is None else torch.cat([mapping_cond, embed], dim=1)
        return self.inner_model(input, sigma, mapping_cond=mapping_cond, **kwargs)

    def param_groups(self, base_lr: float) -> list[dict]:
        """The inner model's parameter groups plus the class and guidance embeddings (no weight decay)."""
        groups = self.inner_model.param_groups(base_lr)
        extra = list(self.class_embed.parameters())
        if self.guidance_embed is not None:
            extra += list(self.guidance_embed.parameters())
        return groups + [{'params': extra, 'lr': base_lr, 'weight_decay': 0.0}]


def guidance_term(embedding: GuidanceEmbedding | None, guidance_cond: torch.Tensor | None, like: torch.Tensor
                  ) -> torch.Tensor | float:
    """The w embedding to add to a conditioning vector like `like` (0. when the model is not told w)."""
    if embedding is None:
        if guidance_cond is not None:
            raise ValueError('guidance_cond (w) was passed to a model without a guidance embedding; build it with '
                             'one (a gft or distill objective) or sample it with two-pass CFG')
        return 0.
    if guidance_cond is None:
        raise ValueError('guidance_cond (w per row) is required by a model with a guidance embedding')
    w = torch.as_tensor(guidance_cond, device=like.device).expand(like.shape[0])
    return embedding(w).to(like.dtype)


def with_guidance_embedding(model: ClassConditionedModel) -> ClassConditionedModel:
    """The same network told w: shares model's inner model and class embedding and adds a zero-initialised
    GuidanceEmbedding, so its output equals model's at any w until the embedding is trained."""
    told = ClassConditionedModel(model.inner_model, model.num_classes, model.class_embed.embedding_dim,
                                 guidance_embed=True)
    told.class_embed = model.class_embed
    return told.to(model.class_embed.weight.device)


class _ClassAndGuidanceEmbedding(nn.Module):
    """image_transformer_v1's class embedding plus a GuidanceEmbedding of the w set by GuidanceToldTransformer."""

    def __init__(self, class_emb: nn.Embedding):
        super().__init__()
        self.class_emb = class_emb
        self.guidance_embed = GuidanceEmbedding(class_emb.embedding_dim)
        self.guidance_cond: torch.Tensor | None = None

    def forward(self, class_cond: torch.Tensor) -> torch.Tensor:
        embed = self.class_emb(class_cond)
        return embed + guidance_term(self.guidance_embed, self.guidance_cond, embed)


class GuidanceToldTransformer(nn.Module):
    """k-diffusion's image_transformer_v1 told w, without editing k-diffusion: the transformer sums its class
    embedding into the mapping network's input, so that embedding is replaced by one that adds a zero-initialised
    GuidanceEmbedding of the call's guidance_cond (set for the duration of each forward)."""

    def __init__(self, inner_model: nn.Module):
        super().__init__()
        if getattr(inner_model, 'class_emb', None) is None:
            raise ValueError('a transformer told w needs its class embedding (dataset.num_classes > 0)')
        inner_model.class_emb = _ClassAndGuidanceEmbedding(inner_model.class_emb)
        self.inner_model = inner_model

    def forward(self, input: torch.Tensor, sigma: torch.Tensor, guidance_cond: torch.Tensor | None = None,
                **kwargs: Any) -> torch.Tensor:
        embedding = self.inner_model.class_emb
        embedding.guidance_cond = guidance_cond
        try:
            return self.inner_model(input, sigma, **kwargs)
        finally:
            embedding.guidance_cond = None

    def param_groups(self, base_lr: float) -> list[dict]:
        return self.inner_model.param_groups(base_lr)
