"""Slow end to end (-m slow): from test_benchmark.py."""

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

from tests.helpers import ROOT, benchmark_args

pytestmark = pytest.mark.timeout(420)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
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
            *benchmark_args(tmp_path, synthetic_root, "submitted"),
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
