"""Ray Tune search over InfoSAM loss weights, PEFT method and capacity, and learning rate.

Ray 2.60 pattern: `Tuner(trainer)` is gone, so each trial is a Tune *function* trainable that
builds and fits a `TorchTrainer` (through `orchestrator.train.driver.fit`) with `TuneReportCallback`
in the Train RunConfig, so every epoch's report reaches Tune and ASHA can stop weak trials.
Every trial is an MLflow run nested under one parent run per sweep; a driver-side callback
closes runs of trials Tune stopped (FINISHED, tagged stopped early) or that crashed (FAILED).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.cluster.ray_env import concurrency_cap
from orchestrator.config import (
    Config,
    ConfigError,
    flatten,
    load_with_section,
)
from orchestrator.objective import OBJECTIVE_KEY, Objective, pareto_front
from orchestrator.plots import front_plot, sweep_scatter
from orchestrator.storage import ResultsDir, atomic_write, is_remote, join, resolve_location
from orchestrator.tracking.runs import artifact_root as tracking_artifact_root
from orchestrator.tracking.runs import (
    check_tracking_server,
    closing_on_exit,
    open_parent_run,
    open_run,
    resolve_tracking_uri,
    search_runs,
)

TRIAL_TAG = "infosam.trial_id"


@dataclass
class SweepConfig:
    name: str = "sweep"
    num_samples: int = 8
    metric: str = "val/iou"
    mode: str = "max"
    search: str = "auto"  # auto (optuna if installed, else random) | random | optuna
    scheduler: str = "asha"  # asha | none
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: int = 2
    # default: no cap on a cluster (resources and the autoscaler decide); on a Ray this process
    # started, as many trials as its CPUs hold
    max_concurrent_trials: int | None = None
    # Times Tune re-runs a failed trial (a lost node under its driver, or an error); a re-run
    # resumes the trial's checkpoint and MLflow run. Train workers lost on spot nodes are
    # handled inside the trial (`scaling.max_failures`) and do not count here.
    trial_retries: int = 1
    seed: int = 0  # of the search: the same sweep config samples the same trials
    # key -> {type: loguniform|uniform|choice|grid, low, high, values, off: bool}
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Rank trials by several metrics (`orchestrator.objective`): {weights: {metric: w},
    # floors: {metric: minimum}}; when set, trials are ranked (and ASHA/Optuna steered) by
    # the reported `objective`, and the non-dominated trials are listed (front.csv).
    objective: dict[str, Any] = field(default_factory=dict)
    # Register the best trial's student as MLflow model `<name>-<dataset>` with alias
    # `champion` (trials log models only with tracking.log_model=true)
    register_model: bool = True

    def ranking(self) -> Objective | None:
        return Objective.from_spec(self.objective) if self.objective else None

    def ranking_metrics(self) -> list[str]:
        """The objective's component metrics (columns of the trials table, not sampled values)."""
        ranking = self.ranking()
        return ranking.metrics if ranking else []


def load_sweep(
    path: str | os.PathLike | None, overrides: list[str] | None = None
) -> tuple[SweepConfig, Config]:
    """The `tune:` section and the base config every trial starts from, checked."""
    tcfg, base = load_with_section(path, overrides, "tune", SweepConfig)
    flat = flatten(base.to_dict())
    for key in tcfg.space:
        if key not in flat:
            raise ConfigError(
                f"tune.space key {key!r} is not a config key (e.g. loss.weight_distillation)"
            )
    if base.scaling.max_workers < 1:
        raise ConfigError(
            "scaling.num_workers=0 (Train local mode) cannot run inside a Tune trial: Ray Train's "
            "API is not available there; use scaling.num_workers >= 1"
        )
    if tcfg.mode not in ("max", "min"):
        raise ConfigError("tune.mode must be max or min")
    if tcfg.objective:
        _check_objective(tcfg, base)
        tcfg.metric, tcfg.mode = OBJECTIVE_KEY, "max"
    return tcfg, base


