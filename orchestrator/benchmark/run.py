"""The paper's comparison: methods x datasets x seeds, each cell a Ray Train run + MLflow child run.

A benchmark YAML is a training config (the base every cell starts from) plus a `benchmark:`
section. Cells run concurrently as Ray tasks (`orchestrator.benchmark.cells`): as many at once as the
cluster's resources allow (or `benchmark.max_concurrent_cells`). What cells of one dataset share
(the dataset folder, its decoded small splits, the teacher cache, the teacher hash) is prepared
once here, in the driver. Finished cells are recorded in `<storage>/<name>/cells.json`, so
re-running the same benchmark name runs only unfinished or failed cells (an interrupted cell
resumes from its Ray Train checkpoint, since its run name is deterministic); a new name starts
fresh.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.benchmark.cells import (
    CELL_TAG,
    Cell,
    CellJob,
    CellOutcome,
    cell_cpus,
    run_cells,
    timeline_stats,
    write_timeline,
)
from orchestrator.benchmark.config import (
    BenchmarkConfig,
    _metrics_for,
    cell_config,
    load_benchmark,
    retention_config,
)
from orchestrator.benchmark.report import _write_cell_scores, _write_outputs, results_table
from orchestrator.cluster.ray_env import concurrency_cap, init_ray, on_one_machine
from orchestrator.config import (
    Config,
    ConfigError,
    config_changes,
    result_view,
    resume_refusal,
)
from orchestrator.errors import reported
from orchestrator.storage import (
    ResultsDir,
    atomic_write_json,
    exclusive,
    is_remote,
    join,
    safe_component,
)
from orchestrator.tracking.runs import artifact_root as tracking_artifact_root
from orchestrator.tracking.runs import (
    check_tracking_server,
    close_child_runs,
    closing_on_exit,
    open_parent_run,
    resolve_tracking_uri,
    view_hint,
)
from orchestrator.train.models import teacher_hash

# The embedded default benchmark ships with the package, like the embedded teacher.
DEMO = Path(__file__).resolve().parent / "demo.yaml"


def _shared_key(cell: Cell, cfg: Config) -> tuple[str, bool]:
    """Cells of one dataset share prepared data; those streaming the teacher cache their own."""
    cached = cfg.speed.teacher_cache and cfg.loss.needs_teacher and cell.method != "zero_shot"
    return cell.dataset, bool(cached)


def _default_cap(bench: BenchmarkConfig, cfgs: list[Config], laptop: bool) -> int | None:
    """`max_concurrent_cells`, else no cap on a cluster, else what this machine's CPUs hold."""
    need = max((cell_cpus(c) for c in cfgs), default=1.0)
    return concurrency_cap(bench.max_concurrent_cells, need, laptop)


def _cell_view(cell: Cell, cfg: Config, retention: list[str] | None = None) -> dict[str, Any]:
    """The values a cell's result depends on (a zero-shot row: no training values), with the
    retention sets it was scored on (a finished cell lacks those added later)."""
    view = result_view(cfg, zero_shot=cell.method == "zero_shot")
    if retention:
        view["benchmark.retention"] = list(retention)
    return view


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
            now = _cell_view(cell, configs[cell.key], bench.retention)
            changes = config_changes(done.get("config"), now)
            if changes:
                changed.append((cell.key, changes))
    if changed and not allow:
        keys = ", ".join(k for k, _ in changed)
        raise resume_refusal(f"benchmark {bench.name!r} (finished cells {keys})", changed[0][1])


@dataclass
class BenchmarkResult:
    """What a benchmark run produced: the tables, the files, where to look in MLflow."""

    table: Any  # pandas DataFrame: methods x (dataset, metric), mean over seeds
    raw: Any  # pandas DataFrame: one row per cell and metric
    files: dict[str, str]
    parent_run_id: str
    tracking_uri: str
    provenance: dict[str, Any]
    failed: list[str]
    timeline: list[dict[str, Any]]
    stats: dict[str, float]
    location: str = ""  # where the files last: the output folder, or its s3:// prefix
    champions: list[Any] = field(default_factory=list)  # champions.Champion per dataset


