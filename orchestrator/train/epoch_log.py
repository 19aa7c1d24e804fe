"""Epoch metrics reach MLflow exactly once, whatever the timing of a failure.

A Train worker that logs its own metrics after `ray.train.report` can die between persisting a
checkpoint and Ray Train's controller registering it. The restarted group then resumes from the
previous registered checkpoint and runs that epoch again, and the run's history holds the step
twice. So with Train workers no worker logs epoch metrics: `EpochLogger` is a Ray Train
controller callback (on the node that called `fit`), called after the controller registered a
report. An epoch is logged when, and only when, its checkpoint is the one a restart
would resume from; an epoch run again after a failure was never registered, so its first
attempt was never logged, and the value kept is the re-run's.

Every write is also idempotent (`log_epochs` skips steps MLflow already holds) so the back-fill
paths are safe: the controller fills in earlier epochs from the registered checkpoint's
`history.json` (a driver that died between registering and logging), `fit` reconciles the final
history after training, and Train local mode (no controller) logs from the one process.

The callback also records every attempt on the run (tags, visible in the MLflow UI):
`infosam.restarts`; per restart `infosam.resumed_from_epochs` (the epoch of the checkpoint it
resumed from, `E@S` for a checkpoint taken at step S of epoch E on a preemption notice, `none`
when it started over) and `infosam.restart_reasons` (failure, preemption, resize, resumed);
`infosam.world_sizes` per attempt (elastic runs shrink and grow); `infosam.worker_failures` and
`infosam.last_failure`.

A tracking server that is down (restarted, upgraded, a network blip) must not stop training:
Ray Train workers wait for the controller to take each report, so the callback never talks to
MLflow in the controller's loop. Its writes go, in order, to an `Outbox` thread that retries each
one until the server answers. The writes are idempotent, so a retried write never duplicates a
point, and whatever is still queued when training ends is reconciled by `fit` from the final
checkpoint's history.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from ray.train.v2._internal.execution.callback import (
    ControllerCallback,
    ReportCallback,
    WorkerGroupCallback,
)

from orchestrator.tracking.runs import RunLogger
from orchestrator.train.checkpoints import HISTORY_FILE, read_checkpoint_file, read_history

__all__ = [
    "MARKER_KEY",
    "PARTIAL_KEY",
    "EpochLogger",
    "Outbox",
    "checkpoint_history",
    "log_epochs",
]


# Present in the report of a checkpoint taken mid-epoch on a preemption notice: its value is the
# number of the epoch's steps done. Such a report is not an epoch and is never logged as one.
PARTIAL_KEY = "partial_epoch_steps"


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


def log_epochs(
    logger: RunLogger, entries: list[dict[str, Any]], logged: set[int] | None = None
) -> list[int]:
    """Log each epoch entry whose step MLflow does not hold yet; returns the epochs written.

    One `log_batch` per epoch, so an epoch is either entirely in MLflow or not at all.
    `logged` (the marker steps MLflow holds) saves a query when the caller just asked.
    """
    if not entries:
        return []
    logged = set(logger.logged_steps(MARKER_KEY)) if logged is None else set(logged)
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
    data = read_checkpoint_file(checkpoint, HISTORY_FILE)
    if data is not None:
        return json.loads(data.decode())
    with checkpoint.as_directory() as d:  # written before checkpoints carried history.json
        return read_history(d)


def permanent(exc: Exception) -> bool:
    """An MLflow error no retry can mend: a 4xx answer (bad credentials, a deleted run, an
    invalid value), except 408 and 429, which mean "later"."""
    from mlflow.exceptions import MlflowException

    if not isinstance(exc, MlflowException):
        return False
    status = exc.get_http_status_code()
    return 400 <= status < 500 and status not in (408, 429)


class Outbox:
    """Runs tracking writes on one background thread, in order, each retried until it succeeds
    or the server refuses it for good (`permanent`: dropped and said once, so one refused write
    never holds back the ones behind it).

    A write must be idempotent (retried after a reply was lost) and must change local state
    only after its MLflow calls succeeded. Nothing here blocks the caller.
    """

    def __init__(self, name: str = "mlflow-outbox", max_backoff_s: float = 10.0) -> None:
        self.name, self.max_backoff_s = name, max_backoff_s
        self._queue: queue.Queue[tuple[str, Callable[[], Any]]] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.retries = 0
        self.last_error: str | None = None
        self.dropped: list[str] = []  # writes the server refused for good (4xx)

    def put(self, what: str, write: Callable[[], Any]) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
            self._thread.start()
        self._queue.put((what, write))

    def flush(self, timeout_s: float) -> bool:
        """Wait until every queued write is done (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self._queue.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.05)
        return not self._queue.unfinished_tasks

    def pending(self) -> int:
        return self._queue.unfinished_tasks

    def _run(self) -> None:
        while True:
            what, write = self._queue.get()
            backoff = 0.5
            while True:
                try:
                    write()
                    break
                except Exception as exc:
                    if permanent(exc):  # retrying cannot help; later writes must not wait
                        self.dropped.append(f"{what}: {type(exc).__name__}: {str(exc)[:200]}")
                        print(
                            f"[infosam] MLflow refused a write and it is dropped, not retried "
                            f"({self.dropped[-1]}); check the run and the credentials",
                            flush=True,
                        )
                        break
                    # the server is down or overloaded: keep it, try again
                    self.retries += 1
                    first = self.last_error is None
                    self.last_error = f"{what}: {type(exc).__name__}: {str(exc)[:200]}"
                    if first or self.retries % 10 == 0:
                        print(
                            f"[infosam] MLflow write delayed ({self.last_error}); training "
                            "goes on, the write is retried until the server answers",
                            flush=True,
                        )
                    time.sleep(backoff)
                    backoff = min(backoff * 2, self.max_backoff_s)
            if self.last_error is not None:
                print(f"[infosam] MLflow writes resumed ({what})", flush=True)
                self.last_error = None
            self._queue.task_done()