def _check_objective(tcfg: SweepConfig, base: Config) -> None:
    """Every metric of `tune.objective` is one a trial reports each epoch."""
    try:
        objective = Objective.from_spec(tcfg.objective)
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    known = [f"val/{m}" for m in base.optim.metrics] + [
        f"val/retention/{r}/{m}" for r in base.data.retention for m in base.optim.metrics
    ]
    unknown = [m for m in objective.metrics if m not in known]
    if unknown:
        raise ConfigError(
            f"tune.objective: {unknown} is not reported by the trials; they report {known} "
            "(a retention set is scored when it is listed in data.retention, e.g. "
            "--set 'data.retention=[general]')"
        )


def search_space(space: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """YAML space -> Tune domains. `off: true` adds `<key>__off` (a term switched off = weight 0)."""
    from ray import tune

    out: dict[str, Any] = {}
    for key, spec in space.items():
        kind = spec.get("type", "choice")
        if kind == "loguniform":
            out[key] = tune.loguniform(float(spec["low"]), float(spec["high"]))
        elif kind == "uniform":
            out[key] = tune.uniform(float(spec["low"]), float(spec["high"]))
        elif kind == "choice":
            out[key] = tune.choice(list(spec["values"]))
        elif kind == "grid":
            out[key] = tune.grid_search(list(spec["values"]))
        else:
            raise ConfigError(
                f"tune.space.{key}: unknown type {kind!r} (loguniform, uniform, choice, grid)"
            )
        if spec.get("off"):
            out[f"{key}__off"] = tune.choice([False, True])
    return out


def trial_values(sampled: dict[str, Any]) -> dict[str, Any]:
    """Sampled Tune config -> typed `section.key` values (a switched-off term gets weight 0)."""
    out = {}
    for key, value in sampled.items():
        if key.endswith("__off"):
            continue
        out[key] = 0.0 if sampled.get(f"{key}__off") else _py(value)
    return out


@dataclass(frozen=True)
class SweepContext:
    """What every trial of a sweep needs besides its sampled values (`tune.with_parameters`)."""

    base: Config
    name: str
    parent_run_id: str
    uri: str
    artifact_root: str | None
    objective: Objective | None = None


def _trial(config: dict[str, Any], context: SweepContext) -> None:
    """One Tune trial: a TorchTrainer fit of the base config with the sampled values."""
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    from orchestrator.train.driver import fit

    trial_id = tune.get_context().get_trial_id()
    cfg = context.base.with_values(trial_values(config))
    report = _objective_report(context.objective) if context.objective else TuneReportCallback()
    # A retried trial (its driver's node lost, or an error, `tune.trial_retries`) continues its
    # MLflow run and, through the same storage name, its Train run's last checkpoint.
    logger, resumed = open_run(
        context.uri,
        cfg.tracking.experiment,
        f"trial-{trial_id}",
        resume_run_id=_trial_run_id(context, trial_id),
        artifact_root=context.artifact_root,
        tags={TRIAL_TAG: trial_id, "infosam.sweep": context.name},
        parent_run_id=context.parent_run_id,
    )
    if resumed:
        previous = logger.client.get_run(logger.run_id).data.tags.get("infosam.trial_attempts")
        logger.set_tags({"infosam.trial_attempts": int(previous or 1) + 1})
    logger.log_params({f"sampled.{k}": v for k, v in config.items()})
    # Errors and Tune's own stops (ASHA, max_t) surface here as exceptions that look alike;
    # the driver-side callback knows which happened and closes the run as FAILED or FINISHED.
    fit(
        cfg,
        logger=logger,
        quiet=True,
        callbacks=[report],
        storage_name=f"{context.name}/trial-{trial_id}",
    )
    logger.finish("FINISHED")


def _objective_report(objective: Objective) -> Any:
    """Tune's report callback with the declared objective added to every epoch's metrics."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class ObjectiveReport(TuneReportCallback):
        def after_report(self, run_context: Any, metrics: list, checkpoint: Any) -> None:
            first = dict(metrics[0])
            first[OBJECTIVE_KEY] = objective.value(first)
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return ObjectiveReport()


def _trial_run_id(context: SweepContext, trial_id: str) -> str | None:
    """The MLflow run an earlier attempt of this trial opened under this sweep, if any."""
    runs = search_runs(
        context.uri,
        context.base.tracking.experiment,
        f"tags.`{TRIAL_TAG}` = '{trial_id}' and tags.`mlflow.parentRunId` = "
        f"'{context.parent_run_id}'",
    )
    return runs[0].info.run_id if runs else None


class _MlflowTrialStatus:
    """Tune callback (driver side): close MLflow runs of stopped or crashed trials."""

    def __new__(cls, uri: str, experiment: str, epochs: int):
        from ray.tune import Callback

        class Impl(Callback):
            def _close(self, trial: Any, status: str, tags: dict[str, str]) -> None:
                from mlflow.tracking import MlflowClient

                client = MlflowClient(uri)
                for run in search_runs(uri, experiment, f"tags.`{TRIAL_TAG}` = '{trial.trial_id}'"):
                    if run.info.status == "RUNNING":
                        for k, v in tags.items():
                            client.set_tag(run.info.run_id, k, v)
                        client.set_terminated(run.info.run_id, status)

            def on_trial_complete(
                self, iteration: int, trials: list, trial: Any, **info: Any
            ) -> None:
                self._close(trial, "FINISHED", {"infosam.stopped_early": "true"})

            def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
                self._close(trial, "FAILED", {"infosam.trial_error": "true"})

        return Impl()


def _trial_resources(base: Config) -> dict[str, float]:
    import ray

    if ray.cluster_resources().get("driver", 0) > 0:
        return {"CPU": 0, "driver": 0.1}  # trial drivers live on the head, training on GPU nodes
    return {"CPU": 0.5}  # the trial only drives; its Train workers reserve their own CPUs


def _max_concurrent(tcfg: SweepConfig, base: Config, laptop: bool) -> int | None:
    """`tune.max_concurrent_trials`; else no cap on a cluster (pending trials' worker groups are
    what asks the autoscaler for nodes); else as many trials as this machine's CPUs hold."""
    sc = base.scaling
    per_trial = _trial_resources(base).get("CPU", 0) + sc.max_workers * sc.cpus_per_worker
    per_trial += sc.data_cpus  # Ray Data needs a CPU of its own or the run hangs (2-CPU fact)
    return concurrency_cap(tcfg.max_concurrent_trials, per_trial, laptop)


def _searcher(tcfg: SweepConfig, max_concurrent: int | None):
    """Optuna TPE when asked for (or `auto` and installed, without grid axes), else Tune's
    random/grid variant generator; both seeded with `tune.seed`, so a sweep samples the same
    configurations when run again. The variant generator takes the trial cap itself (Tune's
    `max_concurrent_trials` does not limit one passed in explicitly)."""
    from ray.tune.search.basic_variant import BasicVariantGenerator

    basic = BasicVariantGenerator(random_state=tcfg.seed, max_concurrent=max_concurrent or 0)
    if tcfg.search == "random":
        return basic
    try:
        from ray.tune.search.optuna import OptunaSearch
    except ImportError:
        if tcfg.search == "optuna":
            raise ConfigError("tune.search=optuna needs `pip install optuna`") from None
        return basic
    has_grid = any(s.get("type") == "grid" for s in tcfg.space.values())
    if has_grid:
        return basic  # Optuna cannot expand grid_search; the variant generator does
    try:
        import optuna  # noqa: F401
    except ImportError:
        if tcfg.search == "optuna":
            raise ConfigError("tune.search=optuna needs `pip install optuna`") from None
        return basic
    return OptunaSearch(metric=tcfg.metric, mode=tcfg.mode, seed=tcfg.seed)


@dataclass
class SweepResult:
    """A finished sweep: every trial's row, the best values and their config file."""

    table: Any  # pandas DataFrame, one row per trial
    best_yaml: str
    best: dict[str, Any]
    parent_run_id: str
    tracking_uri: str
    model_uri: str | None = None  # models:/<name>-<dataset>@champion, when registered


def run_sweep(tcfg: SweepConfig, base: Config) -> SweepResult:
    """The phases: check the tracking server, make the data once, start Ray, open the parent
    run, run the trials (Tune), write the trials table and the best config, close the parent."""
    from orchestrator.cluster.ray_env import init_ray, on_one_machine
    from orchestrator.data.synthetic import ensure_data

    uri = resolve_tracking_uri(base.tracking.uri, base.storage.path)
    check_tracking_server(uri)  # in seconds, before the data and Ray
    ensure_data(base)  # synthesise once here, not concurrently in every trial
    init_ray()
    laptop = on_one_machine()
    storage = resolve_location(base.storage.path)
    results = ResultsDir(join(storage, tcfg.name))  # on object storage: a working copy
    results.pull(())  # a sweep writes its files afresh: nothing to fetch
    out_dir = results.local
    artifact_root = tracking_artifact_root(base.storage.path, base.tracking.experiment, uri)
    parent, _ = open_parent_run(
        uri,
        base.tracking.experiment,
        f"sweep:{tcfg.name}",
        artifact_root=artifact_root,
        tags={"infosam.sweep": tcfg.name},
        params={
            "space": json.dumps(tcfg.space),
            "num_samples": tcfg.num_samples,
            "metric": tcfg.metric,
            "mode": tcfg.mode,
            "scheduler": tcfg.scheduler,
        },
    )
    parent.log_text(base.to_yaml(), "base_config.yaml")
    objective = tcfg.ranking()
    if objective is not None:
        parent.log_params({"objective": objective.describe()})
        print(f"[tune] {tcfg.name}: ranking trials by {objective.describe()}", flush=True)
    context = SweepContext(base, tcfg.name, parent.run_id, uri, artifact_root, objective)
    started = time.perf_counter()
    tuner = make_tuner(tcfg, context, storage, _max_concurrent(tcfg, base, laptop))
    # SIGTERM, Ctrl-C: the parent and its open trials KILLED; an error: FAILED. Tune's Ctrl-C
    # handler would return a partial grid that looks complete: off, Ctrl-C raises as SIGTERM.
    with closing_on_exit(parent, label=f"[tune] {tcfg.name}"), _tune_sigint_handler_off():
        components = objective.metrics if objective else []
        grid = tuner.fit()
        table = trials_table(grid, tcfg.metric, components)
        best_row, best_sampled, best_yaml = _write_best(table, tcfg, base, out_dir, storage)
        model_uri = _register_best(tcfg, base, context, best_row, grid)
        _log_outputs(parent, results, table, objective, tcfg, out_dir)
        parent.log_params({f"best.{k}": _py(v) for k, v in best_sampled.items()})
        parent.log_metrics(
            {
                f"best/{tcfg.metric}": float(best_row[tcfg.metric]),
                "trials": len(table),
                "failed_trials": int((table["status"] == "ERROR").sum()),
                "wall_time_s": time.perf_counter() - started,
            },
            step=0,
        )
        parent.finish("FINISHED")
    print(table.to_markdown(index=False), flush=True)
    return SweepResult(table, results.where(best_yaml), best_sampled, parent.run_id, uri, model_uri)


def _trial_checkpoint(grid: Any, trial_id: str, storage: str) -> str | None:
    """The last checkpoint a trial reported (Ray's TuneReportCallback puts its path in the
    metrics), as a URI on object storage; None when it reported none."""
    from ray.tune.integration.ray_train import CHECKPOINT_PATH_KEY

    for result in grid:
        metrics = result.metrics or {}
        if metrics.get("trial_id") == trial_id and metrics.get(CHECKPOINT_PATH_KEY):
            path = str(metrics[CHECKPOINT_PATH_KEY])
            if is_remote(storage) and not is_remote(path):  # inside Ray's pyarrow filesystem
                return f"{storage.split('://', 1)[0]}://{path.lstrip('/')}"
            return path
    return None


def _register_best(
    tcfg: SweepConfig, base: Config, context: SweepContext, best_row: Any, grid: Any
) -> str | None:
    """The best trial's student logged as its run's MLflow model and registered as
    `<sweep>-<dataset>@champion` (tagged on the parent run); None (said) when the trial left
    no checkpoint this driver can read."""
    from orchestrator.tracking.logged_model import register_model
    from orchestrator.tracking.runs import RunLogger
    from orchestrator.train.checkpoints import log_student_model

    if not tcfg.register_model:
        return None
    checkpoint = _trial_checkpoint(
        grid, str(best_row["trial"]), resolve_location(context.base.storage.path)
    )
    run_id = _trial_run_id(context, str(best_row["trial"]))
    if (
        run_id is None
        or checkpoint is None
        or not (is_remote(checkpoint) or Path(checkpoint).is_dir())
    ):
        print(
            f"[tune] best model not registered: trial {best_row['trial']} left no checkpoint "
            f"this driver can read ({checkpoint}); `infosam train --config` its best.yaml",
            flush=True,
        )
        return None
    model = log_student_model(context.uri, run_id, checkpoint)
    name = f"{tcfg.name}-{base.data.dataset}"
    version = register_model(context.uri, model, name)
    uri = f"models:/{name}@champion"
    print(
        f"[tune] best model: {uri} (version {version.version}) = trial {best_row['trial']}, "
        f"{tcfg.metric} {float(best_row[tcfg.metric]):.4f}",
        flush=True,
    )
    RunLogger(context.uri, context.parent_run_id).set_tags({"infosam.champion": uri})
    return uri


def _log_outputs(
    parent: Any, results: ResultsDir, table: Any, objective: Objective | None, tcfg, out_dir: Path
) -> None:
    """The sweep's files (and, with an objective, its front) on the parent run and in storage."""
    names = ["best.yaml", "trials.csv", "trials.md", "weights_vs_metric.png"]
    if objective is not None:
        front = _write_front(table, objective, tcfg, out_dir)
        names += ["front.csv"] + (["front.png"] if (out_dir / "front.png").exists() else [])
        parent.log_metrics({"front_trials": len(front)}, step=0)
    for name in names:
        parent.log_artifact(out_dir / name, "sweep")
        results.push(out_dir / name)


def make_tuner(tcfg: SweepConfig, context: SweepContext, storage: str, cap: int | None) -> Any:
    """A `tune.Tuner` over `_trial` with the sweep's searcher, scheduler, cap and callbacks."""
    from ray import tune
    from ray.tune.search import Searcher

    base = context.base
    scheduler = None
    if tcfg.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="training_iteration",
            max_t=base.optim.epochs,
            grace_period=tcfg.grace_period,
            reduction_factor=tcfg.reduction_factor,
        )
    search_alg = _searcher(tcfg, cap)
    return tune.Tuner(
        tune.with_resources(tune.with_parameters(_trial, context=context), _trial_resources(base)),
        param_space=search_space(tcfg.space),
        tune_config=tune.TuneConfig(
            metric=tcfg.metric,
            mode=tcfg.mode,
            num_samples=tcfg.num_samples,
            scheduler=scheduler,
            search_alg=search_alg,
            # a Searcher (Optuna) is capped by Tune; the variant generator caps itself
            max_concurrent_trials=cap if isinstance(search_alg, Searcher) else None,
        ),
        run_config=tune.RunConfig(
            name=f"{tcfg.name}-{time.strftime('%Y%m%d-%H%M%S')}",
            storage_path=storage,
            callbacks=[
                _MlflowTrialStatus(context.uri, base.tracking.experiment, base.optim.epochs)
            ],
            failure_config=tune.FailureConfig(max_failures=tcfg.trial_retries),
        ),
    )


