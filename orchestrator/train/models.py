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
from infosam.speed import checkpoint_blocks, compile_blocks, use_attention
from infosam.tuning import apply_tuning
from orchestrator.config import Config, ConfigError


def teacher_checkpoint(cfg: Config) -> str | None:
    """The teacher's weights file (None = random init); a missing file says where to get it."""
    path = resolve_checkpoint(cfg.model.checkpoint)
    if path is not None and not os.path.isfile(path):
        raise ConfigError(
            f"model.checkpoint not found: {path}. Download the official SAM weights for "
            f"{cfg.model.variant} ({SAM_VARIANTS[cfg.model.variant].official_checkpoint}) from "
            "facebookresearch/segment-anything and set model.checkpoint to their path"
        )
    return path


def teacher_hash(cfg: Config) -> str | None:
    """sha256 of the teacher's weights (None for a random teacher): computed once per run."""
    path = teacher_checkpoint(cfg)
    return checkpoint_sha256(path) if path else None


__all__ = ["apply_speed", "autocast_dtype", "build_models", "build_teacher", "unwrap"]


def build_teacher(cfg: Config, device: torch.device | str = "cpu") -> PromptableSam:
    """The frozen teacher (also the zero-shot baseline), with the run's attention/precision."""
    teacher = PromptableSam(build_sam(cfg.model.variant, teacher_checkpoint(cfg))).to(device)
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
    sam = build_sam(cfg.model.variant, path)
    report = apply_tuning(sam, cfg.tuning)
    student = PromptableSam(sam).to(device)
    relation = (
        RelationModule(SAM_VARIANTS[cfg.model.variant].prompt_embed_dim).to(device)
        if loss.infosam
        else None
    )
    apply_speed(cfg, teacher, student)
    return teacher, student, relation, report


def apply_speed(cfg: Config, teacher: PromptableSam | None, student: PromptableSam) -> None:
    """The `speed` section's switches, in place (weights and state_dict keys unchanged)."""
    sp = cfg.speed
    use_attention(student.sam, sp.attention)
    if sp.checkpointing:
        checkpoint_blocks(student.sam)
    if sp.compile:
        compile_blocks(student.sam)
    if teacher is not None:
        use_attention(teacher.sam, sp.attention)
        if sp.compile and not sp.teacher_cache:
            compile_blocks(teacher.sam)
        if sp.teacher_bf16:
            teacher.sam.image_encoder.to(torch.bfloat16)


def autocast_dtype(cfg: Config) -> torch.dtype | None:
    return torch.bfloat16 if cfg.optim.precision == "bf16" else None


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return module.module if hasattr(module, "module") else module
