"""Benchmark cells as Ray tasks: scheduled by Ray on the cluster's capacity, retried, timed.

Each cell (one method on one dataset with one seed) is a Ray task that reserves what the cell
needs: in Train local mode (`scaling.num_workers: 0`) the cell trains in its own process, so the
task reserves the worker's CPU/GPU and `scaling.worker_resources`; with Train workers the task
is only their driver (a `driver` slot on clusters that advertise one) and the TorchTrainer's
placement group reserves the workers. Pending cells are queued Ray tasks and placement groups:
that queue is what Ray's autoscaler sees and adds nodes for. Ray retries a cell that raised or
whose node died (`max_retries`); a cell that still fails is recorded FAILED and the rest go on.
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.config import Config
from orchestrator.plots import timeline_chart

__all__ = [
    "Cell",
    "CellJob",
    "run_cells",
    "task_options",
    "timeline_stats",
    "write_timeline",
]


CELL_TAG = "infosam.cell"


@dataclass(frozen=True)
class Cell:
    method: str
    dataset: str
    seed: int

    @property
    def key(self) -> str:
        return f"{self.method}/{self.dataset}/seed{self.seed}"


@dataclass
class CellJob:
    """Everything one cell task needs; typed, pickled once into the task."""

    cell: Cell
    cfg: Config
    zero_shot: bool
    storage_name: str
    parent_run_id: str
    tracking_uri: str
    tags: dict[str, str]
    shared: Any  # orchestrator.train.inputs.SharedData of the cell's dataset
    artifact_root: str | None = None
    # benchmark.retention: (dataset, its test split decoded once as a Ray Dataset, the cell's
    # config to score it with) per set
    retention: list[tuple[str, Any, Config]] = field(default_factory=list)


def task_options(
    cfg: Config, *, zero_shot: bool = False, driver_slots: bool | None = None
) -> dict[str, Any]:
    """Ray task options reserving what a cell needs (see the module docstring).

    `driver_slots`: whether the cluster advertises a `driver` resource (asked of Ray if None).
    """
    import ray

    sc = cfg.scaling
    if sc.max_workers == 0 or zero_shot:  # the cell computes in its own process
        return {
            "num_cpus": sc.cpus_per_worker,
            "num_gpus": sc.gpus_per_worker if sc.use_gpu else 0,
            "resources": dict(sc.worker_resources),
        }
    if driver_slots is None:
        driver_slots = ray.cluster_resources().get("driver", 0) > 0
    if driver_slots:
        return {"num_cpus": 0, "resources": {"driver": 0.1}}  # drivers on the head (cluster.yaml)
    return {"num_cpus": 0.25}


def cell_cpus(cfg: Config, *, zero_shot: bool = False) -> float:
    """CPUs a cell holds while it runs: its task plus its Train workers."""
    opts = task_options(cfg, zero_shot=zero_shot)
    workers = 0 if zero_shot else cfg.scaling.max_workers * cfg.scaling.cpus_per_worker
    return float(opts.get("num_cpus", 0)) + workers


def _run_cell(job: CellJob, board: Any) -> dict[str, Any]:
    """The body of a cell task: a `fit` (or the teacher's evaluation), timed, with its node."""
    import ray

    ctx = ray.get_runtime_context()
    node_id = ctx.get_node_id()
    start = time.time()
    if board is not None:
        board.started.remote(job.cell.key, node_id, start)
    retention: dict[str, dict[str, Any]] = {}
    if job.zero_shot:
        metrics, run_id, timings, scores = _zero_shot_cell(job, retention)
        params = 0
    else:
        from orchestrator.train.driver import fit

        result = fit(
            job.cfg,
            quiet=True,
            shared=job.shared,
            run_name=job.cell.key,
            storage_name=job.storage_name,
            parent_run_id=job.parent_run_id,
            tags=job.tags,
        )
        metrics = {
            k: float(v)
            for k, v in result.metrics.items()
            if k.startswith("test/") and "zero_shot" not in k
        }
        run_id, timings = result.run_id, result.timings
        scores = [r for r in result.test_scores if r.get("model") == "student"]
        params = int(result.metrics.get("model/trainable_params", 0))
        if job.retention:
            from orchestrator.tracking.runs import RunLogger
            from orchestrator.train.checkpoints import load_trained

            t_ret = time.perf_counter()
            model, _, _ = load_trained(result.checkpoint_dir, _device(job.cfg))
            logger = RunLogger(job.tracking_uri, run_id) if run_id else None
            retention = score_retention(model, job.retention, logger)
            timings = {**timings, "retention_s": time.perf_counter() - t_ret}
    end = time.time()
    return {
        "retention": retention,
        "metrics": metrics,
        "scores": [{k: v for k, v in r.items() if k != "model"} for r in scores],
        "trainable_params": params,
        "run_id": run_id,
        "start": start,
        "end": end,
        "node_id": node_id,
        "node_ip": ray.util.get_node_ip_address(),
        "resources": {k: float(v) for k, v in ctx.get_assigned_resources().items()},
        "timings": timings,
    }


def _device(cfg: Config) -> str:
    import torch

    return "cuda" if cfg.scaling.use_gpu and torch.cuda.is_available() else "cpu"


def score_retention(
    model: Any, sets: list[tuple[str, Any, Config]], logger: Any | None
) -> dict[str, dict[str, Any]]:
    """A cell's model on each retention set's test split: {dataset: {metrics, scores}}; the
    means land on the cell's MLflow run as `retention/<dataset>/<metric>` (sortable in the
    runs table), the per-image scores as `scores/retention_<dataset>.csv`. The split comes
    decoded (the driver decoded it once for every cell), through the evaluation code that
    scores the in-domain test split."""
    from orchestrator.train.evaluation import evaluate_split, mean_metrics

    device = next(model.parameters()).device
    out: dict[str, dict[str, Any]] = {}
    for name, split, cfg in sets:
        rows: list[dict[str, Any]] = []
        sums, count, _ = evaluate_split({"student": model}, split, cfg, device, scores=rows)
        metrics = mean_metrics(sums["student"], count, f"retention/{name}/")
        if logger is not None:
            logger.log_metrics(metrics, step=0)
            logger.log_rows(rows, f"scores/retention_{name}.csv")
        out[name] = {
            "metrics": metrics,
            "scores": [{k: v for k, v in r.items() if k != "model"} for r in rows],
        }
    return out


def _zero_shot_cell(
    job: CellJob, retention: dict[str, dict[str, Any]]
) -> tuple[dict[str, float], str, dict[str, float], list[dict[str, Any]]]:
    """The teacher's row: its test metrics (and its retention reference) on a child run."""
    from orchestrator.tracking.datasets import log_split_inputs
    from orchestrator.tracking.runs import open_run
    from orchestrator.train.evaluation import log_category_results, zero_shot

    t0 = time.perf_counter()
    cfg = job.cfg
    child, _ = open_run(
        job.tracking_uri,
        cfg.tracking.experiment,
        job.cell.key,
        artifact_root=job.artifact_root,
        tags=job.tags,
        parent_run_id=job.parent_run_id,
    )
    try:
        child.log_params(
            {
                "method": job.cell.method,
                "data.dataset": job.cell.dataset,
                "seed": job.cell.seed,
                "optim.eval_protocol": cfg.optim.eval_protocol,
            }
        )
        # the teacher is only scored: its one input is the test split
        log_split_inputs(
            job.tracking_uri,
            child.run_id,
            job.shared.data_dir,
            job.shared.manifest,
            {"test": cfg.data.test_split},
        )
        t_eval = time.perf_counter()
        scores: list[dict[str, Any]] = []
        metrics = zero_shot(cfg, job.shared.data_dir, scores=scores)
        eval_s = time.perf_counter() - t_eval
        child.log_metrics(metrics, step=0)
        child.log_rows(scores, "scores/test_scores.csv")
        log_category_results(child, scores)
        if job.retention:
            from orchestrator.train.models import build_teacher

            teacher = build_teacher(cfg, _device(cfg))
            retention.update(score_retention(teacher, job.retention, child))
    except BaseException:
        child.finish("FAILED")
        raise
    child.finish()
    total = time.perf_counter() - t0
    return metrics, child.run_id, {"eval_s": eval_s, "logging_s": total - eval_s}, scores


def _board_class():
    import ray

    @ray.remote(num_cpus=0)
    class CellBoard:
        """Where cell tasks say they started (and on which node): the live line's source."""

        def __init__(self) -> None:
            self.starts: dict[str, list[tuple[str, float]]] = {}

        def started(self, key: str, node_id: str, t: float) -> None:
            self.starts.setdefault(key, []).append((node_id, t))

        def snapshot(self) -> dict[str, list[tuple[str, float]]]:
            return self.starts

    return CellBoard


class Progress:
    """The live line: done / running / pending / failed cells and an ETA."""

    def __init__(self, total: int, already: int, *, stream: Any = None) -> None:
        self.total, self.already = total, already
        self.stream = stream or sys.stdout
        self.tty = self.stream.isatty()
        self.t0 = time.time()
        self.last_print = 0.0
        self.last_line = ""
        self.durations: list[float] = []
        self.peak = 1

    def line(self, done: int, running: int, pending: int, failed: int) -> str:
        self.peak = max(self.peak, running)
        left = pending + running
        eta = ""
        if self.durations and left:
            mean = sum(self.durations) / len(self.durations)
            eta = f", ETA {_hms(mean * left / max(self.peak, 1))}"
        return (
            f"[benchmark] {self.already + done}/{self.total} done, {running} running, "
            f"{pending} pending, {failed} failed, {_hms(time.time() - self.t0)} elapsed{eta}"
        )

    def show(self, done: int, running: int, pending: int, failed: int, *, force=False) -> None:
        line = self.line(done, running, pending, failed)
        now = time.time()
        if self.tty:
            self.stream.write("\r" + line.ljust(len(self.last_line)))
            self.stream.flush()
        elif force or (line != self.last_line and now - self.last_print > 30):
            print(line, file=self.stream, flush=True)
            self.last_print = now
        self.last_line = line

    def event(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r" + " " * len(self.last_line) + "\r")
        print(text, file=self.stream, flush=True)


def _hms(seconds: float) -> str:
    seconds = round(seconds)
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


@dataclass
class CellOutcome:
    cell: Cell
    ok: bool
    result: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    starts: list[tuple[str, float]] = field(default_factory=list)
    failed_at: float = 0.0


def run_cells(
    jobs: list[CellJob],
    *,
    max_concurrent: int | None,
    retries: int,
    on_outcome: Callable[[CellOutcome], None],
    already_done: int = 0,
    total: int | None = None,
) -> list[CellOutcome]:
    """Submit every job as a Ray task (at most `max_concurrent` in flight), collect outcomes.

    Interrupted (Ctrl-C, or SIGTERM turned into KeyboardInterrupt by the caller), it cancels the
    cells in flight and re-raises; the caller closes their MLflow runs.
    """
    import ray

    pool = _CellPool(jobs, max_concurrent, retries, Progress(total or len(jobs), already_done))
    try:
        while pool.todo or pool.inflight:
            pool.submit()
            for out in pool.collect():
                on_outcome(out)
            pool.show()
        pool.progress.show(pool.ok, 0, 0, pool.failed, force=True)
        if pool.progress.tty:
            print(flush=True)
    except BaseException:
        pool.cancel()
        raise
    finally:
        ray.kill(pool.board)
    return pool.outcomes


class _CellPool:
    """The cells in flight as Ray tasks, the board their start times are read from, and the
    outcomes so far."""

    def __init__(
        self, jobs: list[CellJob], max_concurrent: int | None, retries: int, progress: Progress
    ) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        self.board = (
            _board_class()
            .options(
                # On the driver's node (num_cpus=0 always fits): it lives and dies with the
                # driver, never with a worker node that a spot reclaim takes away.
                scheduling_strategy=NodeAffinitySchedulingStrategy(
                    ray.get_runtime_context().get_node_id(), soft=False
                ),
                max_restarts=-1,
            )
            .remote()
        )
        self.remote = ray.remote(_run_cell)
        self.drivers = ray.cluster_resources().get("driver", 0) > 0  # asked once, not per cell
        self.todo = list(jobs)
        self.inflight: dict[Any, CellJob] = {}
        self.outcomes: list[CellOutcome] = []
        self.starts: dict[str, list[tuple[str, float]]] = {}
        self.max_concurrent, self.retries, self.progress = max_concurrent, retries, progress
        self.failed = 0

    @property
    def ok(self) -> int:
        return sum(1 for o in self.outcomes if o.ok)

    def submit(self) -> None:
        while self.todo and (
            self.max_concurrent is None or len(self.inflight) < self.max_concurrent
        ):
            job = self.todo.pop(0)
            ref = self.remote.options(
                **task_options(job.cfg, zero_shot=job.zero_shot, driver_slots=self.drivers),
                max_retries=self.retries,
                retry_exceptions=True,
                name=f"cell:{job.cell.key}",
            ).remote(job, self.board)
            self.inflight[ref] = job

    def collect(self) -> list[CellOutcome]:
        """Outcomes of the cells that ended in the last second (at most one)."""
        import ray

        ready, _ = ray.wait(list(self.inflight), num_returns=1, timeout=1.0)
        # A blip of the board (its node under load, a node going away) must not stop the
        # matrix: the next round asks again.
        with contextlib.suppress(ray.exceptions.RayActorError, ray.exceptions.GetTimeoutError):
            self.starts = ray.get(self.board.snapshot.remote(), timeout=30)
        ended = []
        for ref in ready:
            job = self.inflight.pop(ref)
            try:
                out = CellOutcome(job.cell, True, ray.get(ref))
                self.progress.durations.append(out.result["end"] - out.result["start"])
            except Exception as exc:  # the task raised, or its node/worker died, after retries
                out = CellOutcome(job.cell, False, error=_short_error(exc))
                out.failed_at = time.time()
                self.failed += 1
            out.starts = self.starts.get(job.cell.key, [])
            self.outcomes.append(out)
            ended.append(out)
        return ended

    def show(self) -> None:
        running = sum(1 for j in self.inflight.values() if j.cell.key in self.starts)
        waiting = len(self.todo) + len(self.inflight) - running
        self.progress.show(self.ok, running, waiting, self.failed)

    def cancel(self) -> None:
        """Cancel every cell in flight and wait (15 s at most) for Ray to confirm."""
        import ray

        for ref in self.inflight:
            ray.cancel(ref, force=True, recursive=True)
        deadline = time.time() + 15
        while self.inflight and time.time() < deadline:
            done, _ = ray.wait(list(self.inflight), num_returns=len(self.inflight), timeout=1.0)
            for ref in done:
                self.inflight.pop(ref)


def _short_error(exc: BaseException) -> str:
    cause = getattr(exc, "cause", None)
    if cause is not None and not isinstance(cause, type):
        text = f"{type(cause).__name__}: {cause}"
    else:
        text = f"{type(exc).__name__}: {exc}"
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return (lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}")[:1000]


def timeline_stats(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Makespan, peak and mean concurrency, and the idle fraction of the peak's slots."""
    spans = [(r["start"], r["end"]) for r in rows if r.get("start") and r.get("end")]
    if not spans:
        return {}
    events = sorted([(s, 1) for s, _ in spans] + [(e, -1) for _, e in spans], key=lambda x: x)
    level = peak = 0
    for _, delta in events:
        level += delta
        peak = max(peak, level)
    makespan = max(e for _, e in spans) - min(s for s, _ in spans)
    busy = sum(e - s for s, e in spans)
    mean = busy / makespan if makespan > 0 else float(peak)
    return {
        "makespan_s": makespan,
        "busy_s": busy,
        "peak_concurrency": float(peak),
        "mean_concurrency": mean,
        "slot_idle_fraction": 1.0 - mean / peak if peak else 0.0,
        "makespan_vs_ideal": makespan / (busy / peak) if busy > 0 and peak else math.nan,
    }


def write_timeline(rows: list[dict[str, Any]], out_dir: Path) -> dict[str, str]:
    """timeline.csv (one row per cell) and timeline.png (Gantt chart, lanes per node)."""
    import pandas as pd

    frame = pd.DataFrame(rows)
    files = {
        "timeline_csv": str(out_dir / "timeline.csv"),
        "timeline": str(out_dir / "timeline.png"),
    }
    t0 = frame["start"].min() if not frame.empty else 0.0
    if not frame.empty:
        frame["start_s"] = frame["start"] - t0
        frame["end_s"] = frame["end"] - t0
        frame["duration_s"] = frame["end"] - frame["start"]
    frame.to_csv(files["timeline_csv"], index=False)
    bars, ticks = _lanes(frame)
    stats = timeline_stats(rows)
    title = (
        f"{len(frame)} cells, makespan {stats['makespan_s']:.0f}s, peak concurrency "
        f"{stats['peak_concurrency']:.0f}, mean {stats['mean_concurrency']:.2f}, "
        f"idle {100 * stats['slot_idle_fraction']:.0f}% of the slots"
        if stats
        else ""
    )
    timeline_chart(bars, ticks, title, files["timeline"])
    return files


def _lanes(frame: Any) -> tuple[list[tuple[int, Any]], list[str]]:
    """Each cell on a lane of its node: a lane is one slot that runs one cell at a time."""
    lanes: list[tuple[str, float]] = []  # (node, end of its last cell)
    ticks: list[str] = []
    bars = []
    for _, r in frame.sort_values(["node", "start_s"]).iterrows() if not frame.empty else []:
        lane = next(
            (i for i, (n, end) in enumerate(lanes) if n == r["node"] and end <= r["start_s"]),
            None,
        )
        if lane is None:
            lanes.append((r["node"], r["end_s"]))
            lane = len(lanes) - 1
            ticks.append(f"{r['node']} #{sum(1 for n, _ in lanes if n == r['node'])}")
        else:
            lanes[lane] = (r["node"], r["end_s"])
        bars.append((lane, r))
    return bars, ticks