def trials_table(grid: Any, metric: str, components: list[str] | None = None) -> Any:
    """One row per trial: id, OK or ERROR, epochs reached, the metric (and the objective's
    component metrics) and the sampled values."""
    import pandas as pd

    rows = []
    for result in grid:
        metrics = result.metrics or {}
        rows.append(
            {
                "trial": metrics.get("trial_id", ""),
                "status": "ERROR" if result.error else "OK",
                "epochs": metrics.get("training_iteration", 0),
                metric: metrics.get(metric, math.nan),
                **{k: metrics.get(k, math.nan) for k in components or [] if k != metric},
                **dict(result.config or {}),
            }
        )
    return pd.DataFrame(rows)


def _write_best(
    table: Any, tcfg: SweepConfig, base: Config, out_dir: Path, storage: str
) -> tuple[Any, dict[str, Any], Path]:
    """best.yaml (the winner, ready for `infosam train`), trials.csv/.md and the scatter."""
    ok = table[(table["status"] == "OK") & table[tcfg.metric].notna()]
    if ok.empty:
        raise RuntimeError(
            f"every trial of sweep {tcfg.name!r} failed; see the Tune logs in {storage}"
        )
    best_row = ok.sort_values(tcfg.metric, ascending=tcfg.mode == "min").iloc[0]
    measured = {"trial", "status", "epochs", tcfg.metric, *tcfg.ranking_metrics()}
    best_sampled = {k: best_row[k] for k in table.columns if k not in measured}
    best_cfg = base.with_values(trial_values(best_sampled))
    best_yaml = out_dir / "best.yaml"
    atomic_write(
        best_yaml,
        f"# best of sweep {tcfg.name}: {tcfg.metric}={best_row[tcfg.metric]:.4f}\n"
        + best_cfg.to_yaml(),
    )
    atomic_write(out_dir / "trials.csv", table.to_csv(index=False))
    atomic_write(out_dir / "trials.md", table.to_markdown(index=False) + "\n")
    scatter = out_dir / "weights_vs_metric.png"
    sweep_scatter(table, tcfg.metric, tcfg.name, scatter, tcfg.ranking_metrics())
    return best_row, best_sampled, best_yaml


