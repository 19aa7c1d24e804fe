"""Evaluation: mean metrics of one or more models over a split, with a run's prompts and protocol.

One code path for every number: the per-epoch validation and final test inside Ray Train
workers, `infosam evaluate`, and the benchmark's zero-shot row all go through `evaluate_split`.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import numpy as np
import torch

from infosam.engine import eval_step, predict_logits
from infosam.prompts import sample_prompts
from infosam.sam import PromptableSam
from orchestrator.config import Config
from orchestrator.train.models import autocast_dtype, build_teacher

__all__ = [
    "category_table",
    "draw_prompts",
    "evaluate_checkpoint",
    "evaluate_model",
    "evaluate_split",
    "log_category_results",
    "mean_metrics",
    "per_category",
    "zero_shot",
]


# The columns of a score row that are not metrics.
SCORE_FIELDS = ("model", "image_id", "prompt", "image", "category")


def draw_prompts(
    cfg: Config, masks: torch.Tensor, generator: torch.Generator, device: Any, *, train: bool
) -> Any:
    """Prompts for a batch of masks with the run's training or evaluation prompt settings."""
    d = cfg.data
    return sample_prompts(
        masks.cpu(),
        d.prompt if train else d.eval_prompt,
        max_shift=d.box_jitter if train else d.eval_box_jitter,
        num_positive=d.num_positive_points,
        num_negative=d.num_negative_points,
        generator=generator,
    ).to(device)


def mean_metrics(sums: dict[str, float], count: int, prefix: str = "") -> dict[str, float]:
    """Per-image sums -> means, keys prefixed (`val/`, `test/zero_shot_`)."""
    return {f"{prefix}{k}": v / max(count, 1) for k, v in sums.items()}


def evaluate_split(
    models: dict[str, torch.nn.Module],
    iterator: Any,
    cfg: Config,
    device: torch.device,
    overlays: int = 0,
    scores: list[dict[str, Any]] | None = None,
) -> tuple[dict[str, dict[str, float]], int, list[dict[str, np.ndarray]]]:
    """Per-image metric sums per model over a full split (and overlay rows if asked).

    With `scores`, one row per model and sample is appended to it (model, sample id, prompt,
    the sample's image, every metric): what a paired comparison of two methods on the same
    images needs. A sample is an image, or one instance of it (`image#instance`).
    """
    from orchestrator.data.reader import to_torch

    sums: dict[str, dict[str, float]] = {name: {} for name in models}
    count = 0
    rows: list[dict[str, np.ndarray]] = []
    gen = torch.Generator().manual_seed(cfg.seed)  # the same eval prompts every epoch
    for np_batch in iterator.iter_batches(
        batch_size=cfg.optim.eval_batch_size, batch_format="numpy"
    ):
        batch = to_torch(np_batch, device)
        prompts = draw_prompts(cfg, batch["mask"], gen, device, train=False)
        gts = [torch.from_numpy(np.array(m)) for m in batch["mask_original"]]
        for name, model in models.items():
            _score_batch(name, model, batch, gts, prompts, cfg, sums[name], scores)
        count += len(gts)
        if len(rows) < overlays:
            rows += _overlay_rows(models, batch, gts, prompts, cfg, overlays - len(rows))
    return sums, count, rows


def _score_batch(
    name: str,
    model: torch.nn.Module,
    batch: dict[str, Any],
    gts: list[torch.Tensor],
    prompts: Any,
    cfg: Config,
    sums: dict[str, float],
    scores: list[dict[str, Any]] | None,
) -> None:
    """Add one model's per-sample metrics on a batch to `sums` (and rows to `scores`)."""
    results = eval_step(
        model,
        batch["image"],
        gts,
        prompts,
        batch["input_size"],
        protocol=cfg.optim.eval_protocol,
        metrics=tuple(cfg.optim.metrics),
        autocast_dtype=autocast_dtype(cfg),
    )
    for i, r in enumerate(results):
        values = {k: float(v) for k, v in r.items() if k != "protocol"}
        for k, v in values.items():
            sums[k] = sums.get(k, 0.0) + v
        if scores is not None:
            row = {
                "model": name,
                "image_id": str(batch["id"][i]),
                "prompt": prompts.describe(i),
                "image": str(batch["image_id"][i]),
            }
            if "category" in batch:  # instance datasets
                row["category"] = str(batch["category"][i])
            scores.append(row | values)


