"""A training checkpoint directory: what it holds, how it is written and read back.

`state.pt` holds only the trained tensors (student's trainable part, relation module), the
optimiser/scheduler state, the epoch, the RNG state, the metric history, the config and the
teacher's sha256; `config.yaml` and `metrics.json` are the same for people, and
`history.json` (the metric history) is what the MLflow back-fill reads without loading tensors.
Loaded with `torch.load(..., weights_only=True)`.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from infosam.sam import PromptableSam, checkpoint_sha256, save_exported
from infosam.sam2 import SAM2_CONFIGS, meta_build_kwargs, save_sam2_checkpoint
from infosam.tuning import (
    apply_tuning,
    has_adapters,
    load_trainable_state_dict,
    merge_for_export,
    trainable_state_dict,
)
from orchestrator.config import Config, ConfigError
from orchestrator.storage import (
    atomic_file,
    atomic_write,
    atomic_write_json,
    is_remote,
    join,
    local_copy,
    local_target,
)
from orchestrator.train.models import build_backbone, promptable, teacher_checkpoint, unwrap

__all__ = [
    "HISTORY_FILE",
    "SCORES_FILE",
    "STATE_FILE",
    "checkpoint_scores",
    "load_state",
    "load_trained",
    "read_checkpoint_file",
    "read_history",
    "save_checkpoint",
    "write_scores",
]


STATE_FILE = "state.pt"


HISTORY_FILE = "history.json"


SCORES_FILE = "test_scores.csv"  # the final checkpoint's per-image test scores


def save_checkpoint(
    directory: str | os.PathLike,
    *,
    student,
    relation,
    opt,
    sched,
    epoch,
    history,
    cfg,
    teacher_sha,
    partial: dict[str, Any] | None = None,
) -> None:
    """Write one checkpoint into `directory` (rank 0 only).

    `epoch` is the last completed epoch (-1: none); `partial` is the progress into the next one
    (steps done, loss sums) of a checkpoint taken mid-epoch on a preemption notice. Files are
    written so that a process killed mid-write leaves no `history.json`: readers that look for
    complete checkpoints (Train local mode) skip such a directory.
    """
    state = {
        "student": trainable_state_dict(unwrap(student).sam),
        "relation": None if relation is None else unwrap(relation).state_dict(),
        "optimizer": opt.state_dict(),
        "scheduler": sched.state_dict(),
        "epoch": epoch,
        "torch_rng": torch.get_rng_state(),
        "history": json.dumps(history),
        "config": json.dumps(cfg.to_dict()),
        "teacher_sha256": teacher_sha,
        "partial": partial,
    }
    directory = Path(directory)
    (directory / HISTORY_FILE).unlink(missing_ok=True)
    with atomic_file(directory / STATE_FILE) as f:
        torch.save(state, f)
    atomic_write(directory / "config.yaml", cfg.to_yaml())
    if history:
        atomic_write_json(directory / "metrics.json", history[-1], indent=2)
    atomic_write(directory / HISTORY_FILE, json.dumps(history))  # last: marks it complete


def load_state(checkpoint_dir: str | os.PathLike, device: Any = "cpu") -> dict[str, Any]:
    """The raw `state.pt` of a checkpoint directory (a local folder or `s3://...`, copied to the
    staging folder first); a ConfigError says what to point at."""
    if is_remote(checkpoint_dir):
        with contextlib.suppress(FileNotFoundError):  # refused below with the hint
            checkpoint_dir = local_copy(join(checkpoint_dir, STATE_FILE)).parent
    path = Path(checkpoint_dir) / STATE_FILE
    if not path.is_file():
        raise ConfigError(
            f"{checkpoint_dir} is not a training checkpoint (no {STATE_FILE} in it): give a "
            "checkpoint_epoch_* directory of a run, e.g. runs/<name>/checkpoint_epoch_0009"
        )
    return torch.load(path, map_location=device, weights_only=True)


def write_scores(scores: list[dict[str, Any]], path: str | os.PathLike) -> None:
    import pandas as pd

    pd.DataFrame(scores).to_csv(path, index=False)


def read_checkpoint_file(checkpoint: Any, name: str) -> bytes | None:
    """One small file of a (possibly remote) Ray Train checkpoint, read through the checkpoint's
    own filesystem (no download of the model state); None when it has no such file."""
    try:
        with checkpoint.filesystem.open_input_stream(f"{checkpoint.path.rstrip('/')}/{name}") as f:
            return f.read()
    except FileNotFoundError:
        return None


def checkpoint_scores(checkpoint: Any) -> list[dict[str, Any]]:
    """Per-image test scores saved with a Ray Train checkpoint, else []."""
    import io

    import pandas as pd

    data = read_checkpoint_file(checkpoint, SCORES_FILE)
    if data is None:
        return []
    frame = pd.read_csv(io.BytesIO(data), dtype={"image_id": str, "prompt": str, "image": str})
    return frame.to_dict("records")


def read_history(checkpoint_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """Per-epoch metrics recorded up to this checkpoint."""
    path = Path(checkpoint_dir) / HISTORY_FILE
    if path.is_file():
        return json.loads(path.read_text())
    return json.loads(load_state(checkpoint_dir)["history"])  # checkpoints without history.json


def load_trained(
    checkpoint_dir: str | os.PathLike, device: str = "cpu"
) -> tuple[PromptableSam, Config, dict]:
    """Rebuild the fine-tuned student from a training checkpoint directory."""
    state = load_state(checkpoint_dir, device)
    cfg = Config.from_dict(json.loads(state["config"]))
    path = teacher_checkpoint(cfg)
    if (
        path is not None
        and state.get("teacher_sha256")
        and checkpoint_sha256(path) != state["teacher_sha256"]
    ):
        raise ConfigError(
            f"{path} is not the base checkpoint this run was trained from (sha256 differs); "
            "the checkpoint holds only the trained tensors, so it needs the same base weights"
        )
    sam = build_backbone(cfg, path)
    apply_tuning(sam, cfg.tuning)
    load_trainable_state_dict(sam, state["student"])
    return promptable(cfg, sam).to(device).eval(), cfg, state


def export_student(model: PromptableSam, cfg: Config, out: str | os.PathLike) -> tuple[str, str]:
    """(kind, explanation). Methods that fold into the model's own tensors give the family's
    official format (segment-anything's state_dict; Meta's SAM 2.1 `{"model": ...}`); adapters
    give a self-contained file for `infosam.sam2.load_exported` (either family)."""
    sam, variant = model.sam, cfg.model.variant
    if has_adapters(sam):
        with local_target(out) as path:
            save_exported(sam, path, variant, cfg.tuning, cfg.model.family)
        return "self-contained", (
            f"{cfg.tuning.method} adds modules the official model does not have (series "
            f"adapters), so {out} is a self-contained export: load it with "
            "`infosam.sam2.load_exported(path)`"
        )
    if cfg.model.family == "sam2":
        with local_target(out) as path:
            save_sam2_checkpoint(merge_for_export(sam), path)
        kwargs = meta_build_kwargs(variant) if variant == "tiny" else {}
        extra = "".join(f", {k}={v!r}" for k, v in kwargs.items())
        return "sam2", (
            f"{cfg.tuning.method} folds into SAM 2.1's own tensors (LoRA merged into qkv), so "
            f"{out} is in Meta's format: load it with sam2.build_sam.build_sam2("
            f"'{SAM2_CONFIGS[variant]}', '{out}'{extra}) and use SAM2ImagePredictor"
        )
    with local_target(out) as path, atomic_file(path) as f:
        torch.save(merge_for_export(sam), f)
    how = (
        f"segment_anything.sam_model_registry['{variant}'](checkpoint='{out}')"
        if variant != "tiny"
        else f"infosam.sam.build_sam('tiny', '{out}')"
    )
    return "plain-sam", (
        f"{cfg.tuning.method} folds into SAM's own tensors (LoRA merged into qkv), so {out} is a plain "
        f"segment-anything state_dict: load it with {how} and use SamPredictor"
    )


def log_student_model(uri: str, run_id: str, checkpoint: str, *, step: int = -1) -> str:
    """The checkpoint's student exported and logged as the run's MLflow model (once: a resumed
    run that logged it already gets the same `models:/<model_id>` back). The model's metrics
    are the run's at `step`; -1: the checkpoint's last epoch."""
    import tempfile

    from orchestrator.data import codec
    from orchestrator.tracking.logged_model import find_logged_model, log_sam_model

    existing = find_logged_model(uri, run_id, checkpoint)
    if existing is not None:
        return existing
    student, cfg, state = load_trained(checkpoint)
    if step < 0:
        step = int(state.get("epoch", 0))
    with tempfile.TemporaryDirectory(prefix="infosam-model-") as tmp:
        weights = Path(tmp) / "student.pth"
        kind, _ = export_student(student, cfg, weights)
        del student
        return log_sam_model(
            uri,
            run_id,
            weights,
            {
                "format": kind,
                "family": cfg.model.family,
                "variant": cfg.model.variant,
                "method": cfg.tuning.method,
            },
            step=step,
            tags={"infosam.checkpoint": checkpoint, "infosam.method": cfg.tuning.method},
            codec=codec.__file__,
        )
