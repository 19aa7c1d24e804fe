"""Run lifecycle (no run left RUNNING), experiment links, secrets; servers are in -m slow."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.tracking.runs import EXPERIMENT_KIND, ensure_experiment, experiment_url, view_hint
from orchestrator.tracking.server import TrackingServerError, read_secret, redact
from orchestrator.train.driver import fit
from tests.helpers import ROOT, signal_driver_when, train_config

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


def test_the_outbox_drops_a_refused_write_and_keeps_going(tmp_path, capsys):
    """A write MLflow refuses for good (a deleted run: HTTP 400 class) is dropped and said
    once; the writes queued behind it still land, instead of waiting forever."""
    from orchestrator.train.epoch_log import Outbox

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    exp = ensure_experiment(client, "outbox", str(tmp_path / "art"))
    gone = client.create_run(exp).info.run_id
    alive = client.create_run(exp).info.run_id
    client.delete_run(gone)
    box = Outbox()
    box.put("epoch 0 (deleted run)", lambda: client.log_metric(gone, "loss", 1.0, step=0))
    box.put("epoch 0", lambda: client.log_metric(alive, "loss", 2.0, step=0))
    assert box.flush(30), "a refused write held back the queue"
    assert [m.value for m in client.get_metric_history(alive, "loss")] == [2.0]
    assert len(box.dropped) == 1 and "deleted run" in box.dropped[0]
    assert box.retries == 0
    assert "dropped, not retried" in capsys.readouterr().out


def test_a_password_in_the_tracking_uri_is_refused_before_anything_runs(
    tmp_path, synthetic_root, monkeypatch, capsys
):
    from orchestrator.cli import main as cli
    from orchestrator.config import ConfigError
    from orchestrator.tracking.runs import TrackingError, resolve_tracking_uri

    with pytest.raises(ConfigError, match="MLFLOW_TRACKING_PASSWORD"):
        train_config(tmp_path, synthetic_root, "tracking.uri=http://jobs:s3cret-pw@127.0.0.1:5000")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "postgresql://mlflow:s3cret-pw@db:5432/mlflow")
    with pytest.raises(TrackingError, match="PGPASSWORD"):
        resolve_tracking_uri(None, tmp_path)
    capsys.readouterr()
    assert cli(["train", "--set", "tracking.uri=http://u:s3cret-pw@127.0.0.1:1"]) == 2
    captured = capsys.readouterr()
    assert "s3cret-pw" not in captured.err + captured.out
    assert captured.err.startswith("error: tracking.uri holds a password")


def test_runs_in_a_bucket_without_a_tracking_uri_are_refused_not_kept_in_a_local_s3_folder(
    tmp_path, synthetic_root, monkeypatch, capsys
):
    """SQLite cannot live in a bucket; quietly keeping it under ./s3:/... on one node's disk
    would lose every run with the node."""
    from orchestrator.cli import main as cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sets = ["storage.path=s3://bkt/runs", f"data.root={synthetic_root}", "data.synthesize=false"]
    assert cli(["train", *[x for v in sets for x in ("--set", v)]]) == 2
    err = capsys.readouterr().err
    assert "SQLite cannot live in a bucket" in err and "tracking.uri" in err, err
    assert list(tmp_path.iterdir()) == []


def test_an_unreachable_tracking_server_fails_in_seconds_before_ray(tmp_path, synthetic_root):
    """A real `infosam train`: no Ray start, no data preparation, no minutes of retries."""
    import socket
    import subprocess
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    sets = [f"data.root={synthetic_root}", "data.synthesize=false"]
    sets += [f"storage.path={tmp_path / 'runs'}", f"tracking.uri=http://127.0.0.1:{port}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    start = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "orchestrator.cli",
            "train",
            *[x for v in sets for x in ("--set", v)],
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 2, done.stderr[-2000:]
    assert time.monotonic() - start < 30
    assert done.stderr.startswith(
        f"error: the MLflow server http://127.0.0.1:{port} does not answer"
    )
    assert "Traceback" not in done.stderr and done.stderr.count("\n") == 1
    assert "Ray" not in done.stdout and not (tmp_path / "runs").exists()
