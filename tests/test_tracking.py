"""Run lifecycle (no run left RUNNING), experiment links, secrets; servers are in -m slow."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from helpers import signal_driver_when, train_config
from mlflow.tracking import MlflowClient

from orchestrator.tracking import EXPERIMENT_KIND, ensure_experiment, experiment_url, view_hint
from orchestrator.tracking_server import TrackingServerError, read_secret, redact
from orchestrator.trainer import fit

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.timeout(300)


def test_a_crashing_training_run_ends_failed(ray_local, tmp_path, synthetic_root):
    def broken_loop(config):
        raise RuntimeError("disk full")

    cfg = train_config(tmp_path, synthetic_root, "scaling.num_workers=0", "optim.epochs=1")
    with pytest.raises(RuntimeError, match="disk full"):
        fit(cfg, quiet=True, train_loop=broken_loop)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("test").experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


def test_ctrl_c_to_a_training_driver_ends_its_run_killed(tmp_path, synthetic_root):
    """A real `infosam train` process, interrupted mid-training like Ctrl-C does."""
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    MlflowClient(uri).search_experiments()  # migrate the store once, before two processes open it
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    overrides = [
        f"data.root={synthetic_root}",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
        "tracking.experiment=stopped",
        "scaling.num_workers=0",
        "optim.epochs=100",
    ]
    cmd = [str(Path(sys.executable).parent / "infosam"), "train"]
    cmd += ["--config", str(ROOT / "experiments" / "configs" / "smoke.yaml")]
    for o in overrides:
        cmd += ["--set", o]
    client = MlflowClient(uri)

    def epoch_logged():
        exp = client.get_experiment_by_name("stopped")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
            return runs[0]
        return None

    code, out, run = signal_driver_when(cmd, env, epoch_logged, signal.SIGINT, wait_s=180)
    assert run.info.status == "RUNNING"
    assert code == 130, out[-3000:]
    assert "marked KILLED" in out, out[-3000:]
    assert client.get_run(run.info.run_id).info.status == "KILLED"


def test_experiments_open_on_the_runs_table(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    exp_id = ensure_experiment(client, "kinds", str(tmp_path / "art"))
    assert (
        client.get_experiment(exp_id).tags["mlflow.experimentKind"]
        == (EXPERIMENT_KIND["mlflow.experimentKind"])
    )
    url = experiment_url("http://10.0.0.5:5000/", exp_id)
    assert url == f"http://10.0.0.5:5000/#/experiments/{exp_id}/runs?workflowType=machine_learning"
    run = client.create_run(exp_id)
    assert f"#/experiments/{exp_id}/runs?workflowType" in view_hint(uri, run.info.run_id)
    assert view_hint(uri, run.info.run_id).startswith(f"mlflow ui --backend-store-uri {uri}")


def test_secrets_come_from_the_environment_or_a_file_never_a_default(tmp_path, monkeypatch):
    monkeypatch.delenv("INFOSAM_TEST_SECRET", raising=False)
    monkeypatch.delenv("INFOSAM_TEST_SECRET_FILE", raising=False)
    with pytest.raises(TrackingServerError, match="INFOSAM_TEST_SECRET_FILE"):
        read_secret("INFOSAM_TEST_SECRET")
    assert read_secret("INFOSAM_TEST_SECRET", required=False) is None
    secret = tmp_path / "pw"
    secret.write_text("from-a-mounted-file\n")
    monkeypatch.setenv("INFOSAM_TEST_SECRET_FILE", str(secret))
    assert read_secret("INFOSAM_TEST_SECRET") == "from-a-mounted-file"
    monkeypatch.setenv("INFOSAM_TEST_SECRET", "short")
    with pytest.raises(TrackingServerError, match="at least 12"):
        read_secret("INFOSAM_TEST_SECRET", min_length=12)
    assert redact("postgresql://mlflow:hunter2@db:5432/mlflow") == (
        "postgresql://mlflow:***@db:5432/mlflow"
    )
