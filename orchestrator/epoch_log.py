"""Epoch metrics reach MLflow exactly once, whatever the timing of a failure.

A Train worker that logs its own metrics after `ray.train.report` can die between persisting a
checkpoint and Ray Train's controller registering it. The restarted group then resumes from the
previous registered checkpoint and runs that epoch again, and the run's history holds the step
twice. So with Train workers nothing is logged by a worker: `EpochLogger` is a Ray Train
`UserCallback`, called on the controller (on the node that called `fit`) after the controller
registered a report. An epoch is logged when, and only when, its checkpoint is the one a restart
would resume from; an epoch run again after a failure was never registered, so its first
attempt was never logged, and the value kept is the re-run's.

Every write is also idempotent (`log_epochs` skips steps MLflow already holds) so the back-fill
paths are safe: the controller fills in earlier epochs from the registered checkpoint's
`history.json` (a driver that died between registering and logging), `fit` reconciles the final
history after training, and Train local mode (no controller) logs from the one process.

The callback also records the run's failures on the run: tags `infosam.worker_failures`,
`infosam.restarts` and `infosam.resumed_from_epochs` (one entry per restart: the epoch of the
checkpoint it resumed from, `none` when it started over).
"""

from __future__ import annotations

import json
from typing import Any

import ray.train

from orchestrator.checkpoints import HISTORY_FILE, read_history
from orchestrator.tracking import RunLogger

__all__ = ["HISTORY_FILE", "MARKER_KEY", "EpochLogger", "checkpoint_history", "log_epochs"]

# Every epoch logs this key in the same batch as all its other metrics, so its steps are the
# epochs MLflow already holds.
MARKER_KEY = "train/loss"


def numeric(metrics: dict[str, Any]) -> dict[str, float]:
    """The loggable part of one epoch's report (strings and the step itself left out)."""
    return {
        k: float(v)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "epoch"
    }


def log_epochs(logger: RunLogger, entries: list[dict[str, Any]]) -> list[int]:
    """Log each epoch entry whose step MLflow does not hold yet; returns the epochs written.

    One `log_batch` per epoch, so an epoch is either entirely in MLflow or not at all.
    """
    if not entries:
        return []
    logged = set(logger.logged_steps(MARKER_KEY))
    written = []
    for entry in sorted(entries, key=lambda e: int(e["epoch"])):
        epoch = int(entry["epoch"])
        if epoch in logged:
            continue
        logger.log_metrics(numeric(entry), step=epoch)
        logged.add(epoch)
        written.append(epoch)
    return written


def checkpoint_history(checkpoint: Any) -> list[dict[str, Any]]:
    """Per-epoch metrics recorded up to a (possibly remote) Ray Train checkpoint.

    Reads only the small `history.json` through the checkpoint's own filesystem, so the
    controller never downloads model state from S3/GCS to back-fill a few numbers.
    """
    path = f"{checkpoint.path.rstrip('/')}/{HISTORY_FILE}"
    try:
        with checkpoint.filesystem.open_input_stream(path) as f:
            return json.loads(f.read().decode())
    except FileNotFoundError:  # written before checkpoints carried history.json
        with checkpoint.as_directory() as d:
            return read_history(d)


class EpochLogger(ray.train.UserCallback):
    """Controller-side MLflow logging of registered reports and of the run's restarts."""

    def __init__(self, uri: str, run_id: str, max_failures: int) -> None:
        self.logger = RunLogger(uri, run_id)
        self.max_failures = max_failures
        self.failures = 0  # over the run's life (a resumed run continues the count)
        self.here = 0  # in this `fit`: what Ray Train's max_failures counts
        self.last_registered: int | None = None
        self.resumes: list[str] | None = None

    def after_report(
        self,
        run_context: Any,
        metrics: list[dict[str, Any]],
        checkpoint: ray.train.Checkpoint | None,
    ) -> None:
        entry = metrics[0]  # rank 0's report carries the evaluation
        if "epoch" not in entry:
            return
        epoch = int(entry["epoch"])
        logged = set(self.logger.logged_steps(MARKER_KEY))
        entries = [entry]
        if checkpoint is not None and any(e not in logged for e in range(epoch)):
            entries = checkpoint_history(checkpoint)
        log_epochs(self.logger, entries)
        if checkpoint is not None:
            self.last_registered = epoch

    def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
        if self.resumes is None:  # first failure seen by this controller: continue the tags
            tags = self.logger.client.get_run(self.logger.run_id).data.tags
            self.failures = int(tags.get("infosam.worker_failures", 0))
            self.resumes = [x for x in tags.get("infosam.resumed_from_epochs", "").split(",") if x]
            if self.last_registered is None:  # a resumed run that has not reported yet
                logged = self.logger.logged_steps(MARKER_KEY)
                self.last_registered = max(logged) if logged else None
        self.failures += 1
        self.here += 1
        tags = {
            "infosam.worker_failures": self.failures,
            "infosam.last_failure": _describe(worker_exceptions),
        }
        if self.max_failures < 0 or self.here <= self.max_failures:
            # Ray Train restarts the worker group from the latest registered checkpoint.
            start = "none" if self.last_registered is None else str(self.last_registered)
            self.resumes.append(start)
            tags["infosam.restarts"] = len(self.resumes)
            tags["infosam.resumed_from_epochs"] = ",".join(self.resumes)
        self.logger.set_tags(tags)


def _describe(worker_exceptions: dict[int, Exception]) -> str:
    parts = []
    for rank, exc in sorted(worker_exceptions.items()):
        text = str(exc).strip().splitlines()
        parts.append(f"rank {rank}: {type(exc).__name__}: {text[0][:200] if text else ''}")
    return "; ".join(parts)[:1000]
