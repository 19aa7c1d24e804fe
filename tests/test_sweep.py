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
    """A crashed trial is retried, recorded and skipped; the survivor is ranked by the declared
    gain-vs-retention objective (data.retention scores `general` every epoch) and its best
    config trains."""
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
        "data.retention=[general]",
        "optim.zero_shot_eval=true",
        objective,
        space={"optim.batch_size": {"type": "grid", "values": [4, 1000]}},
    )
    assert (tcfg.metric, tcfg.mode) == ("objective", "max")
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
    assert files >= {"sweep/front.csv", "sweep/front.png"}
    # the objective Tune ranked on is the declared sum of what the trial reported
    ok = table[table["status"] == "OK"].iloc[0]
    kept = ok["val/retention/general/iou"]
    assert 0 <= kept <= 1
    if kept >= 0.05:
        assert ok["objective"] == pytest.approx(ok["val/iou"] + 0.5 * kept, abs=1e-9)
    else:
        assert ok["objective"] < 0
    front = pd.read_csv(tmp_path / "runs" / tcfg.name / "front.csv")
    assert len(front) == 1 and front["optim.batch_size"].tolist() == [4]
    finished = next(r for r in children if r.info.status == "FINISHED")
    assert finished.data.metrics["val/retention/general/iou"] == pytest.approx(kept)
    assert finished.data.metrics["val/zero_shot_retention/general/iou"] > 0.5  # the teacher
    # The best trial's student is registered (trials log no model of their own).
    assert result.model_uri == f"models:/{tcfg.name}-camouflage@champion"
    version = client.get_model_version_by_alias(f"{tcfg.name}-camouflage", "champion")
    model = client.get_logged_model(version.source.removeprefix("models:/"))
    assert model.source_run_id == finished.info.run_id
    assert len(client.search_logged_models([exp.experiment_id])) == 1
    # The best config is a ready-to-run training config.
    best = load_config(
        result.best_yaml, ["scaling.num_workers=0", f"storage.path={tmp_path / 'best'}"]
    )
    assert best.optim.batch_size == 4
    trained = fit(best, quiet=True)
    assert trained.metrics["epoch"] == 0 and 0 <= trained.metrics["val/iou"] <= 1


def test_the_front_lists_the_trials_nothing_beats_and_ranks_a_floor_breaker_last(tmp_path):
    """What a sweep with an objective writes, from a table of finished trials (no Ray)."""
    import pandas as pd

    from orchestrator.objective import Objective
    from orchestrator.sweep import _write_front

    obj = Objective.from_spec(
        {
            "weights": {"val/iou": 1.0, "val/retention/general/iou": 0.5},
            "floors": {"val/retention/general/iou": 0.6},
        }
    )
    rows = [  # trial, val/iou, retention: a keeper, a gainer below the floor, a dominated one
        ("keeps", 0.55, 0.70),
        ("gains", 0.80, 0.40),
        ("worse", 0.50, 0.65),
    ]
    table = pd.DataFrame(
        [
            {"trial": t, "status": "OK", "val/iou": a, "val/retention/general/iou": b}
            | {"objective": obj.value({"val/iou": a, "val/retention/general/iou": b})}
            | {"loss.weight_distillation": w}
            for (t, a, b), w in zip(rows, [0.5, 0.0, 5.0])
        ]
        + [{"trial": "crash", "status": "ERROR", "loss.weight_distillation": 1.0}]
    )
    tcfg, _ = sweep_config(tmp_path, tmp_path, "data.retention=[general]")
    (tmp_path / "trials.md").write_text("table\n")
    front = _write_front(table, obj, tcfg, tmp_path)
    assert front["trial"].tolist() == ["keeps", "gains"]  # best objective first
    assert front["objective"].iloc[1] < 0  # below the floor: ranked under every keeper
    assert pd.read_csv(tmp_path / "front.csv")["trial"].tolist() == ["keeps", "gains"]
    md = (tmp_path / "trials.md").read_text()
    assert md.startswith("table\n") and "## Ranked by 1 * val/iou + 0.5 * val/retention" in md
    assert "subject to val/retention/general/iou >= 0.6" in md and "worse" not in md
    assert (tmp_path / "front.png").stat().st_size > 5000


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
