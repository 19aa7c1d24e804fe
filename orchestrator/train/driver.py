"""InfoSAM training on Ray Train (`TorchTrainer`), checkpointed every epoch, tracked in MLflow.

Driver (`fit`): prepares data, creates the MLflow run, builds Ray datasets and the TorchTrainer,
marks the run FINISHED or FAILED. Workers (`train_loop_per_worker`): teacher + student + relation
module, DDP over the trainable parts, the `infosam.engine` step, validation, `ray.train.report`
with a checkpoint every epoch. Epoch metrics are logged to MLflow by the controller once it has
registered the report (`orchestrator.train.epoch_log.EpochLogger`), so each step is logged exactly once
whatever the timing of a failure; rank 0 logs only the run's params and images. Train local
mode has no controller: there rank 0 logs each epoch after its checkpoint is written.
"""

from __future__ import annotations

import contextlib
import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.cluster.ray_env import in_ray_worker, init_ray
from orchestrator.config import (
    Config,
    config_changes,
    flatten,
    result_view,
    resume_refusal,
)
from orchestrator.storage import (
    ResultsDir,
    atomic_write,
    atomic_write_json,
    is_remote,
    join,
    resolve_location,
)
from orchestrator.tracking.datasets import log_split_inputs
from orchestrator.tracking.runs import (
    RunLogger,
    check_tracking_server,
    closing_on_exit,
    resolve_tracking_uri,
)
from orchestrator.tracking.runs import artifact_root as tracking_artifact_root
from orchestrator.tracking.runs import open_run as tracking_open_run
from orchestrator.train.checkpoints import (
    HISTORY_FILE,
    checkpoint_scores,
    log_student_model,
)
from orchestrator.train.epoch_log import checkpoint_history, log_epochs
from orchestrator.train.evaluation import (
    log_category_results,
)
from orchestrator.train.inputs import SharedData, data_counts, eval_unit, prepare_data
from orchestrator.train.models import (
    teacher_hash,
)
from orchestrator.train.worker import check_full_batches, train_loop_per_worker


@dataclass
class FitResult:
    run_id: str | None
    tracking_uri: str | None
    storage_dir: str
    metrics: dict[str, Any]
    checkpoint_dir: str | None
    history: list[dict[str, Any]] = field(default_factory=list)
    # Seconds per phase: start-up (config, teacher hash, Ray, MLflow), data, training and
    # evaluation (sums over epochs, from the workers), Train overhead (worker start, reports,
    # checkpoints) and logging (curves, closing the run).
    timings: dict[str, float] = field(default_factory=dict)
    # the last epoch's test split, one row per model and image (see `evaluate_split`)
    test_scores: list[dict[str, Any]] = field(default_factory=list)
    # the run's MLflow model (`models:/<model_id>`), when it logged one (`tracking.log_model`)
    model_uri: str | None = None


def _storage(cfg: Config, name: str | None, run_name: str | None) -> tuple[str, str]:
    storage = resolve_location(cfg.storage.path)
    if not is_remote(storage):
        Path(storage).mkdir(parents=True, exist_ok=True)
    name = (
        name
        or cfg.storage.name
        or f"{run_name or 'train'}-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
    )
    return storage, name


def _working_copy(cfg: Config, storage: str, name: str) -> ResultsDir:
    """The run's folder: `storage/name` on disk, or a local working copy of it when storage is a
    bucket, holding what a resume reads (run_config.json, mlflow_run_id and, in Train local
    mode, the newest complete checkpoint; multi-worker checkpoints stay Ray Train's)."""
    results = ResultsDir(join(storage, name))
    if results.remote:
        import shutil

        shutil.rmtree(results.local, ignore_errors=True)  # only what the bucket holds counts
        results.pull_files([RUN_CONFIG_FILE, MLFLOW_RUN_ID_FILE])
        if cfg.scaling.max_workers == 0:
            results.pull_latest("checkpoint_epoch_*", HISTORY_FILE)
    return results


