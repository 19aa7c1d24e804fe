"""The team's tracking server for real: PostgreSQL 15, `mlflow server` with basic auth, Chromium.

Slow (`-m slow`): each test starts real servers. PostgreSQL runs as an unprivileged user in a
temporary data directory on loopback and is stopped by its PID (`pg_ctl stop`); the MLflow
server is a child process stopped by its own process group.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from orchestrator.tracking.runs import experiment_url
from orchestrator.tracking.server import LocalPostgres, TrackingServer, free_port
from orchestrator.train.driver import fit
from tests.helpers import ROOT, benchmark_args, train_config

sys.path.insert(0, str(ROOT / "experiments"))
import bench_tracking

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

ADMIN_PASSWORD = "admin-password-from-a-secret"


@pytest.fixture(scope="module")
def postgres():
    with LocalPostgres(databases=("mlflow", "restarts", "cli")) as pg:
        yield pg


@pytest.fixture(scope="module")
def auth_server(postgres, tmp_path_factory):
    saved = {k: os.environ.get(k) for k in ("MLFLOW_AUTH_ADMIN_PASSWORD",)}
    os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"] = ADMIN_PASSWORD
    root = tmp_path_factory.mktemp("auth_server")
    server = TrackingServer(
        postgres.uri("mlflow"),
        str(root / "artifacts"),
        workers=2,
        auth=True,
        log_path=root / "server.log",
    )
    try:
        yield server.start()
    finally:
        server.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, their children...), from /proc."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _environ(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(e.split("=", 1) for e in raw.decode(errors="replace").split("\0") if "=" in e)


@pytest.fixture
def admin_env(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)


def test_requests_without_valid_credentials_are_refused(auth_server):
    url = f"{auth_server.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert requests.get(url, timeout=30).status_code == 401
    assert requests.get(url, auth=("admin", "not-the-password"), timeout=30).status_code == 401
    assert requests.get(url, auth=("admin", ADMIN_PASSWORD), timeout=30).status_code == 200


def test_wrong_credentials_fail_in_seconds_before_anything_starts(
    auth_server, tmp_path, synthetic_root, monkeypatch, capsys
):
    from orchestrator.cli import main as cli

    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "admin")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "not-the-password")
    sets = [f"data.root={synthetic_root}", "data.synthesize=false"]
    sets += [f"storage.path={tmp_path / 'runs'}", f"tracking.uri={auth_server.url}"]
    start = time.monotonic()
    assert cli(["train", *[x for v in sets for x in ("--set", v)]]) == 2
    assert time.monotonic() - start < 15
    err = capsys.readouterr().err
    assert err.startswith(f"error: the MLflow server {auth_server.url} refused the credentials")
    assert "HTTP 401" in err and "'admin'" in err and "not-the-password" not in err
    assert not (tmp_path / "runs").exists()


def test_cluster_command_serves_a_fresh_database_from_secret_files(postgres, tmp_path):
    """What the tracking host runs: `infosam tracking serve --auth`, secrets in files."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir(mode=0o700)
    # a password in the URI (the local server trusts loopback, so it is not checked): it must
    # never reach a command line or the log
    db_uri = postgres.uri("cli").replace("@", ":db-secret-in-uri@", 1)
    (secrets_dir / "db").write_text(db_uri + "\n")
    (secrets_dir / "admin").write_text("a-password-from-a-file\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "INFOSAM_"))}
    env.update(
        INFOSAM_TRACKING_DB_URI_FILE=str(secrets_dir / "db"),
        MLFLOW_AUTH_ADMIN_PASSWORD_FILE=str(secrets_dir / "admin"),
    )
    port = free_port()
    cmd = [str(Path(sys.executable).parent / "infosam"), "tracking", "serve", "--auth"]
    cmd += ["--port", str(port), "--workers", "1", "--artifacts-destination", str(tmp_path / "a")]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search?max_results=1"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None:
            try:
                if requests.get(url, timeout=5).status_code == 401:
                    break
            except requests.ConnectionError:
                time.sleep(0.5)
        assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
        auth = ("admin", "a-password-from-a-file")
        assert requests.get(url, auth=auth, timeout=30).status_code == 200
        assert requests.get(url, timeout=30).status_code == 401
        # no process of it holds the database password on its command line (`ps` shows
        # those); the auth ini it wrote exists while it serves
        db_password = "db-secret-in-uri"
        tree = _descendants(proc.pid)
        assert len(tree) >= 2
        for pid in [proc.pid, *tree]:
            with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # gone meanwhile
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                assert db_password not in cmdline, cmdline
        inis = {_environ(pid).get("MLFLOW_AUTH_CONFIG_PATH") for pid in tree} - {None}
        assert len(inis) == 1 and Path(next(iter(inis))).is_file()
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the command's own process group
        proc.wait(30)
        log.close()
    assert proc.returncode == 0
    assert not Path(next(iter(inis))).exists(), "the temporary auth ini outlived the server"
    assert not [p for p in tree if _alive(p)], "a server process lingers"
    out = (tmp_path / "serve.log").read_text()
    assert "a-password-from-a-file" not in out and "migrated" in out
    assert "db-secret-in-uri" not in out
    # the schema is in PostgreSQL, created once by the command before the server started
    assert MlflowClient(postgres.uri("cli")).get_experiment("0").name == "Default"


def test_benchmark_through_the_server_is_complete_in_postgresql_and_shown_in_the_ui(
    auth_server, postgres, tmp_path, synthetic_root
):
    # A jobs account (not the admin) created through the auth API, as a team would.
    created = requests.post(
        f"{auth_server.url}/api/2.0/mlflow/users/create",
        json={"username": "infosam-jobs", "password": "jobs-password-1234"},
        auth=("admin", ADMIN_PASSWORD),
        timeout=30,
    )
    assert created.status_code == 200, created.text
    env = dict(
        os.environ,
        MLFLOW_TRACKING_USERNAME="infosam-jobs",
        MLFLOW_TRACKING_PASSWORD="jobs-password-1234",
    )
    env.pop("RAY_ADDRESS", None)  # its own local Ray: workers inherit the credentials
    job = subprocess.run(
        [
            sys.executable,
            str(ROOT / "experiments" / "benchmark_all.py"),
            *benchmark_args(tmp_path, synthetic_root, "pg"),
            "--set",
            f"tracking.uri={auth_server.url}",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
    link = next(line for line in job.stdout.splitlines() if "[benchmark] MLflow:" in line)
    assert "workflowType=machine_learning" in link

    # Read straight from PostgreSQL, not through the server: the runs are in the database.
    db = MlflowClient(postgres.uri("mlflow"))
    exp = db.get_experiment_by_name("demo")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = db.search_runs([exp.experiment_id])
    parent = next(r for r in runs if "mlflow.parentRunId" not in r.data.tags)
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert len(runs) == 3 and len(children) == 2
    assert {r.info.status for r in runs} == {"FINISHED"}
    for child in children:
        assert "test/s_measure" in child.data.metrics and child.data.params, child.info.run_name
    trained = next(c for c in children if "adapter_infosam" in c.info.run_name)
    assert [m.step for m in db.get_metric_history(trained.info.run_id, "train/loss")] == [0]
    assert parent.data.metrics["cells"] == 2
    # the champion is registered through the server, by the jobs account, in PostgreSQL
    champion = db.get_model_version_by_alias("pg-camouflage", "champion")
    assert db.get_logged_model(champion.source.split("/")[-1]).source_run_id == (
        trained.info.run_id
    )
    assert "[benchmark] champion camouflage: models:/pg-camouflage@champion" in job.stdout
    assert {i.dataset.name for i in trained.inputs.dataset_inputs} == {
        "camouflage/train",
        "camouflage/val",
        "camouflage/test",
    }
    artifacts = MlflowClient(auth_server.url)  # artifacts go through the server
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = (
        "infosam-jobs",
        "jobs-password-1234",
    )
    try:
        files = {a.path for a in artifacts.list_artifacts(parent.info.run_id, "results")}
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    assert "results/results.md" in files
    # The jobs' password is nowhere a run keeps or prints: parameters, tags, every artifact,
    # every file under storage (checkpoints, cells.json, scores) and the job's output.
    secret = "jobs-password-1234"
    for r in runs:
        assert secret not in repr(r.data.params) + repr(r.data.tags), r.info.run_name
    downloaded = tmp_path / "downloaded"
    os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = (
        "infosam-jobs",
        secret,
    )
    try:
        for r in runs:
            artifacts.download_artifacts(r.info.run_id, "", str(downloaded / r.info.run_id))
    finally:
        del os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"]
    searched = [p for d in (downloaded, tmp_path / "runs") for p in d.rglob("*") if p.is_file()]
    assert len(searched) > 20 and any(p.name == "state.pt" for p in searched)
    leaks = [p for p in searched if secret.encode() in p.read_bytes()]
    assert not leaks, leaks
    assert secret not in job.stdout + job.stderr

    # The page a user opens from that link: the runs table, parent expanded to its children.
    from playwright.sync_api import sync_playwright

    shot = tmp_path / "mlflow_runs.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path="/usr/bin/chromium",
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
            ],
        )
        try:
            page = browser.new_page(
                viewport={"width": 1400, "height": 900},
                http_credentials={"username": "infosam-jobs", "password": "jobs-password-1234"},
            )
            page.goto(experiment_url(auth_server.url, exp.experiment_id))
            row = page.locator("[role=row]", has_text=parent.info.run_name).first
            row.wait_for(timeout=60_000)
            row.locator('button[data-component-id*="runnamecellrenderer"]').first.click()
            for child in children:
                page.get_by_text(child.info.run_name, exact=True).first.wait_for(timeout=30_000)
            page.screenshot(path=str(shot))
            body = page.inner_text("body")
        finally:
            browser.close()
    assert shot.stat().st_size > 20_000
    assert "Token Usage" not in body and "No data available" not in body
    assert "3 matching runs" in body, body[:2000]
    # the Dataset column names what the trained cell was trained on (the first of its 3 inputs)
    assert "camouflage/train" in body and "+2" in body, body[:2000]


def test_16_writers_x_200_steps_lose_and_duplicate_nothing(auth_server, admin_env):
    result = bench_tracking.load_test(auth_server.url, writers=16, steps=200)
    print(result)
    assert result["errors"] == 0, result
    assert result["lost_points"] == 0 and result["duplicated_points"] == 0, result


def test_training_goes_on_while_the_tracking_server_restarts(
    ray_local, postgres, tmp_path, synthetic_root
):
    """Stop the server after epoch 0 reached MLflow, restart it two epochs later: every epoch
    is delivered once, and training did not wait for the server."""
    server = TrackingServer(
        postgres.uri("restarts"), str(tmp_path / "art"), workers=1, log_path=tmp_path / "s.log"
    )
    server.start()
    cfg = train_config(
        tmp_path,
        synthetic_root,
        "scaling.num_workers=2",
        "optim.epochs=5",
        "optim.batch_size=4",
        "tracking.overlays=0",
        f"tracking.uri={server.url}",
    )
    outage: dict[str, float] = {}
    errors: list[BaseException] = []

    def last_checkpointed() -> int:
        """The newest epoch with a complete checkpoint (history.json is written last)."""
        done = (tmp_path / "runs").rglob("checkpoint_epoch_*/history.json")
        return max((int(p.parent.name.split("_")[2]) for p in done), default=-1)

    def chaos() -> None:
        try:
            client = MlflowClient(server.url)
            deadline = time.time() + 300
            while time.time() < deadline:
                exp = client.get_experiment_by_name("test")
                runs = client.search_runs([exp.experiment_id]) if exp else []
                if runs and client.get_metric_history(runs[0].info.run_id, "train/loss"):
                    break
                time.sleep(0.5)
            else:
                raise AssertionError("epoch 0 never reached MLflow")
            outage["epoch_at_stop"] = last_checkpointed()
            server.stop()
            while last_checkpointed() < outage["epoch_at_stop"] + 2 and time.time() < deadline:
                time.sleep(0.5)
            outage["epoch_at_restart"] = last_checkpointed()
            server.start()
        except BaseException as exc:  # surfaced by the test below
            errors.append(exc)

    thread = threading.Thread(target=chaos, daemon=True)
    thread.start()
    try:
        result = fit(cfg, quiet=True)
    finally:
        thread.join(timeout=300)
    try:
        assert not errors, errors
        # two epochs were trained and checkpointed while nothing could reach MLflow
        assert outage["epoch_at_restart"] >= outage["epoch_at_stop"] + 2, outage
        client = MlflowClient(server.url)
        run = client.get_run(result.run_id)
        assert run.info.status == "FINISHED"
        for key in ("train/loss", "val/iou", "time/train_s"):
            steps = [m.step for m in client.get_metric_history(result.run_id, key)]
            assert sorted(steps) == [0, 1, 2, 3, 4], (key, steps)
        assert run.data.tags["infosam.world_sizes"] == "2"
    finally:
        server.close()
