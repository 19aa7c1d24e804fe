"""The InfoSAM relation module: how strongly each image token relates to the mask token."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["RelationModule"]


class RelationModule(nn.Module):
    """Relation between image-encoder tokens and the decoder's single-mask output token.

    One instance is shared by the teacher and student branches. Attribute names are those of the
    reference code, so its saved `relation_model` state_dicts load with `strict=True`.
    Output: (B, N) rows of unit L2 norm. No softmax, no ReLU (as the reference).
    """

    def __init__(self, dim: int = 256) -> None:
        super().__init__()
        self.layer_norm_feat = nn.LayerNorm(dim)
        self.layer_norm_mask = nn.LayerNorm(dim)
        self.query_proj = nn.Linear(dim, dim)
        self.key_proj = nn.Linear(dim, dim)
        self.scale = dim**-0.5

    def forward(self, feat: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """feat: (B, N, C) image tokens or (B, C, H, W) embeddings; mask: (B, 1, C)."""
        if feat.dim() == 4:
            feat = feat.flatten(2).transpose(1, 2)  # channels-last tokens, row-major over H, W
        f = self.layer_norm_feat(feat)
        m = self.layer_norm_mask(mask)
        q = self.query_proj(m)
        k = self.key_proj(f)
        # Residual term uses the *normed* features, as the reference does.
        a = (q @ k.transpose(1, 2)) * self.scale + m @ f.transpose(1, 2)
        return F.normalize(a.squeeze(1), dim=-1, eps=1e-12)