RUN_CONFIG_FILE = "run_config.json"
MLFLOW_RUN_ID_FILE = "mlflow_run_id"


def record_run_config(run_dir: Path, cfg: Config, what: str, allow: bool) -> list[str]:
    """Check a resumed run against the configuration it was started with (its
    `run_config.json`, else its newest checkpoint's config.yaml), then record this one; returns
    the changes taken (`key: old -> new`). Refused (ConfigError) only when the run has a
    checkpoint to resume from: a run that failed before its first checkpoint starts afresh."""
    recorded = None
    path = run_dir / RUN_CONFIG_FILE
    saved = sorted(run_dir.glob("checkpoint_*/config.yaml"), key=lambda p: p.stat().st_mtime)
    if path.is_file():
        recorded = json.loads(path.read_text())
    elif saved:  # a run started before run_config.json existed
        import yaml

        recorded = result_view(Config.from_dict(yaml.safe_load(saved[-1].read_text())))
    now = result_view(cfg)
    changes = config_changes(recorded, now)
    resumable = any((p.parent / "history.json").is_file() for p in saved)
    if changes and resumable and not allow:
        raise resume_refusal(what, changes)
    if recorded != now:
        atomic_write_json(path, now, indent=2)
    return changes


def _tracking_uri(cfg: Config) -> str:
    return resolve_tracking_uri(cfg.tracking.uri, cfg.storage.path)


def open_training_run(
    cfg: Config,
    *,
    run_name: str,
    run_dir: Path | None,
    parent_run_id: str | None,
    tags: dict[str, str],
    shared: SharedData,
) -> RunLogger:
    """The run's MLflow run: re-opened (RUNNING again) when this Train run resumes, else new."""
    uri = _tracking_uri(cfg)
    run_id_file = run_dir / MLFLOW_RUN_ID_FILE if run_dir else None
    previous = run_id_file.read_text().strip() if run_id_file and run_id_file.is_file() else None
    logger, resumed = tracking_open_run(
        uri,
        cfg.tracking.experiment,
        run_name,
        resume_run_id=previous,
        artifact_root=tracking_artifact_root(cfg.storage.path, cfg.tracking.experiment, uri),
        tags=tags
        if previous
        else {
            "infosam.eval_protocol": cfg.optim.eval_protocol,
            "infosam.dataset": cfg.data.dataset,
            "infosam.tuning": cfg.tuning.method,
            "infosam.eval_unit": eval_unit(shared.manifest),
            **tags,
        },
        parent_run_id=parent_run_id,
    )
    if resumed:
        return logger
    if run_id_file is not None:
        run_id_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(run_id_file, logger.run_id)
    logger.log_params(flatten(cfg.to_dict()))
    logger.log_params(
        {
            "teacher_sha256": shared.teacher_sha256 or "random-init",
            "data.manifest_shards": len(shared.manifest["shards"]),
            "all_gather_relations": cfg.scaling.all_gather_relations,
            **data_counts(cfg, shared.manifest),
        }
    )
    logger.log_text(cfg.to_yaml(), "config.yaml")
    roles = {r: getattr(cfg.data, f"{r}_split") for r in ("train", "val", "test")}
    log_split_inputs(uri, logger.run_id, shared.data_dir, shared.manifest, roles)
    manifest = {k: v for k, v in shared.manifest.items() if k != "shards"}
    logger.log_text(json.dumps(manifest, indent=2, default=str), "data_manifest.json")
    return logger


