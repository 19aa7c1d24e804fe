"""Speed and memory switches for SAM training, each numerically equivalent to the eager model.

All of them convert existing segment-anything modules in place (class swap, weights and
state_dict keys unchanged), never fork segment-anything:

- `use_attention(sam, "sdpa")`: image-encoder attention through
  `torch.nn.functional.scaled_dot_product_attention`, the decomposed relative-position bias
  passed as `attn_mask` (fused kernels, no softmax matrix kept for backward).
- `use_attention(sam, "folded")`: the decomposed bias folded into the dot product. With
  q' = [q*scale, rel_h(q), rel_w(q)] and k' = [k, onehot(row(k)), onehot(col(k))],
  q'.k' = scale*q.k + rel_h[q, row(k)] + rel_w[q, col(k)]: exactly the biased score, so SDPA
  runs with no mask at all (flash/cuDNN kernels, no (B*heads, N, N) bias or bias gradient).
- `use_attention(sam, "flex")`: global-attention blocks through FlexAttention, adding the
  decomposed bias inside the kernel with a `score_mod`; windowed blocks use SDPA.
- `checkpoint_blocks(sam)`: activation checkpointing of image-encoder blocks (memory).
- `compile_blocks(sam)`: `torch.compile` of each encoder block.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import Attention, get_rel_pos
from torch.utils.checkpoint import checkpoint

from infosam.tuning import encoder_blocks

__all__ = [
    "ATTENTION_KINDS",
    "FlexAttention",
    "FoldedAttention",
    "SDPAAttention",
    "checkpoint_blocks",
    "compile_blocks",
    "use_attention",
]

ATTENTION_KINDS = ("eager", "sdpa", "folded", "flex")


def _qkv(attn: Attention, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, h, w, _ = x.shape
    qkv = attn.qkv(x).reshape(b, h * w, 3, attn.num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv.unbind(0)  # each (B, heads, N, head_dim)


def _rel_terms(
    attn: Attention, q: torch.Tensor, h: int, w: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """segment-anything's decomposed rel-pos terms: (B, heads, H, W, H) and (B, heads, H, W, W)."""
    b, n_heads, _, dim = q.shape
    rh = get_rel_pos(h, h, attn.rel_pos_h).to(q.dtype)
    rw = get_rel_pos(w, w, attn.rel_pos_w).to(q.dtype)
    r_q = q.reshape(b, n_heads, h, w, dim)
    rel_h = torch.einsum("bnhwc,hkc->bnhwk", r_q, rh)
    rel_w = torch.einsum("bnhwc,wkc->bnhwk", r_q, rw)
    return rel_h, rel_w


def _merge(attn: Attention, out: torch.Tensor, b: int, h: int, w: int) -> torch.Tensor:
    out = out.view(b, attn.num_heads, h, w, -1).permute(0, 2, 3, 1, 4).reshape(b, h, w, -1)
    return attn.proj(out)


