"""Ray Train + MLflow, for real: local mode, DDP equivalence, and a SIGKILLed worker."""

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.cli import main as cli
from orchestrator.config import ConfigError
from orchestrator.train.driver import fit
from orchestrator.train.evaluation import evaluate_checkpoint
from tests.helpers import ROOT, train_config

pytestmark = pytest.mark.timeout(420)
SMOKE = ROOT / "experiments" / "configs" / "smoke.yaml"


def _artifacts(client, run_id, path=""):
    out = []
    for f in client.list_artifacts(run_id, path):
        out += _artifacts(client, run_id, f.path) if f.is_dir else [f.path]
    return out


def test_local_mode_beats_zero_shot_teacher_and_is_tracked(
    ray_local, tmp_path, synthetic_root, capsys
):
    cfg = train_config(
        tmp_path,
        synthetic_root,
        "scaling.num_workers=0",
        "optim.epochs=2",
        "optim.lr=0.001",
        "tracking.log_model=null",  # the default: a run of its own logs its MLflow model
    )
    result = fit(cfg, quiet=True)
    m = result.metrics
    assert m["val/iou"] > m["val/zero_shot_iou"] + 0.05, m
    assert m["test/iou"] > m["test/zero_shot_iou"], m
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    params = run.data.params
    assert params["optim.lr"] == "0.001" and params["tuning.method"] == "adapter"
    assert int(params["trainable_params"]) > 0 and params["optim.eval_protocol"] == "clean"
    for key in (
        "train/loss",
        "train/segmentation",
        "train/compression",
        "train/distillation",
        "val/iou",
    ):
        assert [x.step for x in client.get_metric_history(result.run_id, key)] == [0, 1], key
    assert "test/iou" in run.data.metrics and "train/images_per_s" in run.data.metrics
    files = _artifacts(client, result.run_id)
    for name in (
        "config.yaml",
        "data_manifest.json",
        "plots/loss_curve.png",
        "overlays/val_teacher_student_gt.png",
    ):
        assert name in files, files
    # what it was trained on: the runs table's Dataset column, one input per split
    inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
    assert sorted(inputs) == ["test", "train", "val"]
    assert inputs["train"].name == "camouflage/train" and inputs["train"].source_type == "local"
    assert json.loads(inputs["train"].profile)["samples"] == 32
    assert json.loads(inputs["test"].profile) == {
        "unit": "image",
        "samples": 8,
        "source_format": "synthetic",
    }
    assert len({i.digest for i in inputs.values()}) == 3
    # its MLflow model: the runs table's Models column, with the last epoch's metrics
    model = client.get_logged_model(result.model_uri.removeprefix("models:/"))
    assert model.source_run_id == result.run_id and model.status == "READY"
    assert [o.model_id for o in run.outputs.model_outputs] == [model.model_id]
    assert {(x.key, x.step) for x in model.metrics} >= {("val/iou", 1), ("test/iou", 1)}
    assert model.tags["infosam.checkpoint"] == result.checkpoint_dir
    # The checkpoint evaluates to what the run logged, through the API and the CLI.
    data_dir = synthetic_root / "camouflage"
    again = evaluate_checkpoint(result.checkpoint_dir, data_dir, split="test")
    assert again["iou"] == pytest.approx(m["test/iou"], abs=1e-6)
    capsys.readouterr()
    assert cli(["evaluate", "--checkpoint", result.checkpoint_dir, "--data", str(data_dir)]) == 0
    assert json.loads(capsys.readouterr().out)["iou"] == pytest.approx(m["test/iou"], abs=1e-6)


def test_two_workers_match_one_worker_with_gathered_relations(ray_local, tmp_path_factory):
    from orchestrator.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("four")
    synthesize(root, ["camouflage"], seed=1, counts={"train": 4, "val": 2, "test": 2}, sheets=False)
    common = [
        "optim.epochs=3",
        "optim.batch_size=4",
        "optim.lr=0.001",
        "data.prompt=box",
        "data.box_jitter=0",
        "data.shuffle_buffer=0",
        "tracking.overlays=0",
    ]
    one = fit(
        train_config(tmp_path_factory.mktemp("one"), root, "scaling.num_workers=1", *common),
        quiet=True,
    )
    two = fit(
        train_config(tmp_path_factory.mktemp("two"), root, "scaling.num_workers=2", *common),
        quiet=True,
    )
    for key in ("train/loss", "train/segmentation", "train/compression", "train/distillation"):
        a = [h[key] for h in one.history]
        b = [h[key] for h in two.history]
        assert len(a) == len(b) == 3
        assert b == pytest.approx(a, rel=2e-4, abs=2e-5), (key, a, b)