class Stopwatch:
    """Seconds per named phase, summed over every `with watch("phase"):` block."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = self.seconds.get(phase, 0.0) + time.perf_counter() - t0


@dataclass
class RunPlan:
    """Where a run lives and what it resumes: decided before any data is read."""

    storage: str
    name: str
    run_dir: Path | None
    results: ResultsDir  # run_dir as a folder that may live in a bucket
    changes: list[str]  # configuration changes a resume was allowed to take
    teacher_sha: str | None
    run_name: str | None
    parent_run_id: str | None


def fit(
    cfg: Config,
    *,
    logger: RunLogger | None = None,
    quiet: bool = False,
    callbacks: list | None = None,
    shared: SharedData | None = None,
    run_name: str | None = None,
    storage_name: str | None = None,
    parent_run_id: str | None = None,
    tags: dict[str, str] | None = None,
    train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
    allow_config_change: bool = False,
) -> FitResult:
    """Train one configuration on Ray Train; returns final metrics, the last checkpoint and,
    for a run of its own, its MLflow model (`tracking.log_model`).

    Run state stays out of `cfg`: `run_name` (MLflow), `storage_name` (Ray Train's run
    directory; re-using one resumes it), `parent_run_id` and `tags` are arguments, defaulting to
    `tracking.run_name`, `storage.name`, `tracking.parent_run_id`. `shared` skips data prep;
    a resumed run keeps its first config (`record_run_config`) unless `allow_config_change`."""
    watch = Stopwatch()
    with watch("startup_s"):
        plan = _resolve_run(cfg, quiet, shared, logger, run_name, storage_name, parent_run_id)
        if plan.run_dir is not None:
            what = f"run {plan.name!r} in {plan.storage}"
            plan.changes = record_run_config(plan.run_dir, cfg, what, allow_config_change)
    with watch("data_s"):
        if shared is None:
            shared = prepare_data(cfg, teacher_sha256=plan.teacher_sha, quiet=quiet)
    owns_logger = logger is None
    with watch("startup_s"):
        if logger is None:
            logger = _open_run(cfg, plan, shared, tags)
        _persist_run_files(plan)
    # SIGTERM/Ctrl-C end the run KILLED, an error FAILED; a caller's run is the caller's to close
    with closing_on_exit(
        logger if owns_logger else None, children=False, signals=not in_ray_worker()
    ):
        with watch("startup_s"):
            trainer = _trainer_for(cfg, shared, plan, logger, callbacks, train_loop)
        with watch("fit_s"):
            result = trainer.fit()
        with watch("logging_s"):
            checkpoint = _lasting_checkpoint(result, plan, cfg)
            want_model = wants_model(cfg, plan.parent_run_id, owns_logger)
            history, test_scores, model_uri = _collect(result, logger, cfg, checkpoint, want_model)
            if owns_logger:
                logger.finish("FINISHED")
    return FitResult(
        run_id=logger.run_id,
        tracking_uri=logger.uri,
        storage_dir=join(plan.storage, plan.name),
        metrics=dict(result.metrics or {}),
        checkpoint_dir=checkpoint,
        history=history,
        timings=_phase_timings(watch.seconds, history),
        test_scores=test_scores,
        model_uri=model_uri,
    )


def wants_model(cfg: Config, parent_run_id: str | None, own_run: bool = True) -> bool:
    """`tracking.log_model`: null logs a model for a run of its own, not for a benchmark's cell
    or a sweep's trial (a child run, or a run its caller opened: those log their best one at
    the end); true or false for every run."""
    if cfg.tracking.log_model is None:
        return parent_run_id is None and own_run
    return bool(cfg.tracking.log_model)


def _trainer_for(
    cfg: Config,
    shared: SharedData,
    plan: RunPlan,
    logger: RunLogger,
    callbacks: list | None,
    train_loop: Callable[[dict[str, Any]], None],
) -> Any:
    """The TorchTrainer of this run, once every worker count it may scale to gets full batches."""
    if shared.train_cache is not None:
        logger.set_tags({"infosam.teacher_cache": shared.train_cache["location"]})
    sc = cfg.scaling
    check_full_batches(cfg, shared.n_train, list(range(sc.min_workers, sc.max_workers + 1)))
    return make_trainer(
        cfg,
        shared,
        name=plan.name,
        storage=plan.storage,
        run_dir=plan.run_dir,
        mlflow_run=(logger.uri, logger.run_id),
        callbacks=callbacks,
        train_loop=train_loop,
    )


def _resolve_run(
    cfg: Config,
    quiet: bool,
    shared: SharedData | None,
    logger: RunLogger | None,
    run_name: str | None,
    storage_name: str | None,
    parent_run_id: str | None,
) -> RunPlan:
    """Validate, check the tracking server (seconds, before Ray and the data), start Ray, and
    name the run's storage folder."""
    cfg.validate()
    if not quiet:
        print("[infosam] resolved config:\n" + cfg.to_yaml(), flush=True)
    run_name = run_name or cfg.tracking.run_name
    teacher_sha = shared.teacher_sha256 if shared is not None else teacher_hash(cfg)
    if teacher_sha is None:
        print(
            "[infosam] WARNING: model.checkpoint is null: the teacher is randomly initialised",
            flush=True,
        )
    if logger is None:
        check_tracking_server(_tracking_uri(cfg))
    init_ray()
    storage, name = _storage(cfg, storage_name, run_name)
    results = _working_copy(cfg, storage, name)
    return RunPlan(
        storage=storage,
        name=name,
        run_dir=results.local,
        results=results,
        changes=[],
        teacher_sha=teacher_sha,
        run_name=run_name,
        parent_run_id=parent_run_id or cfg.tracking.parent_run_id,
    )


