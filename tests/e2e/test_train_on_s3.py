"""Training whose run folder is a bucket (a real S3-protocol server on loopback): checkpoints,
the run's config and its MLflow run id land in the bucket, a run resumed from a fresh machine
(an empty working copy) continues from them, and `evaluate` / `predict` / `export` take the
checkpoint's URI. MLflow artifacts reach the bucket through `infosam tracking serve`. The
bucket is read with boto3."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infosam.sam import load_exported
from orchestrator.cli import main as cli
from orchestrator.storage import local_copy
from orchestrator.tracking.server import free_port
from orchestrator.train.checkpoints import load_trained
from orchestrator.train.driver import fit
from tests.helpers import bucket_keys, rect_mask, textured_image, train_config

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

    # The checkpoint's URI is all a user needs to evaluate, export and predict with it.
    capsys.readouterr()
    data = str(synthetic_root / "camouflage")
    assert cli(["evaluate", "--checkpoint", first.checkpoint_dir, "--data", data]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["iou"] == pytest.approx(first.metrics["test/iou"], abs=1e-3)
    assert cli(["export", "--checkpoint", first.checkpoint_dir, "--out", "s3://bkt/x/s.pth"]) == 0
    (tmp_path / "s.pth").write_bytes(s3.get_object(Bucket="bkt", Key="x/s.pth")["Body"].read())
    load_exported(tmp_path / "s.pth")  # the smoke config's adapters: a self-contained file
    mask = rect_mask(96, 128, 20, 30, 70, 100)
    Image.fromarray(textured_image(96, 128, 3, [mask])).save(tmp_path / "new.png")
    masks = []
    for checkpoint in (first.checkpoint_dir, "s3://bkt/x/s.pth"):
        out = tmp_path / f"pred-{len(masks)}"
        argv = ["predict", "--checkpoint", checkpoint, "--images", str(tmp_path / "new.png")]
        assert cli([*argv, "--box", "30,20,100,70", "--out", str(out), "--device", "cpu"]) == 0
        masks.append(np.array(Image.open(out / "new_mask.png")))
    assert masks[0].shape == (96, 128) and masks[0].any()
    np.testing.assert_array_equal(masks[0], masks[1])  # the export predicts what the run does
    missing = "s3://bkt/runs/s3run/checkpoint_epoch_0042"
    assert cli(["evaluate", "--checkpoint", missing, "--data", data]) == 2
    assert f"{missing} is not a training checkpoint" in capsys.readouterr().err


def test_mlflow_artifacts_reach_the_bucket_through_the_tracking_server(
    ray_local, s3, tmp_path, synthetic_root, monkeypatch
):
    """`infosam tracking serve --artifacts-destination s3://...`: clients upload through the
    server (they hold no AWS credentials), the objects are in the bucket, the UI's API lists
    them, and the server's log holds no credential."""
    from mlflow.tracking import MlflowClient

    port = free_port()
    cmd = [str(Path(sys.executable).parent / "infosam"), "tracking", "serve", "--workers", "1"]
    cmd += ["--port", str(port), "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}"]
    cmd += ["--artifacts-destination", "s3://bkt/mlflow"]
    log = open(tmp_path / "serve.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, env=dict(os.environ), stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while "serving" not in (tmp_path / "serve.log").read_text() and time.time() < deadline:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            time.sleep(0.5)
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL"):
            monkeypatch.delenv(key)  # the client reaches the bucket only through the server
        cfg = train_config(tmp_path, synthetic_root, "scaling.num_workers=0", f"tracking.uri={url}")
        result = fit(cfg, quiet=True)
        listed = {a.path for a in MlflowClient(url).list_artifacts(result.run_id)}
        artifact_uri = MlflowClient(url).get_run(result.run_id).info.artifact_uri
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=60)
        log.close()
    assert artifact_uri.startswith("mlflow-artifacts:/"), artifact_uri  # the server's to place
    keys = bucket_keys(s3, "mlflow/")
    mine = [k for k in keys if f"/{result.run_id}/artifacts/" in k]
    assert any(k.endswith(".png") for k in mine), keys[:20]  # the overlays and plots
    assert listed and all(any(f"/artifacts/{p}" in k for k in mine) for p in listed)
    assert "test-secret" not in (tmp_path / "serve.log").read_text()


