"""MLflow tracking: experiments with explicit artifact locations, runs, params, metrics, figures.

Everything goes through `MlflowClient` with explicit run ids (no global "active run"), so the
driver, a Ray Train rank-0 worker and a Tune trial can all log to the same run safely.
MLflow 3.17 refuses the bare `./mlruns` file store: the local default is SQLite.
"""

from __future__ import annotations

import contextlib
import os
import signal
import tempfile
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from mlflow.entities import Metric, Param, RunStatus
from mlflow.tracking import MlflowClient

from orchestrator.storage import has_password, is_remote, password_refusal

__all__ = [
    "EXPERIMENT_KIND",
    "Interrupted",
    "RunLogger",
    "TrackingError",
    "artifact_root",
    "check_tracking_server",
    "close_child_runs",
    "closing_on_exit",
    "default_tracking_uri",
    "ensure_experiment",
    "experiment_url",
    "open_run",
    "start_run",
    "view_hint",
]


_PARAM_MAX = 6000


# MLflow 3.17 opens an experiment without a kind in its GenAI overview (traces, tokens); this tag
# marks ours as model training. The 3.17 UI also keeps a per-browser GenAI / Model training
# switch, so the links we print carry `workflowType=machine_learning` (see `experiment_url`).
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def default_tracking_uri(storage_path: str | os.PathLike) -> str:
    """SQLite beside the runs, for a local storage.path only: SQLite cannot live in a bucket,
    and a database quietly kept on one node's disk would be lost with the node."""
    if is_remote(storage_path):
        raise TrackingError(
            f"storage.path={os.fspath(storage_path)} is object storage and no tracking URI is "
            "set: SQLite cannot live in a bucket. Set tracking.uri (or $MLFLOW_TRACKING_URI) "
            "to an MLflow server, http://<host>:5000, or sqlite:///<local abs path>/mlflow.db"
        )
    path = Path(storage_path).expanduser().resolve()
    path.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path / 'mlflow.db'}"


class TrackingError(ValueError):
    """The tracking URI is unusable (a password inside it, the file store) or the server is
    unreachable or refuses the credentials; the message says which and the fix."""


def resolve_tracking_uri(uri: str | None, storage_path: str | os.PathLike) -> str:
    """Config value, else $MLFLOW_TRACKING_URI (set on clusters), else SQLite under storage.
    A URI with a password in it is refused (TrackingError): every process prints and passes
    the URI around, credentials travel in MLflow's own variables instead."""
    where = "tracking.uri" if uri else "$MLFLOW_TRACKING_URI"
    uri = uri or os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        if has_password(uri):
            raise TrackingError(password_refusal(where))
        if uri.startswith(("http://", "https://", "sqlite:", "postgresql", "mysql", "databricks")):
            return uri
        if uri.startswith("file:") or not is_remote(uri):
            raise TrackingError(
                f"tracking.uri={uri!r}: MLflow 3.17 refuses the plain file store; use "
                "sqlite:///<abs path>/mlflow.db locally or http://<server>:5000 on a cluster"
            )
        return uri
    return default_tracking_uri(storage_path)


def check_tracking_server(uri: str, timeout_s: float = 5.0) -> None:
    """An MLflow server answers and accepts this process's credentials, in seconds, before
    anything starts (else MLflow's client retries for minutes, after Ray and the data are up).
    Local stores (sqlite, databases) need no server: nothing to check."""
    if not uri.startswith(("http://", "https://")):
        return
    from mlflow.exceptions import MlflowException
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        response = http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "POST",
            max_retries=0,
            timeout=timeout_s,
            raise_on_status=False,
            json={"max_results": 1},
        )
    except MlflowException as exc:
        reason = str(exc).split("\n")[0][:200]
        raise TrackingError(
            f"the MLflow server {uri} does not answer ({reason}): start it (`infosam tracking "
            "serve`), or check MLFLOW_TRACKING_URI / tracking.uri and the network"
        ) from None
    if response.status_code in (401, 403):
        who = os.environ.get("MLFLOW_TRACKING_USERNAME")
        raise TrackingError(
            f"the MLflow server {uri} refused the credentials (HTTP {response.status_code}, user "
            f"{who!r}): set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD to an account "
            "with access to the experiment"
        )
    if response.status_code >= 400:
        raise TrackingError(
            f"the MLflow server {uri} answered HTTP {response.status_code} to a search: is it an "
            "MLflow 3 tracking server?"
        )


def artifact_root(storage_path: str, experiment: str, tracking_uri: str) -> str | None:
    """Where a new experiment keeps its artifacts. A tracking server decides for itself (its
    `--artifacts-destination`, e.g. s3://...; clients upload through it); otherwise they go
    beside the runs' checkpoints, in the bucket when storage is one (never MLflow's default
    ./mlruns, which is a different folder in every process's working directory)."""
    if tracking_uri.startswith(("http://", "https://")):
        return None
    if is_remote(storage_path):
        return "/".join([str(storage_path).rstrip("/"), "mlartifacts", experiment])
    return str(Path(storage_path).expanduser().resolve() / "mlartifacts" / experiment)