class CellStore:
    """`cells.json`: the parent run id and each cell's outcome, rewritten atomically after
    every change (and sent to the bucket when the results live on object storage), so a killed
    driver, resubmitted anywhere, resumes from what it recorded."""

    def __init__(self, results: ResultsDir) -> None:
        self.results = results
        self.out_dir = results.local
        self.path = self.out_dir / "cells.json"
        self.state: dict[str, Any] = (
            json.loads(self.path.read_text()) if self.path.is_file() else {"cells": {}}
        )

    @property
    def cells(self) -> dict[str, dict[str, Any]]:
        return self.state["cells"]

    def finished(self, key: str) -> bool:
        done = self.cells.get(key)
        return bool(done) and done.get("status", "FINISHED") == "FINISHED"

    def record(self, key: str, entry: dict[str, Any]) -> None:
        # the per-image scores first: cells.json then points at them
        files = [entry.get("scores")] + [r["scores"] for r in entry.get("retention", {}).values()]
        for name in filter(None, files):
            self.results.push(self.out_dir / name)
        self.cells[key] = entry
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.state, indent=2)
        self.results.push(self.path)


@dataclass
class Plan:
    """Every cell with its typed config, checked before Ray starts, and the run's provenance."""

    cells: list[Cell]
    configs: dict[str, Config]
    provenance: dict[str, Any]
    teacher_sha: str | None
    uri: str
    # per cell: {retention dataset: the config its model is scored with there}
    retention: dict[str, dict[str, Config]] = field(default_factory=dict)
    # filled by prepare_shared: each set's test split, decoded once (a materialized Ray Dataset)
    retention_splits: dict[str, Any] = field(default_factory=dict)


def run_benchmark(
    bench: BenchmarkConfig,
    base: Config,
    *,
    quiet: bool = True,
    allow_config_change: bool = False,
) -> BenchmarkResult:
    """Run (or resume) every cell; returns the table, files written and the parent run id.

    One driver per benchmark folder at a time (a lock: a second gets `LockedError` naming the
    first). A re-run skips FINISHED cells only when their recorded configuration is this one
    (`config.config_changes`; `allow_config_change` keeps them whatever changed)."""
    try:
        safe_component(bench.name, "benchmark.name")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    results = ResultsDir(bench.output or join(base.storage.path, bench.name))
    with exclusive(results.lock_path, f"benchmark {bench.name!r} ({results.location})"):
        # On object storage: what an earlier driver recorded, wherever it ran (its cells'
        # run folders under the same prefix stay in the bucket)
        results.pull(("cells.json", "scores"))
        return _run_benchmark(bench, base, CellStore(results), quiet, allow_config_change)


def _run_benchmark(
    bench: BenchmarkConfig, base: Config, store: CellStore, quiet: bool, allow: bool
) -> BenchmarkResult:
    """The phases: plan and check, start Ray, prepare shared data, open the parent run, run the
    pending cells (each outcome recorded as it lands), write the report, close the parent."""
    started = time.perf_counter()
    plan = plan_cells(bench, base)
    _check_finished_cells(bench, plan.cells, plan.configs, store.state, allow)
    init_ray(log_to_driver=not quiet)
    laptop = on_one_machine()
    t_prep = time.perf_counter()
    shared = prepare_shared(plan, quiet)
    prep_s = time.perf_counter() - t_prep
    parent = _open_parent(bench, base, plan, store)
    jobs = pending_jobs(bench, base, plan, store, shared, parent.run_id)
    cap = _default_cap(bench, [j.cfg for j in jobs], laptop)
    print(
        f"[benchmark] {bench.name}: {len(jobs)} of {len(plan.cells)} cells to run, at most "
        f"{cap or 'as many as the cluster holds'} at once; shared data prepared in {prep_s:.1f}s",
        flush=True,
    )
    recorder = OutcomeRecorder(store, plan, parent.run_id)
    with closing_on_exit(
        parent, label=f"[benchmark] {bench.name}", hint="re-run the same name to resume"
    ):
        run_cells(
            jobs,
            max_concurrent=cap,
            retries=bench.cell_retries,
            on_outcome=recorder.record,
            already_done=len(plan.cells) - len(jobs),
            total=len(plan.cells),
        )
        result = _report(bench, store, plan, parent, recorder.timeline)
        if bench.register_models:
            result.champions = _register_champions(bench, store, plan, parent)
        _finish_parent(parent, store, result, time.perf_counter() - started, prep_s)
    return result


