"""Slow end to end (-m slow): from test_tune.py."""

from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from orchestrator.sweep import run_sweep
from tests.helpers import sweep_config

pytestmark = pytest.mark.timeout(480)


@pytest.mark.slow
def test_asha_stops_weak_trials_early(ray_local, tmp_path, synthetic_root):
    # Seeded random search, one trial at a time: ASHA's decisions do not depend on which trial
    # happened to reach a rung first (with 2 at once, it sometimes stopped none).
    tcfg, base = sweep_config(
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

    from tests.helpers import TUNE_SMOKE, signal_driver_when

    data = yaml.safe_load(TUNE_SMOKE.read_text())
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
