"""Ray Tune sweeps for real: trials nested in MLflow, a crashed trial, ASHA, the best YAML trains."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.config import load_config
from orchestrator.sweep import load_sweep, run_sweep, trial_values
from orchestrator.train.driver import fit

pytestmark = pytest.mark.timeout(480)
SMOKE = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "tune_smoke.yaml"


def _sweep(tmp_path, data_root, *extra, space=None):
    data = yaml.safe_load(SMOKE.read_text())
    data["tune"]["space"].update(space or {})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    base = [
        f"data.root={data_root}",
        "data.dataset=camouflage",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
        "tracking.experiment=tune_test",
    ]
    return load_sweep(path, [*base, *extra])


def test_off_switch_sets_weight_zero():
    out = trial_values(
        {"loss.weight_compression": 0.3, "loss.weight_compression__off": True, "optim.lr": 0.001}
    )
    assert out == {"loss.weight_compression": 0.0, "optim.lr": 0.001}
    cfg = load_config(None, []).with_values(out)
    assert cfg.loss.weight_compression == 0.0 and cfg.optim.lr == 0.001


def test_sweep_with_a_crashing_trial(ray_local, tmp_path, synthetic_root):
    tcfg, base = _sweep(
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


@pytest.mark.slow
def test_asha_stops_weak_trials_early(ray_local, tmp_path, synthetic_root):
    # Seeded random search, one trial at a time: ASHA's decisions do not depend on which trial
    # happened to reach a rung first (with 2 at once, it sometimes stopped none).
    tcfg, base = _sweep(
        tmp_path,
        synthetic_root,
        "optim.epochs=4",
        "tune.num_samples=4",
        "tune.search=random",
        "tune.max_concurrent_trials=1",
    )
    result = run_sweep(tcfg, base)
    assert (result.table["epochs"] < 4).any(), result.table
    client = MlflowClient(result.tracking_uri)
    exp = client.get_experiment_by_name("tune_test")
    tags = [
        r.data.tags.get("infosam.stopped_early") for r in client.search_runs([exp.experiment_id])
    ]
    assert "true" in tags


@pytest.mark.slow
def test_ctrl_c_to_a_sweep_driver_ends_the_sweep_and_its_trials_killed(tmp_path, synthetic_root):
    """Tune handles Ctrl-C itself (it stops the loop and returns): the sweep must notice."""
    import os
    import signal
    import sys

    from helpers import signal_driver_when

    data = yaml.safe_load(SMOKE.read_text())
    data["tune"].update(num_samples=1, space={"optim.lr": {"type": "grid", "values": [0.001]}})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    MlflowClient(uri).search_experiments()  # migrate the store once, before two processes open it
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    cmd = [str(Path(sys.executable).parent / "infosam"), "tune", "--config", str(path)]
    for o in (
        f"data.root={synthetic_root}",
        "data.dataset=camouflage",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
        "tracking.experiment=tune_stopped",
        "optim.epochs=100",
    ):
        cmd += ["--set", o]
    client = MlflowClient(uri)

    def trial_epoch_logged():
        exp = client.get_experiment_by_name("tune_stopped")
        for run in client.search_runs([exp.experiment_id]) if exp else []:
            if "mlflow.parentRunId" in run.data.tags and client.get_metric_history(
                run.info.run_id, "train/loss"
            ):
                return run
        return None

    code, out, _ = signal_driver_when(cmd, env, trial_epoch_logged, signal.SIGINT)
    assert code == 130, out[-3000:]
    runs = client.search_runs([client.get_experiment_by_name("tune_stopped").experiment_id])
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}, [
        (r.info.run_name, r.info.status) for r in runs
    ]
