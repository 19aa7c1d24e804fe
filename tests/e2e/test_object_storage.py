"""A benchmark whose state lives in object storage (a real S3-protocol server on loopback):
its driver is SIGKILLed mid-matrix, and a resubmission from another working copy reuses the
parent run and runs only the unfinished cells. The bucket is read with boto3."""

import json
import os
import signal
import sys

import pytest
from mlflow.tracking import MlflowClient

from tests.helpers import ROOT, benchmark_args, bucket_keys, signal_driver_when

pytestmark = pytest.mark.timeout(600)


def _cells(s3) -> dict:
    try:
        body = s3.get_object(Bucket="bkt", Key="bench/demo-s3/cells.json")["Body"].read()
    except s3.exceptions.NoSuchKey:
        return {}
    return json.loads(body)


def test_benchmark_state_in_the_bucket_survives_a_killed_driver(
    ray_local, s3, tmp_path, synthetic_root, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    MlflowClient(uri).search_experiments()  # migrate the store once, before two processes open it
    args = [
        *benchmark_args(tmp_path, synthetic_root, "demo-s3"),
        "--set",
        "benchmark.output=s3://bkt/bench/demo-s3",
        "--set",
        "benchmark.max_concurrent_cells=1",
    ]
    env = dict(
        os.environ,
        RAY_ADDRESS=ray_local.get_runtime_context().gcs_address,
        INFOSAM_STAGING=str(tmp_path / "driver1"),
    )

    def one_cell_recorded():
        cells = _cells(s3).get("cells", {})
        return [k for k, e in cells.items() if e.get("status") == "FINISHED"]

    cmd = [sys.executable, str(ROOT / "experiments" / "benchmark_all.py"), *args]
    code, out, finished = signal_driver_when(cmd, env, one_cell_recorded, signal.SIGKILL)
    assert code == -signal.SIGKILL, out[-3000:]
    first = _cells(s3)
    keys = bucket_keys(s3, "bench/demo-s3/")
    assert "bench/demo-s3/cells.json" in keys
    assert all(
        f"bench/demo-s3/{e['scores']}" in keys for e in first["cells"].values() if e.get("scores")
    )

    # Resubmitted from a fresh working copy: only the unfinished cell runs, same parent run.
    monkeypatch.setenv("INFOSAM_STAGING", str(tmp_path / "driver2"))
    sys.path.insert(0, str(ROOT / "experiments"))
    import benchmark_all

    assert benchmark_all.main(args) == 0
    final = _cells(s3)
    assert final["parent_run_id"] == first["parent_run_id"]
    assert {e["status"] for e in final["cells"].values()} == {"FINISHED"} and len(
        final["cells"]
    ) == 2
    for k in finished:  # the cell finished before the kill was not trained again
        assert final["cells"][k]["run_id"] == first["cells"][k]["run_id"]
    keys = bucket_keys(s3, "bench/demo-s3/")
    assert {"bench/demo-s3/results.md", "bench/demo-s3/results.csv"} <= set(keys)
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))  # no ./s3: folder