def plan_cells(bench: BenchmarkConfig, base: Config) -> Plan:
    """Typed configs for every cell (checked before anything runs) and the shared provenance."""
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
            bench.method_table(),
        )
        for c in cells
    }
    retention = {
        key: {r: retention_config(bench, base, cfg, r) for r in bench.retention}
        for key, cfg in configs.items()
    }
    if bench.retention:
        provenance["retention"] = ", ".join(bench.retention)
    return Plan(cells, configs, provenance, teacher_sha, uri, retention)


def prepare_shared(plan: Plan, quiet: bool) -> dict[tuple[str, bool], Any]:
    """What the cells of one dataset share (folder, decoded small splits, teacher cache), made
    once per dataset in the driver; each dataset's manifest digest joins the provenance."""
    from orchestrator.train.inputs import prepare_data

    shared: dict[tuple[str, bool], Any] = {}
    for cell in plan.cells:
        cfg = plan.configs[cell.key]
        key = _shared_key(cell, cfg)
        if key in shared:
            continue
        shared[key] = prepare_data(cfg, teacher_sha256=plan.teacher_sha, quiet=quiet)
        m = shared[key].manifest
        digest = hashlib.sha256(json.dumps(m["shards"], sort_keys=True).encode()).hexdigest()[:16]
        plan.provenance[f"data.{cell.dataset}"] = f"{m['counts']} manifest {digest}"
    _prepare_retention(plan)
    return shared


def _prepare_retention(plan: Plan) -> None:
    """Each retention set's folder (synthesised on first use, like the domains), checked once
    here so a missing set fails the benchmark before any cell trains; its test split decoded
    once into Ray's object store for every cell to score (not once per cell)."""
    from orchestrator.data.manifest import load_manifest
    from orchestrator.data.reader import read_split
    from orchestrator.data.synthetic import ensure_data

    first = plan.retention.get(plan.cells[0].key, {}) if plan.cells else {}
    for name, cfg in first.items():
        try:
            data_dir = ensure_data(cfg)
        except ConfigError as e:
            raise ConfigError(
                f"benchmark.retention names {name!r}, which cannot be opened: {e}. Ingest it "
                f"under data.root, or score no retention set with --set benchmark.retention=[]"
            ) from e
        m = load_manifest(data_dir)
        if cfg.data.test_split not in m.get("counts", {}):
            raise ConfigError(
                f"benchmark.retention: {data_dir} has no {cfg.data.test_split!r} split (it has "
                f"{sorted(m.get('counts', {}))}); set data.test_split for it under "
                f"benchmark.overrides.{name}"
            )
        digest = hashlib.sha256(json.dumps(m["shards"], sort_keys=True).encode()).hexdigest()[:16]
        plan.provenance[f"retention.{name}"] = (
            f"{m['counts'][cfg.data.test_split]} {cfg.data.test_split} manifest {digest}"
        )
        plan.retention_splits[name] = read_split(
            data_dir,
            cfg.data.test_split,
            image_size=cfg.model.image_size,
            square=cfg.model.square_inputs,
            channel_order=cfg.data.channel_order,
            decode_on=cfg.data.decode_on,
            keep_original_mask=True,
            num_cpus=cfg.scaling.data_cpus,
        ).materialize()


def _open_parent(bench: BenchmarkConfig, base: Config, plan: Plan, store: CellStore) -> Any:
    """The benchmark's parent run: the one cells.json names (resumed), else a new one."""
    parent, resumed = open_parent_run(
        plan.uri,
        base.tracking.experiment,
        f"benchmark:{bench.name}",
        resume_run_id=store.state.get("parent_run_id"),
        artifact_root=tracking_artifact_root(base.storage.path, base.tracking.experiment, plan.uri),
        tags={"infosam.benchmark": bench.name},
        params={
            **plan.provenance,
            "methods": ",".join(bench.methods),
            "datasets": ",".join(bench.datasets),
            "seeds": ",".join(map(str, bench.seeds)),
        },
    )
    if not resumed:
        store.state["parent_run_id"] = parent.run_id
        store.save()
    return parent


