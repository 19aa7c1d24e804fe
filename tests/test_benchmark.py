"""The main job end to end: in-process, resumed by name, and through `ray job submit`."""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import benchmark_all  # noqa: E402

pytestmark = pytest.mark.timeout(420)


def _args(tmp_path, data_root, name="reduced"):
    return [
        "--set",
        "benchmark.methods=[zero_shot,adapter_infosam]",
        "--set",
        "benchmark.datasets=[camouflage]",
        "--set",
        "benchmark.seeds=[0]",
        "--set",
        f"benchmark.name={name}",
        "--set",
        "optim.epochs=1",
        "--set",
        f"data.root={data_root}",
        "--set",
        "data.synthesize=false",
        "--set",
        f"storage.path={tmp_path / 'runs'}",
    ]


def test_reduced_matrix_end_to_end_and_resume(ray_local, tmp_path, synthetic_root, capsys):
    assert benchmark_all.main(_args(tmp_path, synthetic_root)) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "runs" / "reduced" / "results.md").read_text()
    assert "SAM zero-shot (teacher)" in md and "Adapter + InfoSAM" in md
    assert "camouflage s_measure" in md and "protocol: clean" in md and "checkpoint_sha256" in md
    assert (tmp_path / "runs" / "reduced" / "results.png").stat().st_size > 5000
    assert (tmp_path / "runs" / "reduced" / "results.csv").read_text().count("\n") == 1 + 2 * 3
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "results")} >= {
        "results/results.md",
        "results/results.csv",
        "results/results.png",
    }
    assert all("test/s_measure" in r.data.metrics for r in children)
    assert "[benchmark] 2/2 adapter_infosam/camouflage/seed0" in out
    # Same name: nothing is redone. A new name: a fresh benchmark.
    assert benchmark_all.main(_args(tmp_path, synthetic_root)) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 2
    assert len(client.search_runs([exp.experiment_id])) == 3


def test_missing_checkpoint_and_data_fail_early_with_instructions(tmp_path, capsys):
    args = [
        "--config",
        str(ROOT / "experiments" / "configs" / "paper.yaml"),
        "--set",
        f"storage.path={tmp_path}",
    ]
    assert benchmark_all.main(args) == 2
    err = capsys.readouterr().err
    assert "sam_vit_b_01ec64.pth" in err and "segment-anything" in err
    fake = tmp_path / "sam.pth"
    fake.write_bytes(b"x")
    assert (
        benchmark_all.main(
            [*args, "--set", f"model.checkpoint={fake}", "--set", f"data.root={tmp_path / 'none'}"]
        )
        == 2
    )
    assert "infosam data ingest --format convlora" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_job_submit_against_a_local_head(tmp_path, synthetic_root):
    """`ray start --head` on loopback + `ray job submit`; only the Ray started here is stopped."""
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16))
    env.pop("RAY_ADDRESS", None)
    port, dash, agent, agent_grpc, env_agent, metrics = (_free_port() for _ in range(6))
    temp_dir = tempfile.mkdtemp(
        prefix="ray", dir="/tmp"
    )  # short: Ray's unix sockets cap path length
    head = subprocess.Popen(
        [
            str(bin_dir / "ray"),
            "start",
            "--head",
            "--block",
            f"--port={port}",
            "--num-cpus=2",
            "--node-ip-address=127.0.0.1",
            "--include-dashboard=true",
            "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dash}",
            # Another Ray on this machine (the suite's own) already holds the default agent ports.
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={env_agent}",
            f"--metrics-export-port={metrics}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    try:
        address = f"http://127.0.0.1:{dash}"
        deadline = time.time() + 90
        while time.time() < deadline:
            probe = subprocess.run(
                [str(bin_dir / "ray"), "job", "list", "--address", address],
                env=env,
                capture_output=True,
                text=True,
            )
            if probe.returncode == 0:
                break
            time.sleep(2)
        else:
            pytest.fail("the Ray head did not come up")
        cmd = [
            str(bin_dir / "ray"),
            "job",
            "submit",
            "--address",
            address,
            "--working-dir",
            str(ROOT),
            "--",
            sys.executable,
            "experiments/benchmark_all.py",
            *_args(tmp_path, synthetic_root, "submitted"),
        ]
        for _ in range(20):  # the head answers before its job agent is ready to take jobs
            job = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=360)
            if "No available agent" not in job.stderr + job.stdout:
                break
            time.sleep(3)
        assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
        assert "succeeded" in job.stdout
        assert (tmp_path / "runs" / "submitted" / "results.md").is_file()
    finally:
        os.killpg(head.pid, signal.SIGTERM)  # our own `ray start --block` and what it started
        try:
            head.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
        shutil.rmtree(temp_dir, ignore_errors=True)
