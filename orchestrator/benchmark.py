"""The paper's comparison: methods x datasets x seeds, each cell a Ray Train run + MLflow child run.

A benchmark YAML is a training config (the base every cell starts from) plus a `benchmark:`
section. Cells run in order; finished cells are recorded in `<storage>/<name>/cells.json`, so
re-running the same benchmark name skips them (an interrupted cell resumes from its Ray Train
checkpoint, since its run name is deterministic); a new name starts fresh.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from infosam.sam import PromptableSam, build_sam, checkpoint_sha256
from orchestrator.config import Config, ConfigError, apply_overrides, load_config
from orchestrator.datasets import load_manifest
from orchestrator.tracking import RunLogger, resolve_tracking_uri, start_run
from orchestrator.tracking import artifact_root as tracking_artifact_root

__all__ = ["METHODS", "BenchmarkConfig", "load_benchmark", "results_table", "run_benchmark"]

# Each method is a set of overrides of the base config; `zero_shot` evaluates the teacher.
METHODS: dict[str, dict[str, Any] | None] = {
    "zero_shot": None,
    "decoder": {"tuning.method": "decoder", "loss.infosam": False},
    "bitfit": {"tuning.method": "bitfit", "loss.infosam": False},
    "lora": {"tuning.method": "lora", "loss.infosam": False},
    "adapter": {"tuning.method": "adapter", "loss.infosam": False},
    "lora_infosam": {"tuning.method": "lora", "loss.infosam": True},
    "adapter_infosam": {"tuning.method": "adapter", "loss.infosam": True},
    "adapter_logit_kd": {
        "tuning.method": "adapter",
        "loss.infosam": False,
        "loss.distillation": "logit",
    },
    "adapter_feature_kd": {
        "tuning.method": "adapter",
        "loss.infosam": False,
        "loss.distillation": "feature",
    },
    "adapter_ld_only": {
        "tuning.method": "adapter",
        "loss.infosam": True,
        "loss.weight_compression": 0.0,
    },
}
LABELS = {
    "zero_shot": "SAM zero-shot (teacher)",
    "decoder": "decoder-only",
    "bitfit": "BitFit",
    "lora": "LoRA",
    "adapter": "Adapter",
    "lora_infosam": "LoRA + InfoSAM",
    "adapter_infosam": "Adapter + InfoSAM",
    "adapter_logit_kd": "Adapter + logit KD",
    "adapter_feature_kd": "Adapter + feature KD",
    "adapter_ld_only": "Adapter + L_d only",
}


@dataclass
class BenchmarkConfig:
    name: str = "demo"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    datasets: list[str] = field(default_factory=lambda: ["camouflage", "roads", "lesions"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # Metrics per dataset (the paper's per benchmark); datasets not listed use `default_metrics`.
    metrics: dict[str, list[str]] = field(default_factory=dict)
    default_metrics: list[str] = field(default_factory=lambda: ["iou", "dice"])
    # Per-dataset overrides of the base config, e.g. {polyp: {data.test_split: test_Kvasir}}.
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: str | None = None  # default: <storage.path>/<name>


def load_benchmark(
    path: str | os.PathLike | None, overrides: list[str] | None = None
) -> tuple[BenchmarkConfig, Config]:
    data: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"benchmark config not found: {path}")
        data = yaml.safe_load(Path(path).read_text()) or {}
    data = apply_overrides(data, overrides or [])
    bench_data = data.pop("benchmark", {}) or {}
    known = {f.name for f in dataclasses.fields(BenchmarkConfig)}
    unknown = set(bench_data) - known
    if unknown:
        raise ConfigError(f"unknown benchmark key(s) {sorted(unknown)}; known: {sorted(known)}")
    bench = BenchmarkConfig(**bench_data)
    bad = [m for m in bench.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown benchmark method(s) {bad}; choose from {list(METHODS)}")
    base = load_config(None, [])
    base = Config.from_dict(data).validate() if data else base
    return bench, base


def _cell_config(
    base: Config, method: str, dataset: str, seed: int, extra: dict[str, Any] | None = None
) -> Config:
    data = base.to_dict()
    overrides = [f"data.dataset={dataset}", f"seed={seed}"]
    overrides += [f"{k}={json.dumps(v)}" for k, v in (extra or {}).items()]
    for k, v in (METHODS[method] or {}).items():
        overrides.append(f"{k}={json.dumps(v)}")
    return Config.from_dict(apply_overrides(data, overrides)).validate()


def _metrics_for(bench: BenchmarkConfig, dataset: str) -> list[str]:
    return bench.metrics.get(dataset, bench.default_metrics)


def _zero_shot(cfg: Config, data_dir: Any) -> dict[str, float]:
    from orchestrator.trainer import evaluate_model, teacher_checkpoint

    teacher = PromptableSam(build_sam(cfg.model.variant, teacher_checkpoint(cfg))).eval()
    out = evaluate_model(teacher, cfg, data_dir, split=cfg.data.test_split)
    return {f"test/{k}": v for k, v in out.items() if isinstance(v, float)}


def run_benchmark(bench: BenchmarkConfig, base: Config, *, quiet: bool = True) -> dict[str, Any]:
    """Run (or resume) every cell; returns the table, files written and the parent run id."""
    from orchestrator.trainer import ensure_data, fit, init_ray, teacher_checkpoint

    out_dir = Path(bench.output or Path(base.storage.path) / bench.name).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    state_file = out_dir / "cells.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"cells": {}}
    uri = resolve_tracking_uri(base.tracking.uri, base.storage.path)
    teacher_path = teacher_checkpoint(base)
    provenance = {
        "benchmark": bench.name,
        "model": base.model.variant,
        "checkpoint": base.model.checkpoint,
        "checkpoint_sha256": checkpoint_sha256(teacher_path) if teacher_path else "random-init",
        "protocol": base.optim.eval_protocol,
        "epochs": base.optim.epochs,
        "batch_size": base.optim.batch_size,
        "lr": base.optim.lr,
        "checkpoint_selection": "last epoch (no test-set selection)",
    }
    data_dirs = {}
    for dataset in bench.datasets:
        probe = _cell_config(base, "adapter", dataset, bench.seeds[0], bench.overrides.get(dataset))
        data_dirs[dataset] = ensure_data(probe)
        m = load_manifest(data_dirs[dataset])
        digest = hashlib.sha256(json.dumps(m["shards"], sort_keys=True).encode()).hexdigest()[:16]
        provenance[f"data.{dataset}"] = f"{m['counts']} manifest {digest}"
    if state.get("parent_run_id"):
        parent = RunLogger(uri, state["parent_run_id"])
        parent.client.update_run(parent.run_id, status="RUNNING")
    else:
        artifact_root = tracking_artifact_root(base.storage.path, base.tracking.experiment)
        parent = start_run(
            uri,
            base.tracking.experiment,
            f"benchmark:{bench.name}",
            artifact_root=artifact_root,
            tags={"infosam.benchmark": bench.name},
        )
        parent.log_params(
            {
                **provenance,
                "methods": ",".join(bench.methods),
                "datasets": ",".join(bench.datasets),
                "seeds": ",".join(map(str, bench.seeds)),
            }
        )
        state["parent_run_id"] = parent.run_id
        state_file.write_text(json.dumps(state, indent=2))
    init_ray()
    cells = [(m, d, s) for d in bench.datasets for m in bench.methods for s in bench.seeds]
    started = time.perf_counter()
    try:
        for i, (method, dataset, seed) in enumerate(cells, 1):
            key = f"{method}/{dataset}/seed{seed}"
            if key in state["cells"]:
                print(f"[benchmark] {i}/{len(cells)} {key}: done earlier, skipped", flush=True)
                continue
            t0 = time.perf_counter()
            cfg = _cell_config(
                base,
                method if METHODS[method] else "adapter",
                dataset,
                seed,
                bench.overrides.get(dataset),
            )
            cfg.optim.metrics = _metrics_for(bench, dataset)
            cfg.tracking.parent_run_id = parent.run_id
            cfg.tracking.run_name = key
            cfg.storage.name = f"{bench.name}/{method}-{dataset}-seed{seed}"
            if METHODS[method] is None:
                child = start_run(
                    uri,
                    cfg.tracking.experiment,
                    key,
                    tags={"infosam.benchmark": bench.name, "infosam.method": method},
                    parent_run_id=parent.run_id,
                )
                metrics = _zero_shot(cfg, data_dirs[dataset])
                child.log_params(
                    {
                        "method": method,
                        "data.dataset": dataset,
                        "seed": seed,
                        "optim.eval_protocol": cfg.optim.eval_protocol,
                    }
                )
                child.log_metrics(metrics, step=0)
                child.finish()
                run_id = child.run_id
            else:
                result = fit(cfg, quiet=quiet)
                metrics = {
                    k: v
                    for k, v in result.metrics.items()
                    if k.startswith("test/") and "zero_shot" not in k
                }
                run_id = result.run_id
                if run_id:
                    RunLogger(uri, run_id).set_tags(
                        {"infosam.benchmark": bench.name, "infosam.method": method}
                    )
            state["cells"][key] = {
                "method": method,
                "dataset": dataset,
                "seed": seed,
                "run_id": run_id,
                "metrics": metrics,
                "seconds": round(time.perf_counter() - t0, 1),
            }
            state_file.write_text(json.dumps(state, indent=2))
            shown = ", ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in metrics.items())
            print(
                f"[benchmark] {i}/{len(cells)} {key}: {shown} ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    except BaseException:
        parent.finish("FAILED")
        raise
    table, raw = results_table(state, bench)
    files = _write_outputs(out_dir, table, raw, provenance, bench)
    for path in files.values():
        parent.log_artifact(path, "results")
    parent.log_metrics(
        {"cells": len(state["cells"]), "wall_time_s": time.perf_counter() - started}, step=0
    )
    parent.finish("FINISHED")
    return {
        "table": table,
        "raw": raw,
        "files": files,
        "parent_run_id": parent.run_id,
        "tracking_uri": uri,
        "provenance": provenance,
    }


def results_table(state: dict[str, Any], bench: BenchmarkConfig):
    """(markdown-ready table of mean ± std over seeds, raw per-cell DataFrame)."""
    import pandas as pd

    rows = []
    for cell in state["cells"].values():
        for k, v in cell["metrics"].items():
            rows.append(
                {
                    "method": cell["method"],
                    "dataset": cell["dataset"],
                    "seed": cell["seed"],
                    "metric": k.split("/", 1)[1],
                    "value": v,
                }
            )
    raw = pd.DataFrame(rows)
    if raw.empty:
        return raw, raw
    raw = raw[raw.apply(lambda r: r["metric"] in _metrics_for(bench, r["dataset"]), axis=1)]
    agg = (
        raw.groupby(["method", "dataset", "metric"])["value"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    agg["cell"] = agg.apply(
        lambda r: f"{100 * r['mean']:.1f} ± {0 if pd.isna(r['std']) else 100 * r['std']:.1f}",
        axis=1,
    )
    table = agg.pivot_table(
        index="method", columns=["dataset", "metric"], values="cell", aggfunc="first"
    )
    order = [m for m in bench.methods if m in table.index]
    cols = [
        (d, m) for d in bench.datasets for m in _metrics_for(bench, d) if (d, m) in table.columns
    ]
    table = table.loc[order, cols]
    table.index = [LABELS.get(m, m) for m in table.index]
    table.columns = [f"{d} {m}" for d, m in table.columns]
    return table, raw


def _write_outputs(
    out_dir: Path, table, raw, provenance: dict[str, Any], bench: BenchmarkConfig
) -> dict[str, str]:
    header = "\n".join(f"- {k}: {v}" for k, v in provenance.items())
    seeds = len(bench.seeds)
    md = (
        f"# Benchmark `{bench.name}`\n\n{header}\n\nValues: mean ± std over {seeds} seed(s), in %, "
        f"on each dataset's test split.\n\n{table.to_markdown()}\n"
    )
    files = {
        "markdown": str(out_dir / "results.md"),
        "csv": str(out_dir / "results.csv"),
        "chart": str(out_dir / "results.png"),
    }
    Path(files["markdown"]).write_text(md)
    raw.to_csv(files["csv"], index=False)
    _bar_chart(raw, bench, files["chart"])
    print(md, flush=True)
    return files


def _bar_chart(raw, bench: BenchmarkConfig, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in bench.datasets if d in set(raw["dataset"])]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        metric = _metrics_for(bench, dataset)[0]
        sub = raw[(raw["dataset"] == dataset) & (raw["metric"] == metric)]
        stats = (
            sub.groupby("method")["value"]
            .agg(["mean", "std"])
            .reindex([m for m in bench.methods if m in set(sub["method"])])
        )
        ax.bar(
            range(len(stats)),
            stats["mean"] * 100,
            yerr=stats["std"].fillna(0) * 100,
            capsize=3,
            color=[
                "#999999"
                if m == "zero_shot"
                else "#d62728"
                if "infosam" in m or m.endswith("ld_only")
                else "#1f77b4"
                for m in stats.index
            ],
        )
        ax.set_xticks(range(len(stats)))
        ax.set_xticklabels(
            [LABELS.get(m, m) for m in stats.index], rotation=60, ha="right", fontsize=8
        )
        ax.set_title(f"{dataset}: {metric} (%)")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
