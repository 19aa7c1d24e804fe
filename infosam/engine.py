"""One framework-free InfoSAM training step and evaluation step.

Ray Train workers, the benchmark, the CLI and the tests all call these; nothing here knows about
Ray or MLflow. A step: teacher forward under no_grad, student forward with the SAME prompt,
relation module on both branches (one call, so DDP sees each parameter once), then
segmentation loss + InfoSAM (+ optional distillation baseline), returned as named losses.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from infosam.losses import (
    InfoSAMLoss,
    feature_distillation_loss,
    logit_distillation_loss,
    structure_loss,
)
from infosam.metrics import evaluate_prediction
from infosam.prompts import PromptBatch
from infosam.sam import PromptableSam, SamOutput
from infosam.transforms import postprocess_logits

__all__ = [
    "DISTILLATION_BASELINES",
    "SEGMENTATION_LOSSES",
    "LossConfig",
    "compute_losses",
    "eval_step",
    "predict_logits",
    "predict_scored",
    "train_step",
]

SEGMENTATION_LOSSES = ("structure", "bce")
DISTILLATION_BASELINES = ("none", "logit", "feature")
Gather = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class LossConfig:
    """Which losses a step composes: L_seg + lambda (a L_r + b L_d) + w_kd L_kd."""

    segmentation: str = "structure"
    legacy_bce: bool = False  # True reproduces the reference's effectively-unweighted BCE
    infosam: bool = True
    weight_compression: float = 1.0
    weight_distillation: float = 0.5
    infosam_scale: float = 1.0
    distillation: str = "none"  # baseline: none | logit | feature
    distillation_weight: float = 1.0
    kd_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.segmentation not in SEGMENTATION_LOSSES:
            raise ValueError(f"loss.segmentation must be one of {SEGMENTATION_LOSSES}")
        if self.distillation not in DISTILLATION_BASELINES:
            raise ValueError(f"loss.distillation must be one of {DISTILLATION_BASELINES}")

    @property
    def needs_teacher(self) -> bool:
        return self.infosam or self.distillation != "none"


def _autocast(device: torch.device, dtype: torch.dtype | None):
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _upsample(logits: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(logits.float(), (size, size), mode="bilinear", align_corners=False)


def compute_losses(
    student: nn.Module,
    images: torch.Tensor,
    masks: torch.Tensor,
    prompts: PromptBatch,
    cfg: LossConfig,
    *,
    teacher: PromptableSam | None = None,
    relation: nn.Module | None = None,
    input_sizes: torch.Tensor | None = None,
    teacher_embeddings: torch.Tensor | None = None,
    gather: Gather | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor], SamOutput]:
    """Forward teacher and student, return (total loss, named losses, student output).

    `masks` (B, S, S) in the padded model frame; the segmentation loss compares the student's
    logits upsampled to S x S. `gather`, if given, concatenates a tensor across data-parallel
    workers (differentiably) so InfoSAM's Grams are built over the global batch.
    """
    kwargs = prompts.as_kwargs()
    out_s: SamOutput = student(images, input_sizes=input_sizes, **kwargs)
    size = images.shape[-1]
    target = masks.float().unsqueeze(1)
    logits_s = _upsample(out_s.low_res_logits, size)
    if cfg.segmentation == "structure":
        seg = structure_loss(logits_s, target, legacy_bce=cfg.legacy_bce)
    else:
        seg = F.binary_cross_entropy_with_logits(logits_s, target)
    losses: dict[str, torch.Tensor] = {"segmentation": seg}
    total = seg
    if cfg.needs_teacher:
        if teacher is None:
            raise ValueError("this loss configuration needs a frozen teacher model")
        if teacher_embeddings is not None:  # stored bf16; the fp32 path needs fp32 inputs
            teacher_embeddings = teacher_embeddings.float()
        with torch.no_grad():
            out_t: SamOutput = teacher(
                images, input_sizes=input_sizes, image_embeddings=teacher_embeddings, **kwargs
            )
        if cfg.infosam:
            info = _infosam_terms(out_t, out_s, cfg, relation, gather)
            losses.update(info)
            total = total + info["infosam"]
        kd = _distillation_term(out_t, out_s, cfg)
        if kd is not None:
            losses["kd"] = kd
            total = total + cfg.distillation_weight * kd
    losses["loss"] = total
    return total, losses, out_s


def _infosam_terms(
    out_t: SamOutput,
    out_s: SamOutput,
    cfg: LossConfig,
    relation: nn.Module | None,
    gather: Gather | None,
) -> dict[str, torch.Tensor]:
    """L_r, L_d and their weighted sum from the teacher's and student's embeddings and tokens."""
    if relation is None:
        raise ValueError("InfoSAM needs a relation module")
    b = out_t.image_embeddings.shape[0]
    # One relation call over [teacher; student]: shared module, each parameter used once.
    rel = relation(
        torch.cat(
            [out_t.image_embeddings, out_s.image_embeddings.to(out_t.image_embeddings.dtype)]
        ),
        torch.cat([out_t.mask_tokens, out_s.mask_tokens.to(out_t.mask_tokens.dtype)]),
    )
    rel_t, rel_s = rel[:b], rel[b:]
    emb_t, tok_t = out_t.image_embeddings, out_t.mask_tokens
    if gather is not None:
        emb_t, tok_t, rel_t, rel_s = (gather(x) for x in (emb_t, tok_t, rel_t, rel_s))
    return InfoSAMLoss(cfg.weight_compression, cfg.weight_distillation, cfg.infosam_scale)(
        emb_t, tok_t, rel_t, rel_s
    )


def _distillation_term(out_t: SamOutput, out_s: SamOutput, cfg: LossConfig) -> torch.Tensor | None:
    """The logit or feature KD baseline's loss, or None when the config has none."""
    if cfg.distillation == "logit":
        return logit_distillation_loss(
            out_s.low_res_logits, out_t.low_res_logits, cfg.kd_temperature
        )
    if cfg.distillation == "feature":
        return feature_distillation_loss(out_s.image_embeddings, out_t.image_embeddings)
    return None


