"""The paper's comparison: methods x datasets x seeds, each cell a Ray Train run + MLflow child run.

A benchmark YAML is a training config (the base every cell starts from) plus a `benchmark:`
section. Cells run concurrently as Ray tasks (`orchestrator.cells`): as many at once as the
cluster's resources allow (or `benchmark.max_concurrent_cells`). What cells of one dataset share
(the dataset folder, its decoded small splits, the teacher cache, the teacher hash) is prepared
once here, in the driver. Finished cells are recorded in `<storage>/<name>/cells.json`, so
re-running the same benchmark name runs only unfinished or failed cells (an interrupted cell
resumes from its Ray Train checkpoint, since its run name is deterministic); a new name starts
fresh.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.cells import (
    CELL_TAG,
    Cell,
    CellJob,
    CellOutcome,
    cell_cpus,
    run_cells,
    timeline_stats,
    write_timeline,
)
from orchestrator.config import (
    Config,
    ConfigError,
    apply_overrides,
    config_changes,
    load_config,
    result_view,
    resume_refusal,
)
from orchestrator.errors import reported
from orchestrator.runtime import init_ray, on_one_machine, teacher_hash
from orchestrator.stats import compare
from orchestrator.storage import (
    atomic_write,
    atomic_write_json,
    exclusive,
    safe_component,
)
from orchestrator.tracking import artifact_root as tracking_artifact_root
from orchestrator.tracking import (
    check_tracking_server,
    close_child_runs,
    closing_on_exit,
    open_run,
    resolve_tracking_uri,
    view_hint,
)

DEMO = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "demo.yaml"

__all__ = [
    "DEFAULT_PAIRS",
    "METHODS",
    "BenchmarkConfig",
    "cell_config",
    "load_benchmark",
    "main",
    "results_table",
    "run_benchmark",
]

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


# What each method is compared with: the paper's ablations, then everything vs the teacher.
DEFAULT_PAIRS: list[tuple[str, str]] = [
    ("lora_infosam", "lora"),
    ("adapter_infosam", "adapter"),
    ("adapter_ld_only", "adapter"),
    ("adapter_logit_kd", "adapter"),
    ("adapter_feature_kd", "adapter"),
    *[(m, "zero_shot") for m in METHODS if m != "zero_shot"],
]


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
    # Cells running at once. null: no cap when connected to a cluster (its resources, and the
    # autoscaler's, decide); on a Ray this process started, as many as its CPUs hold.
    max_concurrent_cells: int | None = None
    # Retries of a cell that raised or whose node/worker died, before it is recorded FAILED.
    cell_retries: int = 1
    # Paired comparisons [method, base] on the same test images and seeds; null: DEFAULT_PAIRS
    # (InfoSAM variants vs their PEFT base, the KD baselines vs adapter, all vs zero_shot).
    pairs: list[list[str]] | None = None
    # The two-level (seeds, images) bootstrap of each mean difference (orchestrator.stats).
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0
    confidence: float = 0.95

    def comparison_pairs(self) -> list[tuple[str, str]]:
        """The declared pairs (or the defaults) whose two methods are both in this benchmark."""
        pairs = DEFAULT_PAIRS if self.pairs is None else [tuple(p) for p in self.pairs]
        return [(a, b) for a, b in pairs if a in self.methods and b in self.methods]


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
    for pair in bench.pairs or []:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise ConfigError(f"benchmark.pairs: {pair!r} is not a [method, base] pair")
        unknown_pair = [m for m in pair if m not in METHODS]
        if unknown_pair:
            raise ConfigError(
                f"benchmark.pairs: unknown method(s) {unknown_pair} in {pair}; "
                f"choose from {list(METHODS)}"
            )
    if bench.bootstrap_resamples < 100 or not 0.5 < bench.confidence < 1:
        raise ConfigError(
            "benchmark.bootstrap_resamples must be >= 100 and benchmark.confidence in (0.5, 1)"
        )
    if bench.max_concurrent_cells is not None and bench.max_concurrent_cells < 1:
        raise ConfigError("benchmark.max_concurrent_cells must be >= 1 (or null: no cap)")
    base = load_config(None, [])
    base = Config.from_dict(data).validate() if data else base
    return bench, base


def cell_config(
    base: Config,
    method: str,
    dataset: str,
    seed: int,
    extra: dict[str, Any] | None = None,
    metrics: list[str] | None = None,
) -> Config:
    """The typed config of one cell: base + dataset overrides + the method's overrides."""
    values: dict[str, Any] = {"data.dataset": dataset, "seed": seed, **(extra or {})}
    values.update(METHODS[method] or METHODS["adapter"])  # zero_shot: adapter row's settings
    if metrics is not None:
        values["optim.metrics"] = list(metrics)
    return base.with_values(values)