class EpochLogger(ReportCallback, WorkerGroupCallback, ControllerCallback):
    """Controller-side MLflow logging of registered reports and of the run's restarts.

    Built on Ray Train's developer callback hooks (pinned Ray 2.60): `after_report` runs after
    the checkpoint manager registered the report; `after_worker_group_start` marks each attempt
    (its world size, the checkpoint it resumed from); `after_controller_state_update` tells why
    the next attempt happens (a failure, a preemption, an elastic resize).
    """

    #: How long the finished controller waits for queued writes; `fit` reconciles epochs after.
    FLUSH_TIMEOUT_S = 120.0

    def __init__(self, uri: str, run_id: str) -> None:
        self.logger = RunLogger(uri, run_id)
        self.last_registered: str | None = None  # "3", or "3@12" (mid-epoch, on a notice)
        self.reason: str | None = None  # why the next worker group starts
        self.attempts: dict[str, list[str]] | None = None
        self.failures = 0
        self._outbox: Outbox | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_outbox": None}  # a thread does not travel to the controller

    @property
    def outbox(self) -> Outbox:
        if self._outbox is None:
            self._outbox = Outbox()
        return self._outbox

    def after_controller_finish(self, result: Any) -> None:
        if self._outbox is not None and not self._outbox.flush(self.FLUSH_TIMEOUT_S):
            print(
                f"[infosam] {self._outbox.pending()} MLflow write(s) still queued after "
                f"{self.FLUSH_TIMEOUT_S:.0f}s ({self._outbox.last_error}); the epochs are "
                "reconciled from the final checkpoint by the driver",
                flush=True,
            )

    # ----------------------------------------------------------------- reports

    def after_report(self, training_report: Any, metrics: list[dict[str, Any]]) -> None:
        entry = metrics[0]  # rank 0's report carries the evaluation
        if "epoch" in entry:
            checkpoint = training_report.checkpoint
            self.outbox.put(f"epoch {entry['epoch']}", lambda: self._log_report(entry, checkpoint))

    def _log_report(self, entry: dict[str, Any], checkpoint: Any) -> None:
        epoch = int(entry["epoch"])
        if PARTIAL_KEY in entry:  # a checkpoint taken on a preemption notice, mid-epoch
            if checkpoint is not None:
                registered = f"{epoch}@{int(entry[PARTIAL_KEY])}"
                self.logger.set_tags(
                    {
                        "infosam.preemption_checkpoint": registered,
                        "infosam.preemption_checkpoint_time": entry.get("saved_at", ""),
                    }
                )
                self.last_registered = registered
            return
        logged = set(self.logger.logged_steps(MARKER_KEY))
        entries = [entry]
        if checkpoint is not None and any(e not in logged for e in range(epoch)):
            entries = checkpoint_history(checkpoint)
        log_epochs(self.logger, entries, logged)
        if checkpoint is not None:
            self.last_registered = str(epoch)

    # ----------------------------------------------------------------- attempts

    def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
        from ray.train.v2._internal.execution.controller.state import (
            ErroredState,
            PreemptingState,
            ResizingState,
            RestartingState,
        )

        if isinstance(current_state, (RestartingState, ErroredState)):
            error = current_state.training_failed_error
            kind = _failure_kind(error) if isinstance(current_state, RestartingState) else None
            self.outbox.put("failure", lambda: self._count_failure(error, kind))
        elif isinstance(current_state, ResizingState):
            self.outbox.put("resize", lambda: setattr(self, "reason", "resize"))
        elif isinstance(current_state, PreemptingState) and not isinstance(
            previous_state, PreemptingState
        ):
            info = current_state.preemption_info
            tags = {
                "infosam.preemption_notice": time.strftime(
                    "%Y-%m-%dT%H:%M:%S", time.gmtime(current_state.detected_at_s)
                ),
                "infosam.preempted_ranks": ",".join(map(str, info.preempted_ranks)),
            }
            self.outbox.put("preemption notice", lambda: self.logger.set_tags(tags))

    def after_worker_group_start(self, worker_group: Any) -> None:
        size = len(worker_group.get_workers())
        self.outbox.put("worker group start", lambda: self._group_started(size))

    def _group_started(self, size: int) -> None:
        if self.attempts is None:  # this controller's first group: continue a resumed run's tags
            tags = self.logger.client.get_run(self.logger.run_id).data.tags
            attempts = {
                key: [x for x in tags.get(f"infosam.{key}", "").split(",") if x]
                for key in ("world_sizes", "resumed_from_epochs", "restart_reasons")
            }
            if attempts["world_sizes"]:  # a run resumed by calling `fit` again
                logged = self.logger.logged_steps(MARKER_KEY)
                self.last_registered = str(max(logged)) if logged else None
                self.reason = "resumed"
            self.failures = int(tags.get("infosam.worker_failures", 0))
            self.attempts = attempts
        attempts = {k: list(v) for k, v in self.attempts.items()}  # kept only once logged
        attempts["world_sizes"].append(str(size))
        tags: dict[str, Any] = {"infosam.world_sizes": ",".join(attempts["world_sizes"])}
        if len(attempts["world_sizes"]) > 1:
            attempts["resumed_from_epochs"].append(self.last_registered or "none")
            attempts["restart_reasons"].append(self.reason or "unknown")
            tags["infosam.restarts"] = len(attempts["world_sizes"]) - 1
            for key in ("resumed_from_epochs", "restart_reasons"):
                tags[f"infosam.{key}"] = ",".join(attempts[key])
        self.logger.set_tags(tags)
        self.attempts, self.reason = attempts, None

    def _count_failure(self, error: Exception, kind: str | None) -> None:
        self.logger.set_tags(
            {
                "infosam.worker_failures": self.failures + 1,
                "infosam.last_failure": _describe(error),
            }
        )
        self.failures += 1
        if kind is not None:
            self.reason = kind


def _failure_kind(error: Exception) -> str:
    from ray.train.v2._internal.execution.worker_group.poll import _is_preempted_actor
    from ray.train.v2.api.exceptions import PreemptionError, WorkerGroupError

    if isinstance(error, PreemptionError):
        return "preemption"
    if isinstance(error, WorkerGroupError) and any(
        _is_preempted_actor(e) for e in error.worker_failures.values()
    ):
        return "preemption"
    return "failure"


def _describe(error: Exception) -> str:
    failures = getattr(error, "worker_failures", None)
    if not failures:
        text = str(error).strip().splitlines()
        return f"{type(error).__name__}: {text[0][:300] if text else ''}"
    parts = []
    for rank, exc in sorted(failures.items()):
        text = str(exc).strip().splitlines()
        parts.append(f"rank {rank}: {type(exc).__name__}: {text[0][:200] if text else ''}")
    return "; ".join(parts)[:1000]