def ensure_experiment(client: MlflowClient, name: str, artifact_root: str | None) -> str:
    """Experiment id, creating it with an explicit artifact location (workers change cwd)."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if artifact_root:
        location = (
            artifact_root if is_remote(artifact_root) else Path(artifact_root).resolve().as_uri()
        )
    try:
        return client.create_experiment(name, artifact_location=location, tags=EXPERIMENT_KIND)
    except Exception:  # created concurrently by another process
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def experiment_url(uri: str, experiment_id: str, run_id: str | None = None) -> str | None:
    """The MLflow UI page of an experiment's runs table (or one run); None for a local store.

    `workflowType=machine_learning` opens the runs table, not 3.17's GenAI overview.
    """
    if not uri.startswith(("http://", "https://")):
        return None
    page = f"runs/{run_id}" if run_id else "runs"
    return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/{page}?workflowType=machine_learning"


def view_hint(uri: str, run_id: str) -> str:
    """Where to look at a run: its UI link on a server, the `mlflow ui` command for a file."""
    try:
        exp_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    except Exception:  # the server is gone: still say which run
        return f"run {run_id} in {uri}"
    url = experiment_url(uri, exp_id, run_id)
    if url:
        return url
    page = experiment_url("http://127.0.0.1:5000", exp_id)
    return f"mlflow ui --backend-store-uri {uri}  then open {page}"


def start_run(
    uri: str,
    experiment: str,
    run_name: str | None,
    *,
    artifact_root: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> RunLogger:
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, experiment, artifact_root)
    all_tags = dict(tags or {})
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    return RunLogger(uri, run.info.run_id)


def search_runs(uri: str, experiment: str | None, query: str, *, experiment_id: str | None = None):
    """Runs of one experiment (by name or id) matching an MLflow filter string; [] when the
    experiment does not exist yet. Every search of the project's runs goes through here."""
    client = MlflowClient(uri)
    if experiment_id is None:
        exp = client.get_experiment_by_name(experiment) if experiment else None
        if exp is None:
            return []
        experiment_id = exp.experiment_id
    return client.search_runs([experiment_id], query, max_results=10_000)


def open_parent_run(
    uri: str,
    experiment: str,
    run_name: str,
    *,
    tags: dict[str, str],
    params: dict[str, Any],
    artifact_root: str | None,
    resume_run_id: str | None = None,
) -> tuple[RunLogger, bool]:
    """The parent run of a benchmark or a sweep: (logger, resumed). A new one gets `params`;
    a resumed one keeps those it was opened with (MLflow params are immutable)."""
    parent, resumed = open_run(
        uri,
        experiment,
        run_name,
        resume_run_id=resume_run_id,
        artifact_root=artifact_root,
        tags=tags,
    )
    if not resumed:
        parent.log_params(params)
    return parent, resumed


def open_run(
    uri: str,
    experiment: str,
    run_name: str | None,
    *,
    resume_run_id: str | None = None,
    artifact_root: str | None = None,
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
) -> tuple[RunLogger, bool]:
    """The one way runs are opened: (logger, resumed).

    With `resume_run_id` (a resumed training run, benchmark or cell) that run is RUNNING again
    and gets `tags`; otherwise a new run is created. Used by `fit`, the benchmark, its cells and
    the sweeps, so a resumed run never becomes a second run.
    """
    if resume_run_id:
        logger = RunLogger(uri, resume_run_id)
        logger.client.update_run(resume_run_id, status="RUNNING")
        if tags:
            logger.set_tags(tags)
        return logger, True
    logger = start_run(
        uri,
        experiment,
        run_name,
        artifact_root=artifact_root,
        tags=tags,
        parent_run_id=parent_run_id,
    )
    return logger, False