def _train_workers() -> list[int]:
    """PIDs of live Ray Train worker actors (Ray's state API; the suite's Ray runs a dashboard)."""
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True
    )
    return [a.pid for a in actors if a.pid]


def test_killed_worker_resumes_from_checkpoint_with_continuous_history(
    ray_local, tmp_path, synthetic_root
):
    cfg = train_config(
        tmp_path,
        synthetic_root,
        "optim.epochs=4",
        "scaling.num_workers=2",
        "scaling.max_failures=1",
        "storage.name=killed",
        "tracking.overlays=0",
    )
    run_dir = tmp_path / "runs" / "killed"
    killed: list[int] = []

    def killer() -> None:
        # Kill only once Ray Train's controller has registered the epoch-0 checkpoint (it
        # writes its snapshot after registering): a directory on disk alone is not yet a
        # checkpoint the restarted group would resume from.
        snapshot = run_dir / "checkpoint_manager_snapshot.json"
        deadline = time.time() + 300
        while time.time() < deadline and not (
            snapshot.exists() and "checkpoint_epoch_0000" in snapshot.read_text(errors="replace")
        ):
            time.sleep(0.2)
        workers = _train_workers()
        if workers:
            os.kill(workers[-1], signal.SIGKILL)
            killed.append(workers[-1])

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    result = fit(cfg, quiet=True)
    thread.join(timeout=5)
    assert killed, "no training worker was found to kill"
    assert [int(h["epoch"]) for h in result.history] == [0, 1, 2, 3]
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("infosam.resumed_from_epochs"), run.data.tags
    for key in ("train/loss", "val/iou"):
        steps = [x.step for x in client.get_metric_history(result.run_id, key)]
        assert sorted(steps) == [0, 1, 2, 3], (key, steps)


def test_crashed_run_is_marked_failed(ray_local, tmp_path, synthetic_root):
    cfg = train_config(
        tmp_path,
        synthetic_root,
        "scaling.num_workers=0",
        "optim.epochs=1",
        "data.train_split=val",
        "optim.batch_size=16",
    )
    with pytest.raises(Exception, match="no full batch"):
        fit(cfg, quiet=True)
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("test")
    runs = client.search_runs([exp.experiment_id])
    assert [r.info.status for r in runs] == ["FAILED"]


class _Faults:
    """Worker-loop wrapper that SIGKILLs a worker at chosen moments of `ray.train.report`.

    `plan` is a sequence of (moment, rank, epoch), fired in order, each once (marker files in
    `marker_dir` survive the restart). Moments: "after_report": the checkpoint has been
    persisted to storage and the report queued, the controller has not registered it yet (the
    window of the issue); "before_report": the epoch's training is done, nothing of it reported
    (waits until the previous epoch is registered, so the restart has a checkpoint).
    Each marker records what Ray Train's snapshot held when the worker died.
    """

    def __init__(self, marker_dir: str, plan: list[tuple[str, int, int]]) -> None:
        self.marker_dir, self.plan = marker_dir, plan

    def __call__(self, loop_config: dict) -> None:
        import ray.train

        from orchestrator.train.worker import train_loop_per_worker

        rank = ray.train.get_context().get_world_rank()
        snapshot = os.path.join(
            ray.train.get_context().get_storage().experiment_fs_path,
            "checkpoint_manager_snapshot.json",
        )
        real = ray.train.report

        def report(metrics, checkpoint=None, **kwargs):
            self._maybe_kill("before_report", rank, metrics["epoch"], snapshot)
            real(metrics, checkpoint=checkpoint, **kwargs)
            self._maybe_kill("after_report", rank, metrics["epoch"], snapshot)

        ray.train.report = report
        train_loop_per_worker(loop_config)

    def _maybe_kill(self, moment: str, rank: int, epoch: int, snapshot: str) -> None:

        def registered(e: int) -> bool:
            path = Path(snapshot)
            return path.exists() and f"checkpoint_epoch_{e:04d}" in path.read_text("latin-1")

        for i, step in enumerate(self.plan):
            marker = Path(self.marker_dir) / f"fault{i}.json"
            if marker.exists():
                continue
            if tuple(step) != (moment, rank, epoch):
                return  # the next fault to fire is another one
            if moment == "before_report" and epoch > 0:
                deadline = time.time() + 120
                while not registered(epoch - 1) and time.time() < deadline:
                    time.sleep(0.1)
            persisted = (Path(snapshot).parent / f"checkpoint_epoch_{epoch:04d}").is_dir()
            record = {
                "registered": registered(epoch),
                "persisted": persisted,
                "previous_registered": epoch > 0 and registered(epoch - 1),
            }
            marker.write_text(json.dumps(record))
            os.kill(os.getpid(), signal.SIGKILL)


