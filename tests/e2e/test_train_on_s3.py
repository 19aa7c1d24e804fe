"""Training whose run folder is a bucket (a real S3-protocol server on loopback): checkpoints,
the run's config and its MLflow run id land in the bucket, and a run resumed from a fresh
machine (an empty working copy) continues from them. The bucket is read with boto3."""

import time

import pytest

from orchestrator.train.checkpoints import load_trained
from orchestrator.train.driver import fit
from tests.helpers import bucket_keys, train_config

pytestmark = pytest.mark.timeout(600)


def test_a_run_on_object_storage_checkpoints_there_and_resumes_from_there(
    ray_local, s3, tmp_path, synthetic_root, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    common = ["scaling.num_workers=0", "optim.epochs=2", f"tracking.uri={uri}"]

    t0 = time.perf_counter()
    local = fit(train_config(tmp_path, synthetic_root, *common, "storage.name=disk"), quiet=True)
    local_s = time.perf_counter() - t0

    monkeypatch.setenv("INFOSAM_STAGING", str(tmp_path / "machine1"))
    cfg = train_config(
        tmp_path, synthetic_root, *common, "storage.path=s3://bkt/runs", "storage.name=s3run"
    )
    t0 = time.perf_counter()
    first = fit(cfg, quiet=True)
    s3_s = time.perf_counter() - t0
    with capsys.disabled():  # the overhead of object storage, for the docs
        for where, r, wall in (("disk", local, local_s), ("S3", first, s3_s)):
            t = r.timings  # training, and Train's own share (checkpoints, reports)
            print(
                f"\n[measured] {where}: fit {wall:.1f}s, train {t['train_s']:.2f}s, "
                f"checkpoints+reports {t['train_overhead_s']:.2f}s"
            )
    keys = bucket_keys(s3, "runs/s3run/")
    assert {"runs/s3run/run_config.json", "runs/s3run/mlflow_run_id"} <= set(keys)
    assert {f"runs/s3run/checkpoint_epoch_0001/{f}" for f in ("state.pt", "history.json")} <= set(
        keys
    )
    assert first.checkpoint_dir == "s3://bkt/runs/s3run/checkpoint_epoch_0001"
    assert first.metrics["epoch"] == local.metrics["epoch"] == 1
    run_id = s3.get_object(Bucket="bkt", Key="runs/s3run/mlflow_run_id")["Body"].read().decode()
    assert run_id.strip() == first.run_id

    # Another machine (an empty working copy) resumes the same run from the bucket alone.
    monkeypatch.setenv("INFOSAM_STAGING", str(tmp_path / "machine2"))
    capsys.readouterr()
    again = fit(cfg, quiet=True)
    assert again.run_id == first.run_id
    assert "resumed from checkpoint of epoch 1" in capsys.readouterr().out
    # What machine2 pulled is the bucket's complete checkpoint: the student loads from it.
    copies = sorted((tmp_path / "machine2").rglob("checkpoint_epoch_0001"))
    assert copies, "the resume pulled no checkpoint"
    _, loaded_cfg, _ = load_trained(copies[-1])
    assert loaded_cfg.storage.name == "s3run"
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))