def pending_jobs(
    bench: BenchmarkConfig,
    base: Config,
    plan: Plan,
    store: CellStore,
    shared: dict[tuple[str, bool], Any],
    parent_run_id: str,
) -> list[CellJob]:
    """A job for every cell not FINISHED earlier (those are named and skipped)."""
    artifact_root = tracking_artifact_root(base.storage.path, base.tracking.experiment, plan.uri)
    jobs: list[CellJob] = []
    for i, cell in enumerate(plan.cells, 1):
        if store.finished(cell.key):
            print(
                f"[benchmark] {i}/{len(plan.cells)} {cell.key}: done earlier, skipped", flush=True
            )
            continue
        cfg = plan.configs[cell.key]
        jobs.append(
            CellJob(
                cell=cell,
                cfg=cfg,
                zero_shot=cell.method == "zero_shot",
                storage_name=f"{bench.name}/{cell.method}-{cell.dataset}-seed{cell.seed}",
                parent_run_id=parent_run_id,
                tracking_uri=plan.uri,
                tags={
                    "infosam.benchmark": bench.name,
                    "infosam.method": cell.method,
                    CELL_TAG: cell.key,
                },
                shared=shared[_shared_key(cell, cfg)],
                artifact_root=artifact_root,
                retention=[
                    (name, plan.retention_splits[name], rcfg)
                    for name, rcfg in plan.retention[cell.key].items()
                ],
            )
        )
    return jobs


class OutcomeRecorder:
    """Records each cell's outcome the moment it lands: cells.json, a progress line, a row of
    the timeline; a failed cell's MLflow run is closed FAILED with its error."""

    def __init__(self, store: CellStore, plan: Plan, parent_run_id: str) -> None:
        self.store, self.plan, self.parent_run_id = store, plan, parent_run_id
        self.timeline: list[dict[str, Any]] = []

    def record(self, out: CellOutcome) -> None:
        cell = out.cell
        entry: dict[str, Any] = {
            "method": cell.method,
            "dataset": cell.dataset,
            "seed": cell.seed,
            # what a re-run must match
            "config": _cell_view(
                cell, self.plan.configs[cell.key], list(self.plan.retention_splits)
            ),
        }
        if out.ok:
            msg, start, end, node = self._finished(out, entry)
        else:
            msg, start, end, node = self._failed(out, entry)
        self.store.record(cell.key, entry)
        n_done = sum(1 for e in self.store.cells.values() if e.get("status") == "FINISHED")
        print(f"[benchmark] {n_done}/{len(self.plan.cells)} {msg}", flush=True)
        self.timeline.append(
            {
                "cell": cell.key,
                "method": cell.method,
                "dataset": cell.dataset,
                "seed": cell.seed,
                "status": entry["status"],
                "node": node,
                "start": start,
                "end": end,
                "attempts": max(len(out.starts), 1),
                "resources": json.dumps(out.result.get("resources", {})),
                **{f"time_{k}": v for k, v in (out.result.get("timings") or {}).items()},
            }
        )

    def _finished(self, out: CellOutcome, entry: dict[str, Any]) -> tuple[str, float, float, str]:
        r = out.result
        entry.update(
            status="FINISHED",
            run_id=r["run_id"],
            metrics=r["metrics"],
            seconds=round(r["end"] - r["start"], 1),
            node=r["node_ip"],
            timings={k: round(v, 2) for k, v in (r.get("timings") or {}).items()},
            trainable_params=r.get("trainable_params", 0),
            scores=_write_cell_scores(self.store.out_dir, out.cell, r.get("scores") or []),
        )
        if r.get("retention"):
            entry["retention"] = {
                name: {
                    "metrics": got["metrics"],
                    "scores": _write_cell_scores(
                        self.store.out_dir, out.cell, got["scores"], retention=name
                    ),
                }
                for name, got in r["retention"].items()
            }
        shown = ", ".join(f"{k.split('/')[1]}={v:.3f}" for k, v in r["metrics"].items())
        for got in (r.get("retention") or {}).values():
            shown += "".join(f", {k}={v:.3f}" for k, v in list(got["metrics"].items())[:1])
        msg = f"{out.cell.key}: {shown} ({r['end'] - r['start']:.0f}s on {r['node_ip']})"
        return msg, r["start"], r["end"], f"{r['node_ip']}:{r['node_id'][-6:]}"

    def _failed(self, out: CellOutcome, entry: dict[str, Any]) -> tuple[str, float, float, str]:
        close_child_runs(
            self.plan.uri,
            self.parent_run_id,
            "FAILED",
            tags={CELL_TAG: out.cell.key},
            error=out.error,
        )
        entry.update(status="FAILED", error=out.error, metrics={})
        msg = f"{out.cell.key}: FAILED after {max(len(out.starts), 1)} attempt(s): {out.error}"
        start = out.starts[-1][1] if out.starts else out.failed_at
        node = out.starts[-1][0][-6:] if out.starts else "?"
        return msg, start, out.failed_at, node


