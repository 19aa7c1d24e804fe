"""The models a run trains: frozen teacher, tuned student, relation module, speed switches.

One entry point (`build_models`) applies tuning before the speed switches, in that order, for
training, the step benchmark and evaluation alike: the adapter tuning swaps block classes, so a
switch applied before it would be silently dropped.
"""

from __future__ import annotations

import os
from typing import Any

import torch

from infosam.relation import RelationModule
from infosam.sam import (
    SAM_VARIANTS,
    PromptableSam,
    build_sam,
    checkpoint_sha256,
    resolve_checkpoint,
)
from infosam.sam2 import SAM2_OFFICIAL_FILES, PromptableSam2, build_sam2_model
from infosam.speed import checkpoint_blocks, compile_blocks, use_attention
from infosam.tuning import apply_tuning
from orchestrator.config import Config, ConfigError


def teacher_checkpoint(cfg: Config) -> str | None:
    """The teacher's weights file (None = random init); a missing file says where to get it."""
    path = resolve_checkpoint(cfg.model.checkpoint)
    if path is not None and not os.path.isfile(path):
        variant = cfg.model.variant
        if cfg.model.family == "sam2":
            where = f"SAM 2.1 weights for {variant} ({SAM2_OFFICIAL_FILES.get(variant, '-')}) from facebookresearch/sam2"
        else:
            where = f"SAM weights for {variant} ({SAM_VARIANTS[variant].official_checkpoint}) from facebookresearch/segment-anything"
        raise ConfigError(
            f"model.checkpoint not found: {path}. Download the official {where} and set "
            "model.checkpoint to their path"
        )
    return path


def build_backbone(cfg: Config, path: str | None) -> torch.nn.Module:
    """The model.family's network (SAM's `Sam`, SAM 2.1's `SAM2Base`) from a weights file."""
    if cfg.model.family == "sam2":
        return build_sam2_model(cfg.model.variant, path)
    return build_sam(cfg.model.variant, path)


def promptable(cfg: Config, sam: torch.nn.Module) -> PromptableSam | PromptableSam2:
    """The family's wrapper with the contract the losses, evaluation and prediction use."""
    return PromptableSam2(sam) if cfg.model.family == "sam2" else PromptableSam(sam)


def teacher_hash(cfg: Config) -> str | None:
    """sha256 of the teacher's weights (None for a random teacher): computed once per run."""
    path = teacher_checkpoint(cfg)
    return checkpoint_sha256(path) if path else None


__all__ = [
    "apply_speed",
    "autocast_dtype",
    "build_backbone",
    "build_models",
    "build_teacher",
    "promptable",
    "unwrap",
]


def build_teacher(cfg: Config, device: torch.device | str = "cpu") -> PromptableSam:
    """The frozen teacher (also the zero-shot baseline), with the run's attention/precision."""
    teacher = promptable(cfg, build_backbone(cfg, teacher_checkpoint(cfg))).to(device)
    teacher.eval().requires_grad_(False)
    return teacher


def build_models(
    cfg: Config, device: torch.device | str = "cpu"
) -> tuple[PromptableSam | None, PromptableSam, RelationModule | None, Any]:
    """(frozen teacher or None, student, relation module or None, tuning report)."""
    path = teacher_checkpoint(cfg)
    loss = cfg.loss
    teacher = build_teacher(cfg, device) if loss.needs_teacher else None
    torch.manual_seed(cfg.seed)  # identical student init (adapters, LoRA) on every worker and run
    sam = build_backbone(cfg, path)
    report = apply_tuning(sam, cfg.tuning)
    student = promptable(cfg, sam).to(device)
    relation = RelationModule(cfg.model.embedding_dim).to(device) if loss.infosam else None
    apply_speed(cfg, teacher, student)
    return teacher, student, relation, report


def apply_speed(cfg: Config, teacher: PromptableSam | None, student: PromptableSam) -> None:
    """The `speed` section's switches, in place (weights and state_dict keys unchanged)."""
    sp = cfg.speed
    if cfg.model.family == "sam":  # (Hiera attention is SDPA already: config refuses others)
        use_attention(student.sam, sp.attention)
    if sp.checkpointing:
        checkpoint_blocks(student.sam)
    if sp.compile:
        compile_blocks(student.sam)
    if teacher is not None:
        if cfg.model.family == "sam":
            use_attention(teacher.sam, sp.attention)
        if sp.compile and not sp.teacher_cache:
            compile_blocks(teacher.sam)
        if sp.teacher_bf16:
            teacher.sam.image_encoder.to(torch.bfloat16)


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    return torch.bfloat16 if cfg.optim.precision == "bf16" else None


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module