def test_metric_steps_logged_exactly_once_when_workers_die_around_reports(
    ray_local, tmp_path, synthetic_root
):
    """Issue 18: a worker killed after its checkpoint was persisted but before the controller
    registered it, then one killed before reporting an epoch: every step is in MLflow once."""
    import sys

    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    cfg = train_config(
        tmp_path,
        synthetic_root,
        "optim.epochs=3",
        "scaling.num_workers=2",
        "scaling.max_failures=2",
        "tracking.overlays=0",
    )
    markers = tmp_path / "faults"
    markers.mkdir()
    plan = [("after_report", 0, 0), ("before_report", 1, 1)]
    result = fit(cfg, quiet=True, train_loop=_Faults(str(markers), plan))
    window = json.loads((markers / "fault0.json").read_text())
    before = json.loads((markers / "fault1.json").read_text())
    # The first kill landed in the window: persisted, not registered; the second after epoch 0.
    assert window == {"registered": False, "persisted": True, "previous_registered": False}
    assert before["registered"] is False and before["previous_registered"] is True, before
    assert [int(h["epoch"]) for h in result.history] == [0, 1, 2]
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    tags = run.data.tags
    assert tags["infosam.restarts"] == "2" and tags["infosam.worker_failures"] == "2", tags
    assert tags["infosam.resumed_from_epochs"] == "none,0", tags
    assert tags["infosam.restart_reasons"] == "failure,failure", tags
    assert tags["infosam.world_sizes"] == "2,2,2", tags
    for key in ("train/loss", "train/segmentation", "val/iou", "time/train_s"):
        points = client.get_metric_history(result.run_id, key)
        assert sorted(p.step for p in points) == [0, 1, 2], (key, points)
    # The value kept for a re-run epoch is the one of the attempt that counts (the checkpoint's).
    logged = {p.step: p.value for p in client.get_metric_history(result.run_id, "train/loss")}
    assert logged == pytest.approx({int(h["epoch"]): h["train/loss"] for h in result.history})


def test_resuming_a_run_name_with_another_config_is_refused(
    ray_local, tmp_path, synthetic_root, capsys
):
    """Re-using `storage.name` resumes the run; with a changed configuration it would resume
    the old optimiser state under new MLflow parameters, so it is refused unless asked for."""
    args = ["scaling.num_workers=0", "optim.epochs=1", "storage.name=r", "tracking.overlays=0"]
    first = fit(train_config(tmp_path, synthetic_root, *args), quiet=True)
    assert [int(h["epoch"]) for h in first.history] == [0]
    again = fit(train_config(tmp_path, synthetic_root, *args), quiet=True)  # unchanged: resumes
    assert again.run_id == first.run_id
    changed = train_config(tmp_path, synthetic_root, *args, "optim.lr=0.05")
    with pytest.raises(ConfigError, match=r"optim\.lr: 0\.001 -> 0\.05"):
        fit(changed, quiet=True)
    sets = [
        x
        for a in [
            *args,
            f"data.root={synthetic_root}",
            "data.synthesize=false",
            f"storage.path={tmp_path / 'runs'}",
            "tracking.experiment=test",
            "optim.lr=0.05",
        ]
        for x in ("--set", a)
    ]
    capsys.readouterr()
    assert cli(["train", "--config", str(SMOKE), *sets]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: run 'r'") and "--allow-config-change" in err
    assert "Traceback" not in err
    recorded = json.loads((tmp_path / "runs" / "r" / "run_config.json").read_text())
    assert recorded["optim.lr"] == 0.001
    resumed = fit(changed, quiet=True, allow_config_change=True)
    assert resumed.run_id == first.run_id
    recorded = json.loads((tmp_path / "runs" / "r" / "run_config.json").read_text())
    assert recorded["optim.lr"] == 0.05


def test_a_run_without_a_teacher_draws_its_overlays(ray_local, tmp_path, synthetic_root):
    """No InfoSAM and no KD: no teacher is built, and the overlay sheet has no teacher column
    (it raised KeyError('teacher') after the last epoch and marked the run FAILED)."""
    from PIL import Image

    cfg = train_config(
        tmp_path,
        synthetic_root,
        "scaling.num_workers=0",
        "optim.epochs=1",
        "loss.infosam=false",
        "tuning.method=lora",
    )
    result = fit(cfg, quiet=True)
    client = MlflowClient(result.tracking_uri)
    assert client.get_run(result.run_id).info.status == "FINISHED"
    path = client.download_artifacts(
        result.run_id, "overlays/val_teacher_student_gt.png", str(tmp_path)
    )
    assert Image.open(path).width == 3 * 192  # image, gt, student