def _report(
    bench: BenchmarkConfig,
    store: CellStore,
    plan: Plan,
    parent: Any,
    timeline: list[dict[str, Any]],
) -> BenchmarkResult:
    """results.md, the tables, figures and the timeline, written and logged to the parent."""
    table, raw = results_table(store.state, bench)
    files = _write_outputs(store.out_dir, table, raw, plan.provenance, bench, store.state)
    if timeline:
        files.update(write_timeline(timeline, store.out_dir))
    for kind, path in files.items():
        parent.log_artifact(path, "timeline" if kind.startswith("timeline") else "results")
        store.results.push(path)
    return BenchmarkResult(
        table=table,
        raw=raw,
        files=files,
        parent_run_id=parent.run_id,
        tracking_uri=plan.uri,
        provenance=plan.provenance,
        failed=[k for k, e in store.cells.items() if e.get("status") == "FAILED"],
        timeline=timeline,
        stats=timeline_stats(timeline),
        location=store.results.location,
    )


def _register_champions(bench: BenchmarkConfig, store: CellStore, plan: Plan, parent: Any) -> list:
    """Each dataset's best cell registered as `<benchmark>-<dataset>@champion`, shown."""
    from orchestrator.benchmark.champions import register_champions

    champions = register_champions(bench, store.cells, plan.uri)
    for c in champions:
        print(
            f"[benchmark] champion {c.dataset}: {c.alias_uri} (version {c.version}) = "
            f"{c.method} seed {c.seed}, test {c.metric} {c.score:.3f}",
            flush=True,
        )
        parent.set_tags({f"infosam.champion.{c.dataset}": f"{c.alias_uri} = {c.cell}"})
    return champions


def _finish_parent(
    parent: Any, store: CellStore, result: BenchmarkResult, wall_s: float, prep_s: float
) -> None:
    """The parent run's summary metrics, the concurrency line, FINISHED."""
    stats = result.stats
    parent.log_metrics(
        {
            "cells": sum(1 for e in store.cells.values() if e.get("status") != "FAILED"),
            "cells_failed": len(result.failed),
            "wall_time_s": wall_s,
            "shared_data_s": prep_s,
            **{k: v for k, v in stats.items() if not math.isnan(v)},
        },
        step=0,
    )
    if stats:
        print(
            f"[benchmark] {len(result.timeline)} cells in {stats['makespan_s']:.0f}s: peak "
            f"concurrency {stats['peak_concurrency']:.0f}, mean {stats['mean_concurrency']:.2f}, "
            f"slots idle {100 * stats['slot_idle_fraction']:.0f}%",
            flush=True,
        )
    if result.failed:
        parent.set_tags({"infosam.failed_cells": ",".join(result.failed)})
    parent.finish("FINISHED")


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
        f"[benchmark] {bench.name}: {len(result.raw)} metric values in {time.perf_counter() - start:.0f}s"
    )
    for kind, path in result.files.items():
        print(f"[benchmark] {kind}: {path}")
    if is_remote(result.location):
        print(f"[benchmark] kept in {result.location} (cells.json, results, scores)")
    print(f"[benchmark] MLflow: {view_hint(result.tracking_uri, result.parent_run_id)}")
    if result.failed:
        print(
            f"[benchmark] {len(result.failed)} cell(s) FAILED: {', '.join(result.failed)}; "
            "re-run the same command to retry only those",
            file=sys.stderr,
        )
        return 1
    return 0
