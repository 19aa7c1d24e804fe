"""Ray Tune sweeps for real: trials nested in MLflow, a crashed trial, ASHA, the best YAML trains."""

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.sweep import run_sweep, trial_values
from orchestrator.train.driver import fit
from tests.helpers import sweep_config

pytestmark = pytest.mark.timeout(480)


def test_off_switch_sets_weight_zero():
    out = trial_values(
        {"loss.weight_compression": 0.3, "loss.weight_compression__off": True, "optim.lr": 0.001}
    )
    assert out == {"loss.weight_compression": 0.0, "optim.lr": 0.001}
    cfg = load_config(None, []).with_values(out)
    assert cfg.loss.weight_compression == 0.0 and cfg.optim.lr == 0.001


def test_sweep_with_a_crashing_trial(ray_local, tmp_path, synthetic_root):
    tcfg, base = sweep_config(
        tmp_path,
        synthetic_root,
        "optim.epochs=1",
        "tune.num_samples=1",
        space={"optim.batch_size": {"type": "grid", "values": [4, 1000]}},
    )
    result = run_sweep(tcfg, base)
    table = result.table
    assert len(table) == 2 and sorted(table["status"]) == ["ERROR", "OK"]
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("tune_test")
    runs = client.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.info.run_id == result.parent_run_id)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert sorted(r.info.status for r in children) == ["FAILED", "FINISHED"]
    # Tune re-ran the crashing trial once (`tune.trial_retries`), in the same MLflow run.
    crashed = next(r for r in children if r.info.status == "FAILED")
    assert crashed.data.tags.get("infosam.trial_attempts") == "2", crashed.data.tags
    assert parent.info.status == "FINISHED" and parent.data.metrics["failed_trials"] == 1
    assert all("sampled.loss.weight_distillation" in r.data.params for r in children)
    files = {a.path for a in client.list_artifacts(parent.info.run_id, "sweep")}
    assert files >= {"sweep/best.yaml", "sweep/trials.csv", "sweep/weights_vs_metric.png"}
    # The best config is a ready-to-run training config.
    best = load_config(
        result.best_yaml, ["scaling.num_workers=0", f"storage.path={tmp_path / 'best'}"]
    )
    assert best.optim.batch_size == 4
    trained = fit(best, quiet=True)
    assert trained.metrics["epoch"] == 0 and 0 <= trained.metrics["val/iou"] <= 1


@pytest.mark.slow  # two trials, about 2 minutes on 2 cores
def test_a_sweep_ranks_trials_by_gain_and_retention(ray_local, tmp_path, synthetic_root):
    """data.retention scores `general` every epoch; the objective ranks on both and the
    non-dominated trials are reported with their configs."""
    import pandas as pd

    objective = (
        "tune.objective={weights: {val/iou: 1.0, val/retention/general/iou: 0.5}, "
        "floors: {val/retention/general/iou: 0.05}}"
    )
    tcfg, base = sweep_config(
        tmp_path,
        synthetic_root,
        "optim.epochs=1",
        "tune.num_samples=1",
        "tune.scheduler=none",
        "data.retention=[general]",
        "optim.zero_shot_eval=true",
        objective,
        space={"loss.weight_distillation": {"type": "grid", "values": [0.0, 5.0]}},
    )
    assert (tcfg.metric, tcfg.mode) == ("objective", "max")
    result = run_sweep(tcfg, base)
    table = result.table
    assert len(table) == 2 and (table["status"] == "OK").all()
    kept = table["val/retention/general/iou"]
    assert kept.between(0, 1).all()
    expected = table["val/iou"] + 0.5 * kept
    feasible = kept >= 0.05
    assert (table.loc[feasible, "objective"] - expected[feasible]).abs().max() < 1e-9
    assert (table.loc[~feasible, "objective"] < 0).all()
    out = tmp_path / "runs" / tcfg.name
    front = pd.read_csv(out / "front.csv")
    assert 1 <= len(front) <= 2 and "loss.weight_distillation" in front.columns
    assert (
        "## Ranked by 1 * val/iou + 0.5 * val/retention/general/iou"
        in (out / "trials.md").read_text()
    )
    assert (out / "front.png").stat().st_size > 5000
    best = load_config(result.best_yaml, [])
    assert (
        best.loss.weight_distillation
        == table.sort_values("objective").iloc[-1]["loss.weight_distillation"]
    )
    # each trial run has the retention curve and the teacher's reference beside it
    client = MlflowClient(result.tracking_uri)
    trial_runs = client.search_runs(
        [client.get_experiment_by_name("tune_test").experiment_id],
        f"tags.`mlflow.parentRunId` = '{result.parent_run_id}'",
    )
    for run in trial_runs:
        assert 0 <= run.data.metrics["val/retention/general/iou"] <= 1
        assert run.data.metrics["val/zero_shot_retention/general/iou"] > 0.5


def test_an_objective_on_metrics_no_trial_reports_is_refused(tmp_path, synthetic_root):
    from orchestrator.config import ConfigError

    with pytest.raises(ConfigError, match=r"not reported by the trials.*data\.retention"):
        sweep_config(
            tmp_path, synthetic_root, "tune.objective={weights: {val/retention/coco/iou: 1.0}}"
        )
    tcfg, _ = sweep_config(
        tmp_path,
        synthetic_root,
        "data.retention=[general]",
        "tune.objective={weights: {val/iou: 1.0}, floors: {val/retention/general/iou: 0.5}}",
    )
    assert tcfg.metric == "objective" and tcfg.ranking_metrics() == [
        "val/iou",
        "val/retention/general/iou",
    ]