def _open_run(
    cfg: Config, plan: RunPlan, shared: SharedData, tags: dict[str, str] | None
) -> RunLogger:
    """The run's own MLflow run (new, or the one its storage folder names)."""
    return open_training_run(
        cfg,
        run_name=plan.run_name or plan.name,
        run_dir=plan.run_dir,
        parent_run_id=plan.parent_run_id,
        tags={
            "infosam.storage_name": plan.name,
            # its params are those it started with (MLflow keeps a param's first value)
            **({"infosam.config_changes": "; ".join(plan.changes)[:5000]} if plan.changes else {}),
            **(tags or {}),
        },
        shared=shared,
    )


def _persist_run_files(plan: RunPlan) -> None:
    """run_config.json and mlflow_run_id into the bucket, when the run folder is one."""
    for small in (RUN_CONFIG_FILE, MLFLOW_RUN_ID_FILE):
        if plan.results.remote and (plan.results.local / small).is_file():
            plan.results.push(plan.results.local / small)


def _lasting_checkpoint(result: Any, plan: RunPlan, cfg: Config) -> str | None:
    """Where the last checkpoint lives for good: Ray Train's path, or, in Train local mode on
    a bucket, the bucket copy of the working copy's folder."""
    if result.checkpoint is None:
        return None
    if plan.results.remote and cfg.scaling.max_workers == 0:
        return plan.results.where(result.checkpoint.path)
    if is_remote(plan.storage) and not is_remote(result.checkpoint.path):
        # Ray's path is inside its pyarrow filesystem ("bkt/runs/..."): give back the URI a
        # user pastes into `infosam evaluate --checkpoint`, as the MLflow tag shows it
        scheme = str(plan.storage).split("://", 1)[0]
        return f"{scheme}://{result.checkpoint.path.lstrip('/')}"
    return result.checkpoint.path


def _collect(
    result: Any, logger: RunLogger, cfg: Config, checkpoint: str | None, want_model: bool
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str | None]:
    """(history, test scores, MLflow model URI) from the last checkpoint; fills any epoch a
    driver crash left unlogged (idempotent), logs the scores, curves, the checkpoint's path
    and, when wanted, the student as the run's MLflow model."""
    history: list[dict[str, Any]] = []
    test_scores: list[dict[str, Any]] = []
    if result.checkpoint is not None:
        history = checkpoint_history(result.checkpoint)
        log_epochs(logger, history)
        test_scores = checkpoint_scores(result.checkpoint)
        if test_scores:
            logger.log_rows(test_scores, "scores/test_scores.csv")
            log_category_results(logger, test_scores)
    with contextlib.suppress(Exception):
        _log_curves(logger, cfg)
    if checkpoint is None:
        return history, test_scores, None
    logger.set_tags({"infosam.checkpoint": checkpoint})
    if not want_model:
        return history, test_scores, None
    return history, test_scores, log_student_model(logger.uri, logger.run_id, checkpoint)


