"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations


def train_config(tmp_path, data_root, *overrides: str):
    """The shipped smoke config pointed at test-local data, storage and MLflow store."""
    from pathlib import Path

    from orchestrator.config import load_config

    smoke = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "smoke.yaml"
    base = [
        f"data.root={data_root}",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
        "tracking.experiment=test",
        "tracking.overlays=2",
        "optim.eval_batch_size=8",
    ]
    return load_config(smoke, [*base, *overrides])


def signal_driver_when(cmd, env, ready, sig, *, wait_s: float = 240, settle_s: float = 0.0):
    """Run a driver process, poll `ready()` (truthy once it is mid-run) every second, then send
    `sig` and return (returncode, output, what `ready` returned). The process never outlives
    the call."""
    import subprocess
    import time

    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline, seen = time.time() + wait_s, None
        while time.time() < deadline and proc.poll() is None and not seen:
            time.sleep(1)
            seen = ready()
        if not seen:
            proc.kill()
            out, _ = proc.communicate(timeout=60)
            raise AssertionError(f"the driver never reached the point to signal:\n{out[-3000:]}")
        time.sleep(settle_s)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return proc.returncode, out, seen
