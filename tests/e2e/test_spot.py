"""Spot instances on a simulated cluster (slow): a lost node, an announced reclaim, elastic 2-1-2.

The drills live in `experiments/bench_spot.py` (users run them too); these tests hold them to
what the README promises: each step in MLflow exactly once, the run FINISHED, the restarts
recorded with where each resumed from.
"""

import sys

import pytest

from tests.helpers import ROOT, bucket_keys

sys.path.insert(0, str(ROOT / "experiments"))
import bench_spot

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]


def _last_registered_before(out, key):
    t = out["events"][key]
    return max(e for e, stamp in out["registered_at"].items() if stamp <= t)


def _exactly_once(out, epochs):
    assert out["status"] == "FINISHED", out["tags"]
    assert [int(h["epoch"]) for h in out["history"]] == list(range(epochs))
    for key, steps in out["steps"].items():
        assert steps == list(range(epochs)), (key, steps)


def test_lost_node_resumes_from_the_last_checkpoint_in_the_bucket(
    _ray_session, s3, tmp_path, synthetic_root, monkeypatch
):
    """As on a cloud cluster: checkpoints in object storage (the loopback S3 server; the nodes
    inherit its AWS_* variables as an instance profile gives them), the run resumed from there."""
    monkeypatch.chdir(tmp_path)
    out = bench_spot.run(
        "node-loss",
        tmp_path,
        data_root=synthetic_root,
        epochs=4,
        storage="s3://bkt/runs",
        overrides=(f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",),
    )
    print("node-loss:", out["time_lost_s"], out["epoch_gaps_s"], out["tags"])
    _exactly_once(out, 4)
    tags = out["tags"]
    assert tags["infosam.restarts"] == "1" and tags["infosam.restart_reasons"] == "failure"
    assert tags["infosam.world_sizes"] == "2,2"
    resumed = _last_registered_before(out, "node_lost")
    assert tags["infosam.resumed_from_epochs"] == str(resumed)
    assert out["time_lost_s"] is not None and out["time_lost_s"] > 0
    keys = bucket_keys(s3, "runs/node-loss/")
    states = {k.split("/")[2] for k in keys if k.endswith("/state.pt")}
    assert "checkpoint_epoch_0003" in states, keys  # older ones pruned (checkpoint.num_to_keep)
    # a URI a user can pass to `infosam evaluate --checkpoint`, in the result and in MLflow
    assert out["checkpoint_dir"] == "s3://bkt/runs/node-loss/checkpoint_epoch_0003", out
    assert tags["infosam.checkpoint"] == out["checkpoint_dir"]
    # the run's MLflow artifacts went beside its checkpoints, not to ./mlruns of some process
    assert [k for k in bucket_keys(s3, "runs/mlartifacts/spot/") if not k.endswith("/")]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlflow.db"]  # nothing went to disk


def test_reclaim_notice_checkpoints_mid_epoch_and_the_run_resumes_there(_ray_session, tmp_path):
    # The smoke data (120 training images, 8-22 s epochs on 2 cores) so the notice ends mid-epoch;
    # 8 s leaves a slow machine time to reach a step check and checkpoint (4 s did not there).
    out = bench_spot.run(
        "preemption", tmp_path, epochs=3, notice_s=8.0, overrides=("data.synth_scale=1.0",)
    )
    print("preemption:", out["time_lost_s"], out["epoch_gaps_s"], out["tags"])
    _exactly_once(out, 3)
    tags = out["tags"]
    label = tags["infosam.preemption_checkpoint"]  # "epoch@step", taken on the notice
    epoch, step = map(int, label.split("@"))
    assert step > 0 and epoch >= _last_registered_before(out, "notice")
    assert float(tags["infosam.preemption_checkpoint_time"]) > out["events"]["notice"]
    assert tags["infosam.preempted_ranks"]
    restarts = int(tags["infosam.restarts"])
    assert restarts >= 1 and "preemption" in tags["infosam.restart_reasons"].split(",")
    # The restart resumed from the notice's checkpoint, unless the epoch it was in finished
    # (and registered) before the reclaim deadline: then from that newer epoch.
    resumed = tags["infosam.resumed_from_epochs"].split(",")[-1]
    assert resumed == label or int(resumed.split("@")[0]) >= epoch, (resumed, label)


def test_elastic_run_shrinks_and_grows_back_on_the_same_loss_trajectory(
    _ray_session, tmp_path_factory
):
    from orchestrator.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("four")
    synthesize(root, ["camouflage"], seed=1, counts={"train": 4, "val": 2, "test": 2}, sheets=False)
    out = bench_spot.run("elastic", tmp_path_factory.mktemp("elastic"), data_root=root, epochs=5)
    print("elastic:", out["time_lost_s"], out["epoch_gaps_s"], out["tags"])
    _exactly_once(out, 5)
    tags = out["tags"]
    assert tags["infosam.world_sizes"] == "2,1,2", tags
    assert tags["infosam.restart_reasons"] == "failure,resize", tags
    sizes = [int(h["scaling/world_size"]) for h in out["history"]]
    assert 1 in sizes and sizes[-1] == 2, sizes
    # The global batch stays 4 (2 x 2, then 1 x 4): the losses follow the uninterrupted run's
    # within the tolerance of the 1-vs-2-worker test.
    for key in ("train/loss", "train/segmentation", "train/compression", "train/distillation"):
        got = [h[key] for h in out["history"]]
        want = [h[key] for h in out["reference_history"]]
        assert got == pytest.approx(want, rel=2e-4, abs=2e-5), (key, got, want)