def _phase_timings(seconds: dict[str, float], history: list[dict[str, Any]]) -> dict[str, float]:
    """The driver's phases plus the workers' training and evaluation time; Train's overhead is
    what `trainer.fit()` took beyond those."""
    timings = {k: v for k, v in seconds.items() if k != "fit_s"}
    timings["train_s"] = sum(float(h.get("time/train_s", 0.0)) for h in history)
    timings["eval_s"] = sum(float(h.get("time/eval_s", 0.0)) for h in history)
    fit_s = seconds.get("fit_s", 0.0)
    timings["train_overhead_s"] = max(fit_s - timings["train_s"] - timings["eval_s"], 0.0)
    return timings


def make_trainer(
    cfg: Config,
    shared: SharedData,
    *,
    name: str,
    storage: str,
    run_dir: Path | None,
    mlflow_run: tuple[str, str] | None,
    callbacks: list | None = None,
    train_loop: Callable[[dict[str, Any]], None] = train_loop_per_worker,
) -> Any:
    """The `TorchTrainer` of one run: worker loop, scaling, datasets, checkpoints, failures.

    With Train workers and an MLflow run, `EpochLogger` logs each registered epoch from the
    controller. `train_loop` wraps or replaces the worker loop (fault injection, profiling).
    """
    import ray.train
    from ray.train import CheckpointConfig, FailureConfig, RunConfig
    from ray.train.torch import TorchTrainer

    from orchestrator.train.epoch_log import EpochLogger

    sc = cfg.scaling
    resources = {"CPU": sc.cpus_per_worker, **sc.worker_resources}
    if sc.use_gpu:
        resources["GPU"] = sc.gpus_per_worker
    callbacks = list(callbacks or [])
    if mlflow_run is not None and sc.max_workers > 0:
        callbacks.append(EpochLogger(*mlflow_run))
    return TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.to_dict(),
            "mlflow": mlflow_run,
            "n_train": shared.n_train,
            "teacher_sha256": shared.teacher_sha256,
            "local_checkpoint_root": str(run_dir) if sc.max_workers == 0 and run_dir else None,
            # Train local mode persists no checkpoint itself: on a bucket, the loop sends each
            "checkpoint_upload": join(storage, name)
            if sc.max_workers == 0 and is_remote(storage)
            else None,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=tuple(sc.num_workers) if sc.elastic else sc.num_workers,
            use_gpu=sc.use_gpu,
            resources_per_worker=resources if sc.max_workers else None,
            elastic_resize_monitor_interval_s=sc.elastic_resize_interval_s,
        ),
        datasets=shared.datasets,
        dataset_config=ray.train.DataConfig(datasets_to_split=["train"]),
        run_config=RunConfig(
            name=name,
            storage_path=storage,
            failure_config=FailureConfig(
                max_failures=sc.max_failures, max_preemption_failures=sc.max_preemption_failures
            ),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def _log_curves(logger: RunLogger, cfg: Config) -> None:
    keys = [
        k
        for k in logger.metric_keys()
        if k.startswith("train/")
        and k not in ("train/images_per_s", "train/lr", "train/empty_prompts")
    ]
    keys += [k for k in logger.metric_keys() if k.startswith("val/") and "zero_shot" not in k]
    history = {k: logger.metric_history(k) for k in keys}
    from orchestrator.plots import loss_curve_figure

    fig = loss_curve_figure(history, title=f"{cfg.tuning.method} on {cfg.data.dataset}")
    logger.log_figure(fig, "plots/loss_curve.png")