def _shared_key(cell: Cell, cfg: Config) -> tuple[str, bool]:
    """Cells of one dataset share prepared data; those streaming the teacher cache their own."""
    cached = cfg.speed.teacher_cache and cfg.loss.needs_teacher and METHODS[cell.method]
    return cell.dataset, bool(cached)


def _metrics_for(bench: BenchmarkConfig, dataset: str) -> list[str]:
    return bench.metrics.get(dataset, bench.default_metrics)


def _default_cap(bench: BenchmarkConfig, cfgs: list[Config], laptop: bool) -> int | None:
    """`max_concurrent_cells`, else no cap on a cluster, else what this machine's CPUs hold."""
    import ray

    if bench.max_concurrent_cells is not None:
        return bench.max_concurrent_cells
    if not laptop:
        return None
    cpus = ray.cluster_resources().get("CPU", 1.0)
    need = max((cell_cpus(c) for c in cfgs), default=1.0)
    return max(1, int(cpus // max(need, 1e-6)))


def _cell_view(cell: Cell, cfg: Config) -> dict[str, Any]:
    """The values a cell's result depends on (a zero-shot row: no training values)."""
    return result_view(cfg, zero_shot=METHODS[cell.method] is None)


def _check_finished_cells(
    bench: BenchmarkConfig,
    cells: list[Cell],
    configs: dict[str, Config],
    state: dict[str, Any],
    allow: bool,
) -> None:
    """Before Ray starts: a re-run skips a FINISHED cell only if it ran with this config."""
    changed = []
    for cell in cells:
        done = state["cells"].get(cell.key) or {}
        if done.get("status", "FINISHED") == "FINISHED":
            changes = config_changes(done.get("config"), _cell_view(cell, configs[cell.key]))
            if changes:
                changed.append((cell.key, changes))
    if changed and not allow:
        keys = ", ".join(k for k, _ in changed)
        raise resume_refusal(f"benchmark {bench.name!r} (finished cells {keys})", changed[0][1])


def run_benchmark(
    bench: BenchmarkConfig,
    base: Config,
    *,
    quiet: bool = True,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Run (or resume) every cell; returns the table, files written and the parent run id.

    One driver per benchmark folder at a time (a lock: a second gets `LockedError` naming the
    first). A re-run skips FINISHED cells only when their recorded configuration is this one
    (`config.config_changes`; `allow_config_change` keeps them whatever changed)."""
    try:
        safe_component(bench.name, "benchmark.name")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    out_dir = Path(bench.output or Path(base.storage.path) / bench.name).expanduser().resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    with exclusive(out_dir / ".lock", f"benchmark {bench.name!r} ({out_dir})"):
        return _run_benchmark(bench, base, out_dir, quiet, allow_config_change)


def _run_benchmark(
    bench: BenchmarkConfig, base: Config, out_dir: Path, quiet: bool, allow_config_change: bool
) -> dict[str, Any]:
    from orchestrator.trainer import prepare_data

    started = time.perf_counter()
    state_file = out_dir / "cells.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"cells": {}}
    uri = resolve_tracking_uri(base.tracking.uri, base.storage.path)
    check_tracking_server(uri)  # in seconds, before Ray and the data
    teacher_sha = teacher_hash(base)
    provenance = {
        "benchmark": bench.name,
        "model": base.model.variant,
        "checkpoint": base.model.checkpoint,
        "checkpoint_sha256": teacher_sha or "random-init",
        "protocol": base.optim.eval_protocol,
        "epochs": base.optim.epochs,
        "batch_size": base.optim.batch_size,
        "lr": base.optim.lr,
        "checkpoint_selection": "last epoch (no test-set selection)",
    }
    # Typed configs for every cell, checked before anything runs.
    cells = [Cell(m, d, s) for d in bench.datasets for m in bench.methods for s in bench.seeds]
    no_teacher_eval = {"optim.zero_shot_eval": False} if "zero_shot" in bench.methods else {}
    configs = {
        c.key: cell_config(
            base,
            c.method,
            c.dataset,
            c.seed,
            {**no_teacher_eval, **bench.overrides.get(c.dataset, {})},
            _metrics_for(bench, c.dataset),
        )
        for c in cells
    }
    _check_finished_cells(bench, cells, configs, state, allow_config_change)
    init_ray(log_to_driver=not quiet)
    laptop = on_one_machine()
    shared: dict[tuple[str, bool], Any] = {}
    t_prep = time.perf_counter()
    for cell in cells:  # the work cells of one dataset share, done once per dataset
        cfg = configs[cell.key]
        key = _shared_key(cell, cfg)
        if key in shared:
            continue
        shared[key] = prepare_data(cfg, teacher_sha256=teacher_sha, quiet=quiet)
        m = shared[key].manifest
        digest = hashlib.sha256(json.dumps(m["shards"], sort_keys=True).encode()).hexdigest()[:16]
        provenance[f"data.{cell.dataset}"] = f"{m['counts']} manifest {digest}"
    prep_s = time.perf_counter() - t_prep
    artifact_root = tracking_artifact_root(base.storage.path, base.tracking.experiment)
    parent, resumed = open_run(
        uri,
        base.tracking.experiment,
        f"benchmark:{bench.name}",
        resume_run_id=state.get("parent_run_id"),
        artifact_root=artifact_root,
        tags={"infosam.benchmark": bench.name},
    )
    if not resumed:
        parent.log_params(
            {
                **provenance,
                "methods": ",".join(bench.methods),
                "datasets": ",".join(bench.datasets),
                "seeds": ",".join(map(str, bench.seeds)),
            }
        )
        state["parent_run_id"] = parent.run_id
        atomic_write_json(state_file, state, indent=2)
    todo: list[CellJob] = []
    for i, cell in enumerate(cells, 1):
        done = state["cells"].get(cell.key)
        cfg = configs[cell.key]
        if done and done.get("status", "FINISHED") == "FINISHED":
            print(f"[benchmark] {i}/{len(cells)} {cell.key}: done earlier, skipped", flush=True)
            continue
        todo.append(
            CellJob(
                cell=cell,
                cfg=cfg,
                zero_shot=METHODS[cell.method] is None,
                storage_name=f"{bench.name}/{cell.method}-{cell.dataset}-seed{cell.seed}",
                parent_run_id=parent.run_id,
                tracking_uri=uri,
                tags={
                    "infosam.benchmark": bench.name,
                    "infosam.method": cell.method,
                    CELL_TAG: cell.key,
                },
                shared=shared[_shared_key(cell, cfg)],
                artifact_root=artifact_root,
            )
        )
    cap = _default_cap(bench, [j.cfg for j in todo], laptop)
    print(
        f"[benchmark] {bench.name}: {len(todo)} of {len(cells)} cells to run, at most "
        f"{cap or 'as many as the cluster holds'} at once; shared data prepared in {prep_s:.1f}s",
        flush=True,
    )
    timeline: list[dict[str, Any]] = []

    def record(out: CellOutcome) -> None:
        cell = out.cell
        entry: dict[str, Any] = {
            "method": cell.method,
            "dataset": cell.dataset,
            "seed": cell.seed,
            "config": _cell_view(cell, configs[cell.key]),  # what a re-run must match to skip it
        }
        attempts = max(len(out.starts), 1)
        if out.ok:
            r = out.result
            entry.update(
                status="FINISHED",
                run_id=r["run_id"],
                metrics=r["metrics"],
                seconds=round(r["end"] - r["start"], 1),
                node=r["node_ip"],
                timings={k: round(v, 2) for k, v in (r.get("timings") or {}).items()},
                trainable_params=r.get("trainable_params", 0),
                scores=_write_cell_scores(out_dir, cell, r.get("scores") or []),
            )
            shown = ", ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in r["metrics"].items())
            msg = f"{cell.key}: {shown} ({r['end'] - r['start']:.0f}s on {r['node_ip']})"
            start, end, node = r["start"], r["end"], f"{r['node_ip']}:{r['node_id'][:6]}"
        else:
            close_child_runs(
                uri, parent.run_id, "FAILED", tags={CELL_TAG: cell.key}, error=out.error
            )
            entry.update(status="FAILED", error=out.error, metrics={})
            msg = f"{cell.key}: FAILED after {attempts} attempt(s): {out.error}"
            start = out.starts[-1][1] if out.starts else out.failed_at
            end, node = out.failed_at, (out.starts[-1][0][:6] if out.starts else "?")
        state["cells"][cell.key] = entry
        atomic_write_json(state_file, state, indent=2)
        n_done = sum(1 for e in state["cells"].values() if e.get("status") == "FINISHED")
        print(f"[benchmark] {n_done}/{len(cells)} {msg}", flush=True)
        timeline.append(
            {
                "cell": cell.key,
                "method": cell.method,
                "dataset": cell.dataset,
                "seed": cell.seed,
                "status": entry["status"],
                "node": node,
                "start": start,
                "end": end,
                "attempts": attempts,
                "resources": json.dumps(out.result.get("resources", {})),
                **{f"time_{k}": v for k, v in (out.result.get("timings") or {}).items()},
            }
        )

    with closing_on_exit(
        parent, label=f"[benchmark] {bench.name}", hint="re-run the same name to resume"
    ):
        run_cells(
            todo,
            max_concurrent=cap,
            retries=bench.cell_retries,
            on_outcome=record,
            already_done=len(cells) - len(todo),
            total=len(cells),
        )
        table, raw = results_table(state, bench)
        files = _write_outputs(out_dir, table, raw, provenance, bench, state)
        if timeline:
            files.update(write_timeline(timeline, out_dir))
        for kind, path in files.items():
            parent.log_artifact(path, "timeline" if kind.startswith("timeline") else "results")
        failed = [k for k, e in state["cells"].items() if e.get("status") == "FAILED"]
        stats = timeline_stats(timeline)
        parent.log_metrics(
            {
                "cells": sum(1 for e in state["cells"].values() if e.get("status") != "FAILED"),
                "cells_failed": len(failed),
                "wall_time_s": time.perf_counter() - started,
                "shared_data_s": prep_s,
                **{k: v for k, v in stats.items() if not math.isnan(v)},
            },
            step=0,
        )
        if stats:
            print(
                f"[benchmark] {len(timeline)} cells in {stats['makespan_s']:.0f}s: peak concurrency "
                f"{stats['peak_concurrency']:.0f}, mean {stats['mean_concurrency']:.2f}, "
                f"slots idle {100 * stats['slot_idle_fraction']:.0f}%",
                flush=True,
            )
        if failed:
            parent.set_tags({"infosam.failed_cells": ",".join(failed)})
        parent.finish("FINISHED")
    return {
        "table": table,
        "raw": raw,
        "files": files,
        "parent_run_id": parent.run_id,
        "tracking_uri": uri,
        "provenance": provenance,
        "failed": failed,
        "timeline": timeline,
        "stats": stats,
    }


def main(argv: list[str] | None = None, *, default_config: str | os.PathLike | None = None) -> int:
    """`experiments/benchmark_all.py` and `infosam benchmark`: exit 0, 1 (cells failed), 2 (bad
    config or missing data/weights), 130 (stopped by Ctrl-C or SIGTERM)."""
    p = argparse.ArgumentParser(
        description="Run (or resume) a methods x datasets x seeds benchmark"
    )
    p.add_argument("--config", default=str(default_config or DEMO))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument(
        "--allow-config-change",
        action="store_true",
        help="re-run with a changed configuration: keep the cells finished under the old one",
    )
    args = p.parse_args(argv)
    return reported(lambda: _main(args))


def _main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    try:
        bench, base = load_benchmark(args.config, args.overrides)
        result = run_benchmark(bench, base, allow_config_change=args.allow_config_change)
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `ray job stop`: runs closed as KILLED
        return 130
    print(
        f"[benchmark] {bench.name}: {len(result['raw'])} metric values in {time.perf_counter() - start:.0f}s"
    )
    for kind, path in result["files"].items():
        print(f"[benchmark] {kind}: {path}")
    print(f"[benchmark] MLflow: {view_hint(result['tracking_uri'], result['parent_run_id'])}")
    if result["failed"]:
        print(
            f"[benchmark] {len(result['failed'])} cell(s) FAILED: {', '.join(result['failed'])}; "
            "re-run the same command to retry only those",
            file=sys.stderr,
        )
        return 1
    return 0


def _write_cell_scores(out_dir: Path, cell: Cell, rows: list[dict[str, Any]]) -> str | None:
    """A finished cell's per-image test scores, kept beside cells.json (a resume re-reads them)."""
    if not rows:
        return None
    import pandas as pd

    path = out_dir / "scores" / f"{cell.method}-{cell.dataset}-seed{cell.seed}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    where = {"cell": cell.key, "method": cell.method, "dataset": cell.dataset, "seed": cell.seed}
    pd.DataFrame([where | r for r in rows]).to_csv(path, index=False)
    return str(path.relative_to(out_dir))


def collect_scores(out_dir: Path, state: dict[str, Any]):
    """Every finished cell's per-image scores in one table (method, dataset, seed, image_id,
    prompt, one column per metric)."""
    import pandas as pd

    frames = [
        pd.read_csv(out_dir / e["scores"], dtype={"image_id": str, "prompt": str, "image": str})
        for e in state["cells"].values()
        if e.get("status") == "FINISHED" and e.get("scores") and (out_dir / e["scores"]).is_file()
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def results_table(state: dict[str, Any], bench: BenchmarkConfig):
    """(markdown-ready table of mean ± std over seeds, raw per-cell DataFrame)."""
    import pandas as pd

    rows = []
    for cell in state["cells"].values():
        if cell.get("status", "FINISHED") != "FINISHED":
            continue  # listed under the table as missing, never averaged
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
    seeds = len(bench.seeds)
    agg["cell"] = agg.apply(
        lambda r: (
            f"{100 * r['mean']:.1f} ± {0 if pd.isna(r['std']) else 100 * r['std']:.1f}"
            + ("" if r["count"] >= seeds else f" (n={int(r['count'])}/{seeds})")
        ),
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
    table.columns = [f"{d} {m}" for d, m in table.columns]
    costs = _costs(state)
    table["trainable params"] = [_count(costs.get(m, {}).get("params")) for m in table.index]
    table["train s / cell"] = [
        f"{costs[m]['train_s']:.1f}" if costs.get(m, {}).get("train_s") else "-"
        for m in table.index
    ]
    table.index = [LABELS.get(m, m) for m in table.index]
    return table, raw


def _costs(state: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method: trainable parameters and mean training seconds per finished cell."""
    out: dict[str, dict[str, list[float]]] = {}
    for e in state["cells"].values():
        if e.get("status") != "FINISHED":
            continue
        m = out.setdefault(e["method"], {"params": [], "train_s": []})
        m["params"].append(float(e.get("trainable_params", 0)))
        if (e.get("timings") or {}).get("train_s"):
            m["train_s"].append(float(e["timings"]["train_s"]))
    return {
        k: {n: (sum(v) / len(v) if v else 0.0) for n, v in vals.items()} for k, vals in out.items()
    }


def _count(n: float | None) -> str:
    if not n:
        return "0"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _write_outputs(
    out_dir: Path,
    table,
    raw,
    provenance: dict[str, Any],
    bench: BenchmarkConfig,
    state: dict[str, Any],
) -> dict[str, str]:
    header = "\n".join(f"- {k}: {v}" for k, v in provenance.items())
    seeds = len(bench.seeds)
    failed = {k: e for k, e in state["cells"].items() if e.get("status") == "FAILED"}
    missing = ""
    if failed:
        lines = "\n".join(f"- `{k}`: {e.get('error', '')}" for k, e in sorted(failed.items()))
        missing = (
            f"\n**{len(failed)} cell(s) FAILED and are missing from the table** (values with "
            f"n=k/{seeds} average the seeds that finished); re-run the same benchmark name to "
            f"retry them:\n\n{lines}\n"
        )
    files = {
        "markdown": str(out_dir / "results.md"),
        "csv": str(out_dir / "results.csv"),
        "chart": str(out_dir / "results.png"),
    }
    scores = collect_scores(out_dir, state)
    differences = ""
    if not scores.empty:
        files["scores"] = str(out_dir / "scores.csv")
        scores.to_csv(files["scores"], index=False)
        comparisons = compare(
            scores,
            bench.comparison_pairs(),
            {d: _metrics_for(bench, d) for d in bench.datasets},
            resamples=bench.bootstrap_resamples,
            confidence=bench.confidence,
            rng_seed=bench.bootstrap_seed,
        )
        if comparisons:
            import pandas as pd

            files["differences"] = str(out_dir / "differences.csv")
            pd.DataFrame([c.as_row() for c in comparisons]).to_csv(
                files["differences"], index=False
            )
            files["forest"] = str(out_dir / "differences.png")
            _forest_plot(comparisons, bench, files["forest"])
            differences = _differences_markdown(comparisons, bench)
    units = ""
    if not scores.empty and "image" in scores.columns:
        per_instance = scores["image"].astype(str) != scores["image_id"].astype(str)
        if per_instance.any():
            names = ", ".join(sorted(scores.loc[per_instance, "dataset"].unique()))
            units = f" On {names} (instance datasets) a value is a mean over instances."
    md = (
        f"# Benchmark `{bench.name}`\n\n{header}\n\nValues: mean ± std over {seeds} seed(s), in %, "
        f"on each dataset's test split; trainable parameters and training seconds per cell "
        f"(mean over its cells) on the right.{units}\n\n{table.to_markdown()}\n{missing}"
        f"{differences}{_category_markdown(scores, bench)}"
    )
    atomic_write(files["markdown"], md)
    raw.to_csv(files["csv"], index=False)
    _bar_chart(raw, bench, files["chart"])
    print(md, flush=True)
    return files


def _category_markdown(scores, bench: BenchmarkConfig) -> str:
    """Instance datasets with categories: each method's test metric per category (mean over
    seeds of the per-category mean over instances), in %. The headline mean follows the common
    classes; a method that fails a rare one shows here."""
    if scores.empty or "category" not in scores.columns:
        return ""
    parts = []
    for dataset in bench.datasets:
        d = scores[(scores["dataset"] == dataset) & scores["category"].notna()]
        if d.empty:
            continue
        metric = _metrics_for(bench, dataset)[0]
        d = d.assign(category=d["category"].astype(str))
        per_seed = d.groupby(["method", "seed", "category"])[metric].mean()
        table = per_seed.groupby(["category", "method"]).mean().unstack("method") * 100
        table = table[[m for m in bench.methods if m in table.columns]]
        table.columns = [LABELS.get(m, m) for m in table.columns]
        means = table.mean()
        counts = d.groupby("category")["image_id"].nunique().reindex(table.index)
        table.insert(0, "instances", [str(int(n)) for n in counts])
        table.loc["**mean over categories**"] = [f"{len(counts)} categories", *means]
        parts.append(
            f"\n### Per category: {dataset}, test {metric} (%)\n\nMean over seeds of each "
            f"category's mean over its instances; the last row weighs every category once.\n\n"
            f"{table.to_markdown(floatfmt='.1f')}\n"
        )
    return "".join(parts)


def _pair_label(method: str, base: str) -> str:
    return f"{LABELS.get(method, method)} vs {LABELS.get(base, base)}"


def _differences_markdown(comparisons: list, bench: BenchmarkConfig) -> str:
    """The "differences vs base" table (difference [CI], * = interval excludes 0) + verdicts."""
    import pandas as pd

    first = comparisons[0]
    rows: dict[str, dict[str, str]] = {}
    for c in comparisons:
        mark = " *" if c.significant else ""
        rows.setdefault(_pair_label(c.method, c.base), {})[f"{c.dataset} {c.metric}"] = (
            f"{c.difference:+.1f} [{c.ci_low:+.1f}, {c.ci_high:+.1f}]{mark}"
        )
    cols = [
        f"{d} {m}"
        for d in bench.datasets
        for m in _metrics_for(bench, d)
        if any(f"{d} {m}" in r for r in rows.values())
    ]
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=cols).fillna("-")
    verdicts = []
    for method, base in dict.fromkeys((c.method, c.base) for c in comparisons):
        parts = []
        for d in bench.datasets:
            main = _metrics_for(bench, d)[0]
            c = next(
                (
                    x
                    for x in comparisons
                    if (x.method, x.base, x.dataset, x.metric) == (method, base, d, main)
                ),
                None,
            )
            if c is not None:
                parts.append(
                    f"{d} {c.verdict} ({main} {c.difference:+.1f} "
                    f"[{c.ci_low:+.1f}, {c.ci_high:+.1f}])"
                )
        verdicts.append(f"- **{_pair_label(method, base)}**: " + "; ".join(parts))
    mismatched = sum(c.prompt_mismatches for c in comparisons)
    note = (
        f"\n{mismatched} image/seed pairs were scored with different prompts.\n"
        if mismatched
        else ""
    )
    units, clusters = f"{first.images} images", ""
    if first.samples > first.images:  # an instance dataset: the image is the unit drawn
        units = f"{first.samples} instances in {first.images} images"
        clusters = " with all their instances"
    return (
        f"\n## Differences vs base\n\nMean paired difference (method - base) in points on the "
        f"same test images and seeds ({first.seeds} seed(s) x {units} on the first "
        f"dataset), with a {100 * first.confidence:.0f}% interval from a two-level bootstrap "
        f"(seeds, then images{clusters}; {first.resamples} resamples, RNG seed "
        f"{first.rng_seed}). "
        f"`*`: the interval excludes 0. Intervals are per comparison, not corrected for the "
        f"number of comparisons.\n\n{frame.to_markdown()}\n{note}\n"
        f"Verdicts on each dataset's main metric:\n\n" + "\n".join(verdicts) + "\n"
    )


def _forest_plot(comparisons: list, bench: BenchmarkConfig, path: str) -> None:
    """One row per pair, one panel per dataset (its main metric): difference and interval.

    Pairs against the zero-shot teacher get their own row of panels: their differences are
    tens of points and would flatten the ablations' intervals on a shared axis.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = [d for d in bench.datasets if any(c.dataset == d for c in comparisons)]
    pairs = list(dict.fromkeys((c.method, c.base) for c in comparisons))
    groups = [
        g
        for g in (
            [p for p in pairs if p[1] != "zero_shot"],
            [p for p in pairs if p[1] == "zero_shot"],
        )
        if g
    ]
    fig, axes = plt.subplots(
        len(groups),
        len(datasets),
        figsize=(4.2 * len(datasets) + 2.8, sum(0.42 * len(g) + 1.2 for g in groups)),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(g) + 1 for g in groups]},
    )
    for row, group in zip(axes, groups):
        for ax, dataset in zip(row, datasets):
            main = _metrics_for(bench, dataset)[0]
            for y, (method, base) in enumerate(group):
                c = next(
                    (
                        x
                        for x in comparisons
                        if (x.method, x.base, x.dataset, x.metric) == (method, base, dataset, main)
                    ),
                    None,
                )
                if c is None:
                    continue
                colour = {"better": "#2ca02c", "worse": "#d62728"}.get(c.verdict, "#555555")
                ax.plot([c.ci_low, c.ci_high], [y, y], color=colour, lw=2)
                ax.plot([c.difference], [y], "o", color=colour)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_ylim(len(group) - 0.5, -0.5)
            ax.set_yticks(range(len(group)))
            ax.set_yticklabels(
                [_pair_label(m, b) for m, b in group] if ax is row[0] else [], fontsize=8
            )
            ax.set_title(f"{dataset}: {main} difference (points)", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