def test_the_teacher_cache_is_built_reused_and_renewed_in_the_bucket(
    ray_s3, s3, tmp_path, monkeypatch, capsys
):
    """A dataset synthesised straight into the bucket; its teacher cache is built there, reused
    by the next call, rebuilt once the dataset changes, and streamed by a training run."""
    from infosam.sam import resolve_checkpoint
    from orchestrator.config import BUILTIN_TEACHER
    from orchestrator.data.synthetic import synthesize
    from orchestrator.data.teacher_cache import ensure_teacher_cache
    from tests.helpers import cache_key

    monkeypatch.setenv("INFOSAM_STAGING", str(tmp_path / "staging"))
    counts = {"train": 16, "val": 8, "test": 8}
    synthesize("s3://bkt/data", ["camouflage"], seed=0, counts=counts, sheets=False)
    uri, teacher = "s3://bkt/data/camouflage", resolve_checkpoint(BUILTIN_TEACHER)
    prefix = f"data/camouflage/teacher_cache/{cache_key().dirname}/"

    capsys.readouterr()
    ensure_teacher_cache(uri, "train", cache_key(), checkpoint=teacher)
    assert "computing it now" in capsys.readouterr().out
    first = bucket_keys(s3, prefix)
    assert f"{prefix}cache.json" in first and any(k.endswith(".parquet") for k in first)
    stamp = s3.head_object(Bucket="bkt", Key=f"{prefix}cache.json")["LastModified"]

    cache = ensure_teacher_cache(uri, "train", cache_key(), checkpoint=teacher)
    assert "computing" not in capsys.readouterr().out, "a valid cache in the bucket was rebuilt"
    assert cache["rows"] == 16 and cache["files"][0].startswith(f"s3://bkt/{prefix}")
    assert s3.head_object(Bucket="bkt", Key=f"{prefix}cache.json")["LastModified"] == stamp

    synthesize("s3://bkt/data", ["camouflage"], seed=1, counts=counts, sheets=False)
    ensure_teacher_cache(uri, "train", cache_key(), checkpoint=teacher)
    assert "re-ingested" in capsys.readouterr().out  # other shards now: computed again
    meta = json.loads(s3.get_object(Bucket="bkt", Key=f"{prefix}cache.json")["Body"].read())
    generation = meta["splits"]["train"]["files"][0].split("/")[0]
    assert generation not in {k[len(prefix) :].split("/")[0] for k in first}

    sets = ["data.root=s3://bkt/data", "speed.teacher_cache=true", "scaling.num_workers=0"]
    cfg = train_config(tmp_path, tmp_path, *sets, "optim.epochs=1")
    result = fit(cfg, quiet=True)  # streams the bucket's cache (val/test cached on first use)
    assert result.metrics["epoch"] == 0 and result.metrics["test/iou"] > 0
    assert "teacher cache train" not in capsys.readouterr().out, "train was encoded again"


def test_a_sweep_on_object_storage_keeps_its_trials_and_best_config_in_the_bucket(
    ray_s3, s3, tmp_path, synthetic_root, monkeypatch
):
    """`infosam tune` with storage.path on s3://: Tune's trial folders, every trial's
    checkpoints and the sweep's own files (best.yaml, trials table, plot) land in the bucket,
    and the best config it names trains from there."""
    from orchestrator.config import load_config
    from orchestrator.sweep import run_sweep
    from tests.helpers import sweep_config

    monkeypatch.chdir(tmp_path)
    tcfg, base = sweep_config(
        tmp_path,
        synthetic_root,
        "optim.epochs=1",
        "tune.num_samples=1",
        "storage.path=s3://bkt/runs",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        space={"optim.lr": {"type": "grid", "values": [0.001, 0.002]}},
    )
    result = run_sweep(tcfg, base)
    assert sorted(result.table["status"]) == ["OK", "OK"], result.table
    assert result.best_yaml == f"s3://bkt/runs/{tcfg.name}/best.yaml"
    keys = set(bucket_keys(s3, f"runs/{tcfg.name}/"))
    for name in ("best.yaml", "trials.csv", "trials.md", "weights_vs_metric.png"):
        assert f"runs/{tcfg.name}/{name}" in keys, sorted(keys)
    trial_states = [k for k in keys if k.endswith("/state.pt")]
    assert len({k.split("/checkpoint_epoch_")[0] for k in trial_states}) == 2, sorted(keys)
    best = load_config(local_copy(result.best_yaml), ["scaling.num_workers=0"])
    assert best.storage.path == "s3://bkt/runs" and best.optim.lr in (0.001, 0.002)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db", "sweep.yaml"]