def _overlay_rows(
    models: dict[str, torch.nn.Module],
    batch: dict[str, Any],
    gts: list[torch.Tensor],
    prompts: Any,
    cfg: Config,
    wanted: int,
) -> list[dict[str, np.ndarray]]:
    """Up to `wanted` rows of image, ground truth and each model's mask, at original size."""
    from PIL import Image

    preds = {
        name: predict_logits(
            model,
            batch["image"],
            prompts,
            batch["input_size"],
            [g.shape for g in gts],
            autocast_dtype=autocast_dtype(cfg),
        )
        for name, model in models.items()
    }
    rows = []
    for i in range(min(wanted, len(gts))):
        h, w = gts[i].shape
        ih, iw = (int(v) for v in batch["input_size"][i])
        small = batch["image"][i, :, :ih, :iw].permute(1, 2, 0).cpu().numpy()
        image = np.asarray(Image.fromarray(small).resize((w, h), Image.BILINEAR))
        row = {"image": image, "gt": gts[i].numpy()}
        for name in models:
            row[name] = (preds[name][i] > 0).cpu().numpy()
        rows.append(row)
    return rows


def per_category(scores: list[dict[str, Any]], model: str = "student") -> list[dict[str, Any]]:
    """One model's instance scores -> per category: instances, images, the mean of each metric;
    [] when the scores carry no category (binary datasets). A dataset's common classes dominate
    the mean over instances; this is where a rare class that fails shows."""
    rows = [r for r in scores if r.get("model", model) == model and "category" in r]
    if not rows:
        return []
    metrics = [k for k in rows[0] if k not in SCORE_FIELDS]
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault(str(r["category"]), []).append(r)
    out = []
    for name in sorted(groups):
        group = groups[name]
        entry: dict[str, Any] = {
            "category": name,
            "instances": len(group),
            "images": len({r["image"] for r in group}),
        }
        entry.update({m: float(np.mean([float(r[m]) for r in group])) for m in metrics})
        out.append(entry)
    return out


def _metric_names(table: list[dict[str, Any]]) -> list[str]:
    return [k for k in table[0] if k not in ("category", "instances", "images")] if table else []


def category_table(table: list[dict[str, Any]]) -> str:
    """`per_category` rows as markdown, with the mean over instances (what `test/` metrics
    report) and the mean over categories (each class counts once, as COCO averages classes)."""
    metrics = _metric_names(table)
    lines = [
        "| category | instances | images | " + " | ".join(metrics) + " |",
        "|---|---:|---:|" + "---:|" * len(metrics),
    ]
    for r in table:
        cells = " | ".join(f"{r[m]:.4f}" for m in metrics)
        lines.append(f"| {r['category']} | {r['instances']} | {r['images']} | {cells} |")
    total = sum(r["instances"] for r in table)
    by_instance = " | ".join(
        f"{sum(r[m] * r['instances'] for r in table) / total:.4f}" for m in metrics
    )
    by_category = " | ".join(f"{np.mean([r[m] for r in table]):.4f}" for m in metrics)
    lines.append(f"| **mean over instances** | {total} |  | {by_instance} |")
    lines.append(f"| **mean over categories** | {len(table)} |  | {by_category} |")
    return "\n".join(lines) + "\n"