class RunLogger:
    """Logging to one MLflow run by id; picklable (it only holds the URI and the id)."""

    def __init__(self, uri: str, run_id: str) -> None:
        self.uri, self.run_id = uri, run_id
        self._client: MlflowClient | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"uri": self.uri, "run_id": self.run_id, "_client": None}

    @property
    def client(self) -> MlflowClient:
        if self._client is None:
            self._client = MlflowClient(self.uri)
        return self._client

    def log_params(self, params: dict[str, Any]) -> None:
        items = [Param(k, str(v)[:_PARAM_MAX]) for k, v in params.items()]
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i : i + 100])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        now = int(time.time() * 1000)
        items = [Metric(k, float(v), now, step) for k, v in metrics.items() if v == v]  # skip NaN
        for i in range(0, len(items), 1000):
            self.client.log_batch(self.run_id, metrics=items[i : i + 1000])

    def logged_steps(self, key: str) -> list[int]:
        return [m.step for m in self.client.get_metric_history(self.run_id, key)]

    def set_tags(self, tags: dict[str, Any]) -> None:
        for k, v in tags.items():
            self.client.set_tag(self.run_id, k, str(v))

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(path), artifact_path)

    def log_text(self, text: str, name: str) -> None:
        self.client.log_text(self.run_id, text, name)

    def log_figure(self, figure: Any, name: str) -> None:
        """Log a matplotlib figure as a PNG artifact, then release it."""
        try:
            self.client.log_figure(self.run_id, figure, name)
        finally:
            import matplotlib.pyplot as plt

            plt.close(figure)

    def log_rows(self, rows: list[dict[str, Any]], name: str) -> None:
        """Rows (dicts) as a CSV artifact, e.g. `scores/test_scores.csv`."""
        import pandas as pd

        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            pd.DataFrame(rows).to_csv(path, index=False)
            parent = str(Path(name).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def log_image_file(self, image: Any, name: str) -> None:
        """A PIL image as a PNG artifact."""
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / Path(name).name
            image.save(path)
            parent = str(Path(name).parent)
            self.log_artifact(path, None if parent == "." else parent)

    def finish(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status)

    def status(self) -> str:
        return self.client.get_run(self.run_id).info.status

    def metric_history(self, key: str) -> list[tuple[int, float]]:
        return [(m.step, m.value) for m in self.client.get_metric_history(self.run_id, key)]

    def metric_keys(self) -> Iterable[str]:
        return self.client.get_run(self.run_id).data.metrics.keys()


RUN_FAILED = RunStatus.to_string(RunStatus.FAILED)


RUN_FINISHED = RunStatus.to_string(RunStatus.FINISHED)


RUN_KILLED = RunStatus.to_string(RunStatus.KILLED)


def close_child_runs(
    uri: str,
    parent_run_id: str,
    status: str,
    *,
    tags: dict[str, str] | None = None,
    error: str = "",
) -> int:
    """Mark the RUNNING child runs of `parent_run_id` (those with `tags`, if given) `status`.

    Returns how many it closed. With `error`, every matching child not FINISHED is tagged
    `infosam.error` (also one that already closed itself FAILED).
    """
    client = MlflowClient(uri)
    exp_id = client.get_run(parent_run_id).info.experiment_id
    query = f"tags.mlflow.parentRunId = '{parent_run_id}'"
    for key, value in (tags or {}).items():
        query += f" and tags.`{key}` = '{value}'"
    query += (
        " and attributes.status != 'FINISHED'" if error else " and attributes.status = 'RUNNING'"
    )
    closed = 0
    for run in search_runs(uri, None, query, experiment_id=exp_id):
        if error:
            client.set_tag(run.info.run_id, "infosam.error", error[:5000])
        if run.info.status == "RUNNING":
            client.set_terminated(run.info.run_id, status)
            closed += 1
    return closed


class Interrupted(KeyboardInterrupt):
    """SIGTERM (what `ray job stop` and Kubernetes send) raised in the main thread.

    A KeyboardInterrupt, so it unwinds through Ray's blocking calls like Ctrl+C does and every
    `finally` and run-closing handler runs; the process then exits with the usual status.
    """


def _raise_interrupted(signum: int, frame: Any) -> None:
    raise Interrupted(f"signal {signal.Signals(signum).name}")


@contextlib.contextmanager
def closing_on_exit(
    logger: RunLogger | None,
    *,
    children: bool = True,
    label: str = "[infosam]",
    hint: str = "",
    signals: bool = True,
) -> Iterator[None]:
    """Leave no run RUNNING: SIGTERM/SIGINT end the run (and its RUNNING children) KILLED,
    an exception ends them FAILED; a normal exit leaves closing to the caller.

    With `signals`, SIGTERM becomes `Interrupted` while the block runs (main thread only; the
    previous handler is restored after); pass False inside a Ray worker. Closing is best
    effort: a tracking server that is down must not hide the original error.
    """
    in_main = signals and threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _raise_interrupted) if in_main else None
    try:
        yield
    except BaseException as exc:
        if logger is not None:
            status = RUN_KILLED if isinstance(exc, KeyboardInterrupt) else RUN_FAILED
            closed = 0
            with contextlib.suppress(Exception):
                if children:
                    closed = close_child_runs(logger.uri, logger.run_id, status)
                if logger.status() == "RUNNING":
                    logger.finish(status)
            extra = f" and {closed} open child run(s)" if closed else ""
            print(
                f"{label} stopped ({type(exc).__name__}): MLflow run {logger.run_id}{extra} "
                f"marked {status}{'; ' + hint if hint else ''}",
                flush=True,
            )
        raise
    finally:
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
