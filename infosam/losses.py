"""InfoSAM's information-theoretic losses, the segmentation loss, and distillation baselines.

Mutual information is measured with the order-2 matrix-based Rényi entropy of Gram matrices built
over the samples of a mini-batch (INFOSAM.md §4). Grams and entropies are always computed in fp32,
also under autocast. A batch of one sample makes every Gram [[1]] and both InfoSAM terms exactly
zero: the functions here raise instead of silently training without InfoSAM.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = [
    "InfoSAMLoss",
    "feature_distillation_loss",
    "gram_matrix",
    "joint_renyi_entropy",
    "logit_distillation_loss",
    "relation_compression_loss",
    "relation_diagnostics",
    "relation_distillation_loss",
    "renyi_entropy",
    "structure_loss",
]


def _fp32(x: torch.Tensor) -> torch.Tensor:
    return x.float()


def _no_autocast(device: torch.device):
    return torch.autocast(device_type=device.type, enabled=False)


def _check_batch(n: int, what: str) -> None:
    if n < 2:
        raise ValueError(
            f"{what}: InfoSAM's Gram matrices need at least 2 samples per batch, got {n}. With one "
            "sample every Gram is [[1]] and the loss is exactly 0 (no InfoSAM effect). Use a batch "
            "size >= 2 (drop_last=True), or all-gather relations across workers."
        )


def gram_matrix(x: torch.Tensor) -> torch.Tensor:
    """Gram of a batch of vectors: rows flattened per sample and L2-normalised (unit diagonal)."""
    with _no_autocast(x.device):
        v = F.normalize(_fp32(x).flatten(1), dim=1)
        return v @ v.T


def renyi_entropy(gram: torch.Tensor) -> torch.Tensor:
    """Order-2 matrix Rényi entropy S(G) = -log2 ||G / tr(G)||_F^2 (no epsilon, as the reference)."""
    with _no_autocast(gram.device):
        g = _fp32(gram)
        g = g / torch.trace(g)
        return -torch.log2((g * g).sum())


def joint_renyi_entropy(*grams: torch.Tensor) -> torch.Tensor:
    """Joint entropy: Hadamard product first, then normalise by its own trace."""
    with _no_autocast(grams[0].device):
        h = _fp32(grams[0])
        for g in grams[1:]:
            h = h * _fp32(g)
        return renyi_entropy(h)


def relation_compression_loss(
    image_emb_t: torch.Tensor, mask_tok_t: torch.Tensor, rel_t: torch.Tensor
) -> torch.Tensor:
    """L_r = S(G_rt) - S(G_i ∘ G_m ∘ G_rt): compress the teacher relation to what is invariant.

    `image_emb_t` (B, N, C) tokens or (B, C, H, W); `mask_tok_t` (B, 1, C); `rel_t` (B, N).
    Teacher features are detached: gradients of L_r reach only the relation module.
    """
    _check_batch(rel_t.shape[0], "relation_compression_loss")
    g_i = gram_matrix(image_emb_t.detach())
    g_m = gram_matrix(mask_tok_t.detach())
    g_rt = gram_matrix(rel_t)
    return renyi_entropy(g_rt) - joint_renyi_entropy(g_i, g_m, g_rt)


def relation_distillation_loss(rel_t: torch.Tensor, rel_s: torch.Tensor) -> torch.Tensor:
    """L_d = -I(r_t; r_s) = -[S(G_rt) + S(G_rs) - S(G_rt ∘ G_rs)]."""
    _check_batch(rel_t.shape[0], "relation_distillation_loss")
    g_rt, g_rs = gram_matrix(rel_t), gram_matrix(rel_s)
    return -(renyi_entropy(g_rt) + renyi_entropy(g_rs) - joint_renyi_entropy(g_rt, g_rs))


@torch.no_grad()
def relation_diagnostics(rel_t: torch.Tensor, rel_s: torch.Tensor) -> dict[str, torch.Tensor]:
    """How much signal the InfoSAM terms can carry on this batch, in bits (logged, not trained).

    Over a batch of B samples every order-2 entropy lies in [0, log2 B]: `mi_bound_bits` is that
    ceiling for I(r_t; r_s) = -L_d (`mi_bits`). `relation_rank_*` = 2^S(G_r), the effective
    number of distinct relations in the batch (1: every image's relation is the same and there
    is nothing to transfer; B: all are orthogonal).
    """
    g_rt, g_rs = gram_matrix(rel_t), gram_matrix(rel_s)
    s_t, s_s = renyi_entropy(g_rt), renyi_entropy(g_rs)
    mi = s_t + s_s - joint_renyi_entropy(g_rt, g_rs)
    return {
        "mi_bits": mi,
        "mi_bound_bits": torch.log2(torch.tensor(float(rel_t.shape[0]), device=mi.device)),
        "relation_rank_t": torch.exp2(s_t),
        "relation_rank_s": torch.exp2(s_s),
    }


@dataclass
class InfoSAMLoss:
    """lambda * (weight_compression * L_r + weight_distillation * L_d).

    Reference values: lambda = 1, weight_compression = 1 (paper's alpha), weight_distillation =
    0.5 (the reference code's `ib_beta`, which multiplies L_d despite the paper's naming).
    A weight of 0 switches its term off (and skips computing it). The returned dict also
    holds `relation_diagnostics` (detached): whether the terms carry signal on this batch.
    """

    weight_compression: float = 1.0
    weight_distillation: float = 0.5
    scale: float = 1.0

    def __call__(
        self,
        image_emb_t: torch.Tensor,
        mask_tok_t: torch.Tensor,
        rel_t: torch.Tensor,
        rel_s: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        zero = rel_s.new_zeros((), dtype=torch.float32)
        l_r = (
            relation_compression_loss(image_emb_t, mask_tok_t, rel_t)
            if self.weight_compression
            else zero
        )
        l_d = relation_distillation_loss(rel_t, rel_s) if self.weight_distillation else zero
        total = self.scale * (self.weight_compression * l_r + self.weight_distillation * l_d)
        out = {"compression": l_r, "distillation": l_d, "infosam": total}
        if rel_t.shape[0] > 1:
            out.update(relation_diagnostics(rel_t, rel_s))
        return out


def structure_loss(
    logits: torch.Tensor, target: torch.Tensor, *, legacy_bce: bool = False
) -> torch.Tensor:
    """F3Net/PraNet structure loss: boundary-weighted BCE + weighted IoU.

    `legacy_bce=True` reproduces the reference: it passes `reduce='none'` to
    `binary_cross_entropy_with_logits`, a legacy flag that yields a plain mean, so its BCE term is
    effectively unweighted. `False` applies the boundary weights to the BCE as intended.
    """
    logits, target = logits.float(), target.float()
    weit = 1 + 5 * torch.abs(F.avg_pool2d(target, kernel_size=31, stride=1, padding=15) - target)
    if legacy_bce:
        wbce = F.binary_cross_entropy_with_logits(logits, target, reduction="mean")
        wbce = wbce.expand(logits.shape[0], logits.shape[1])
    else:
        wbce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        wbce = (weit * wbce).sum(dim=(2, 3)) / weit.sum(dim=(2, 3))
    pred = torch.sigmoid(logits)
    inter = (pred * target * weit).sum(dim=(2, 3))
    union = ((pred + target) * weit).sum(dim=(2, 3))
    wiou = 1 - (inter + 1) / (union - inter + 1)
    return (wbce + wiou).mean()


def logit_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Logit KD for binary masks: BCE of student against the teacher's soft mask, times T^2."""
    t = temperature
    soft = torch.sigmoid(teacher_logits.detach().float() / t)
    return F.binary_cross_entropy_with_logits(student_logits.float() / t, soft) * t * t


def feature_distillation_loss(student_emb: torch.Tensor, teacher_emb: torch.Tensor) -> torch.Tensor:
    """Feature KD: MSE between student and (frozen) teacher image embeddings."""
    return F.mse_loss(student_emb.float(), teacher_emb.detach().float())