def _write_front(table: Any, objective: Objective, tcfg: SweepConfig, out_dir: Path) -> Any:
    """front.csv (the non-dominated trials on the objective's metrics, best objective first),
    its section in trials.md, front.png; returns the front's rows."""
    ok = table[(table["status"] == "OK")].dropna(subset=objective.metrics)
    on_front = pareto_front(ok.to_dict("records"), objective.metrics)
    front = ok[on_front].sort_values(OBJECTIVE_KEY, ascending=False)
    atomic_write(out_dir / "front.csv", front.to_csv(index=False))
    text = (out_dir / "trials.md").read_text() if (out_dir / "trials.md").exists() else ""
    atomic_write(
        out_dir / "trials.md",
        f"{text}\n## Ranked by {objective.describe()}\n\nNon-dominated trials on "
        f"{', '.join(objective.metrics)} (no other trial is as good on all and better on one), "
        f"best objective first; below a floor the objective is negative.\n\n"
        f"{front.to_markdown(index=False)}\n",
    )
    if len(objective.metrics) >= 2:
        front_plot(ok, on_front, objective.metrics[:2], tcfg.name, out_dir / "front.png")
    print(
        f"[tune] {tcfg.name}: {len(front)} non-dominated trial(s) on "
        f"{', '.join(objective.metrics)}:\n{front.to_markdown(index=False)}",
        flush=True,
    )
    return front


@contextlib.contextmanager
def _tune_sigint_handler_off():
    previous = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = previous


def _py(v: Any) -> Any:
    return v.item() if hasattr(v, "item") else v