def log_category_results(logger: Any, scores: list[dict[str, Any]], model: str = "student") -> None:
    """Per-category results of an instance dataset's test scores into a run: `test/macro_<m>`
    (mean over categories; sortable in the runs table), `scores/per_category.csv` and `.md`,
    and `plots/per_category.png`. Nothing for binary datasets."""
    table = per_category(scores, model)
    if not table:
        return
    metrics = _metric_names(table)
    logger.log_metrics(
        {f"test/macro_{m}": float(np.mean([r[m] for r in table])) for m in metrics}, step=0
    )
    logger.log_rows(table, "scores/per_category.csv")
    logger.log_text(category_table(table), "scores/per_category.md")
    from orchestrator.plots import category_figure

    fig = category_figure(table, metrics[0])
    logger.log_figure(fig, "plots/per_category.png")


def evaluate_checkpoint(
    checkpoint_dir: str | os.PathLike,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    protocol: str | None = None,
    batch_size: int = 8,
) -> dict[str, float]:
    """Metrics of a trained checkpoint on a dataset split, without Ray (same code as training)."""
    from orchestrator.train.checkpoints import load_trained

    model, cfg, _ = load_trained(checkpoint_dir)
    return evaluate_model(
        model, cfg, data_dir, split=split, protocol=protocol, batch_size=batch_size
    )


def evaluate_model(
    model: PromptableSam,
    cfg: Config,
    data_dir: str | os.PathLike,
    *,
    split: str = "test",
    protocol: str | None = None,
    batch_size: int = 8,
    scores: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """Evaluate any PromptableSam with a run's evaluation settings (prompts, protocol, metrics).

    `scores` (a list) receives one row per image, see `evaluate_split`."""
    from orchestrator.data.manifest import INSTANCE_COLUMNS, iter_rows, load_manifest
    from orchestrator.data.reader import decode_batch

    optim = dataclasses.replace(
        cfg.optim, eval_protocol=protocol or cfg.optim.eval_protocol, eval_batch_size=batch_size
    )
    cfg = dataclasses.replace(cfg, optim=optim)  # the caller's config stays as it was
    size, square = model.image_size, getattr(model, "square_inputs", False)

    class _Rows:  # the one method of a Ray DataIterator that _evaluate uses
        def iter_batches(self, batch_size: int, batch_format: str):
            chunk: list[dict] = []
            for row in iter_rows(data_dir, split):
                chunk.append(row)
                if len(chunk) == batch_size:
                    yield self._decode(chunk)
                    chunk = []
            if chunk:
                yield self._decode(chunk)

        @staticmethod
        def _decode(chunk: list[dict]) -> dict[str, np.ndarray]:
            cols = {}
            for k in ("id", "image", "mask", "source", *INSTANCE_COLUMNS):
                if k in chunk[0]:
                    cols[k] = np.empty(len(chunk), dtype=object)
                    for i, r in enumerate(chunk):  # one object per row, lists included
                        cols[k][i] = r[k]
            return decode_batch(
                cols, size, cfg.data.channel_order, keep_original_mask=True, square=square
            )

    device = next(model.parameters()).device
    rows: list[dict[str, Any]] = [] if scores is None else scores
    sums, count, _ = evaluate_split({"student": model}, _Rows(), cfg, device, scores=rows)
    out: dict[str, Any] = mean_metrics(sums["student"], count)
    out["count"] = count
    out["unit"] = "instance" if load_manifest(data_dir).get("kind") == "instances" else "image"
    out["protocol"] = cfg.optim.eval_protocol
    table = per_category(rows)
    if table:  # instance datasets: the same numbers per category
        out["per_category"] = {r.pop("category"): r for r in table}
    return out


def zero_shot(
    cfg: Config,
    data_dir: str | os.PathLike,
    split: str | None = None,
    scores: list[dict[str, Any]] | None = None,
) -> dict[str, float]:
    """The frozen teacher's `test/` metrics: the benchmark's zero-shot row."""
    device = "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"
    out = evaluate_model(
        build_teacher(cfg, device),
        cfg,
        data_dir,
        split=split or cfg.data.test_split,
        batch_size=cfg.optim.eval_batch_size,
        scores=scores,
    )
    return {f"test/{k}": v for k, v in out.items() if isinstance(v, float)}