class SDPAAttention(Attention):
    """segment-anything `Attention` computed by scaled_dot_product_attention."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, h, w, _ = x.shape
        q, k, v = _qkv(self, x)
        mask = None
        if self.use_rel_pos:
            rel_h, rel_w = _rel_terms(self, q, h, w)
            mask = (rel_h[..., :, None] + rel_w[..., None, :]).reshape(
                b, self.num_heads, h * w, h * w
            )
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        return _merge(self, out, b, h, w)


def _key_onehots(h: int, w: int, like: torch.Tensor) -> torch.Tensor:
    """(N, h + w): one-hot of each key token's row, then of its column."""
    idx = torch.arange(h * w, device=like.device)
    return torch.cat([F.one_hot(idx // w, h), F.one_hot(idx % w, w)], -1).to(like.dtype)


class FoldedAttention(SDPAAttention):
    """SDPA with the decomposed rel-pos bias folded into extra q/k channels (no mask tensor).

    `pad_value`: zero-pad v to the folded head dim (<= 256) so the flash/cuDNN kernels, which
    need equal q/k/v head dims, can run; otherwise v keeps its size (memory-efficient or math
    kernel). None (default) pads on CUDA only.
    """

    pad_value: bool | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_rel_pos:  # no bias to fold or add: plain SDPA
            return super().forward(x)
        b, h, w, _ = x.shape
        q, k, v = _qkv(self, x)
        n, heads, dim = h * w, self.num_heads, q.shape[-1]
        rel_h, rel_w = _rel_terms(self, q, h, w)
        extra = h + w
        pad = -(dim + extra) % 8  # kernels want head dims in multiples of 8
        qf = torch.cat(
            [q * self.scale, rel_h.reshape(b, heads, n, h), rel_w.reshape(b, heads, n, w)], -1
        )
        kf = torch.cat([k, _key_onehots(h, w, k).expand(b, heads, n, extra)], -1)
        if pad:
            qf, kf = F.pad(qf, (0, pad)), F.pad(kf, (0, pad))
        folded = dim + extra + pad
        pad_value = v.is_cuda if self.pad_value is None else self.pad_value
        if pad_value and folded <= 256:
            out = F.scaled_dot_product_attention(qf, kf, F.pad(v, (0, folded - dim)), scale=1.0)
            out = out[..., :dim]
        else:
            out = F.scaled_dot_product_attention(qf, kf, v, scale=1.0)
        return _merge(self, out, b, h, w)


def _flex_rel_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rel_h: torch.Tensor,
    rel_w: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """flex_attention adding rel_h[q, row(k)] + rel_w[q, col(k)] to each score in-kernel."""
    from torch.nn.attention.flex_attention import flex_attention

    w = rel_w.shape[-1]

    def score_mod(score, bi, hi, qi, ki):
        return score + rel_h[bi, hi, qi, ki // w] + rel_w[bi, hi, qi, ki % w]

    return flex_attention(q, k, v, score_mod=score_mod, scale=scale)


_COMPILED_FLEX: Any = None


def _flex_fn(on_gpu: bool) -> Any:
    """On GPU the whole function (score_mod and its captured tensors included) is compiled:
    flex_attention only has fused kernels, and gradients for captured tensors, when traced
    together with its score_mod. Eager flex is a slow reference path meant for CPU tests."""
    global _COMPILED_FLEX
    if not on_gpu:
        return _flex_rel_attention
    if _COMPILED_FLEX is None:
        _COMPILED_FLEX = torch.compile(_flex_rel_attention, fullgraph=True, dynamic=False)
    return _COMPILED_FLEX


class FlexAttention(SDPAAttention):
    """Global attention with the decomposed rel-pos bias added inside the kernel (score_mod)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.use_rel_pos:  # no bias to fold or add: plain SDPA
            return super().forward(x)
        b, h, w, _ = x.shape
        q, k, v = _qkv(self, x)
        rel_h, rel_w = _rel_terms(self, q, h, w)
        rel_h = rel_h.reshape(b, self.num_heads, h * w, h)
        rel_w = rel_w.reshape(b, self.num_heads, h * w, w)
        out = _flex_fn(x.is_cuda)(q, k, v, rel_h, rel_w, self.scale)
        return _merge(self, out, b, h, w)


def use_attention(sam: Sam, kind: str = "sdpa") -> Sam:
    """Route the image encoder's attention through `kind` (eager | sdpa | flex), in place."""
    if kind not in ATTENTION_KINDS:
        raise ValueError(f"unknown attention {kind!r}; choose one of {ATTENTION_KINDS}")
    for block in sam.image_encoder.blocks:
        attn = block.attn
        if kind == "eager":
            attn.__class__ = Attention
        elif kind == "flex" and block.window_size == 0:
            attn.__class__ = FlexAttention
        elif kind == "folded":
            attn.__class__ = FoldedAttention
        else:
            attn.__class__ = SDPAAttention
    return sam


_CHECKPOINTED: dict[type, type] = {}


def _checkpointed_class(cls: type) -> type:
    """One checkpointed subclass per block class: compiled blocks then share guards instead of
    recompiling for every block (a new class per block hit dynamo's recompile limit)."""
    if cls not in _CHECKPOINTED:
        base_forward = cls.forward

        def forward(self: Any, x: torch.Tensor) -> torch.Tensor:
            if self.training and torch.is_grad_enabled() and x.requires_grad:
                return checkpoint(base_forward, self, x, use_reentrant=False)
            return base_forward(self, x)

        _CHECKPOINTED[cls] = type(
            f"Checkpointed{cls.__name__}",
            (cls,),
            {"forward": forward, "_infosam_checkpointed": True, "__module__": __name__},
        )
    return _CHECKPOINTED[cls]


def checkpoint_blocks(sam: Sam) -> Sam:
    """Recompute each encoder block's activations in backward instead of storing them (SAM's
    ViT blocks or SAM 2.1's Hiera blocks)."""
    for block in encoder_blocks(sam):
        if not getattr(type(block), "_infosam_checkpointed", False):
            block.__class__ = _checkpointed_class(type(block))
    return sam


def compile_blocks(sam: Sam, **kwargs: Any) -> Sam:
    """`torch.compile` each image-encoder block (weights and keys unchanged)."""
    for block in encoder_blocks(sam):
        block.compile(**kwargs)
    return sam