def train_step(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    batch: dict[str, torch.Tensor],
    prompts: PromptBatch,
    cfg: LossConfig,
    *,
    teacher: PromptableSam | None = None,
    relation: nn.Module | None = None,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    autocast_dtype: torch.dtype | None = None,
    grad_clip: float | None = None,
    gather: Gather | None = None,
) -> dict[str, float]:
    """Forward, backward, optimizer (and scheduler) step; returns the named losses as floats.

    `batch` holds `image` (B, 3, S, S) uint8, `mask` (B, S, S) 0/1, optional `input_size` (B, 2)
    and optional `teacher_embedding` (cached frozen-teacher image embeddings).
    """
    images = batch["image"]
    student.train()
    if relation is not None:
        relation.train()
    with _autocast(images.device, autocast_dtype):
        total, losses, _ = compute_losses(
            student,
            images,
            batch["mask"],
            prompts,
            cfg,
            teacher=teacher,
            relation=relation,
            input_sizes=batch.get("input_size"),
            teacher_embeddings=batch.get("teacher_embedding"),
            gather=gather,
        )
    optimizer.zero_grad(set_to_none=True)
    total.backward()
    if grad_clip:
        params = [p for g in optimizer.param_groups for p in g["params"]]
        torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    if scheduler is not None:
        scheduler.step()
    result = {k: float(v.detach()) for k, v in losses.items()}
    result["empty_prompts"] = float(prompts.empty.sum())
    return result


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: torch.Tensor,
    prompts: PromptBatch,
    input_sizes: torch.Tensor,
    original_sizes: torch.Tensor | Sequence[tuple[int, int]],
    *,
    autocast_dtype: torch.dtype | None = None,
) -> list[torch.Tensor]:
    """Mask logits at each image's original resolution, (H, W) float32 each."""
    return predict_scored(
        model, prompts, input_sizes, original_sizes, images=images, autocast_dtype=autocast_dtype
    )[0]


def predict_scored(
    model: nn.Module,
    prompts: PromptBatch,
    input_sizes: torch.Tensor,
    original_sizes: torch.Tensor | Sequence[tuple[int, int]],
    *,
    images: torch.Tensor | None = None,
    image_embeddings: torch.Tensor | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """(mask logits at original resolution, SAM's predicted IoU per prompt (B,)).

    Pass `image_embeddings` (one row per prompt) instead of `images` to prompt an image
    encoded once several times: serving many objects of one image costs one encoder pass."""
    was_training = model.training
    model.eval()
    device = (images if images is not None else image_embeddings).device
    try:
        with _autocast(device, autocast_dtype):
            out: SamOutput = model(
                images,
                input_sizes=input_sizes,
                image_embeddings=image_embeddings,
                **prompts.as_kwargs(),
            )
    finally:
        model.train(was_training)
    size = images.shape[-1] if images is not None else model.image_size
    own = getattr(model, "postprocess", None)  # SAM 2.1: straight to the original size
    result = []
    for i in range(out.low_res_logits.shape[0]):
        h, w = (int(v) for v in input_sizes[i])
        oh, ow = (int(v) for v in original_sizes[i])
        low = out.low_res_logits[i : i + 1]
        full = (
            own(low, (h, w), (oh, ow)) if own else postprocess_logits(low, (h, w), (oh, ow), size)
        )
        result.append(full[0, 0])
    return result, out.iou_predictions[:, 0].float()


def eval_step(
    model: nn.Module,
    images: torch.Tensor,
    gt_masks: Sequence[torch.Tensor],
    prompts: PromptBatch,
    input_sizes: torch.Tensor,
    *,
    protocol: str = "clean",
    metrics: tuple[str, ...] = ("iou", "dice"),
    autocast_dtype: torch.dtype | None = None,
) -> list[dict[str, float | str]]:
    """Per-image metrics at ORIGINAL resolution; `gt_masks` are (H, W) 0/1 at original size."""
    sizes = [tuple(m.shape[-2:]) for m in gt_masks]
    logits = predict_logits(
        model, images, prompts, input_sizes, sizes, autocast_dtype=autocast_dtype
    )
    return [
        evaluate_prediction(lg.cpu(), gt.cpu(), protocol, metrics)
        for lg, gt in zip(logits, gt_masks, strict=True)
    ]
