"""Spot drills on a simulated multi-node Ray cluster on one machine: what a reclaimed node costs.

    python experiments/bench_spot.py node-loss    # a node hosting a Train worker vanishes mid-epoch
    python experiments/bench_spot.py preemption   # a node is drained with a reclaim notice first
    python experiments/bench_spot.py elastic      # num_workers [1, 2]: 2 -> 1 -> 2 workers

Each drill starts Ray's own test cluster (`ray.cluster_utils.Cluster`): a head that runs the
driver and Ray Train's controller (no slot: Ray Train pins its controller to the node that calls
`fit`, so that node must stay up) and two nodes advertising one `slot` each, a custom resource
standing for an accelerator, so one Train worker lands on each. It trains the smoke
configuration in a thread and acts on the cluster when Ray Train's checkpoint snapshot shows the
epoch it waits for as registered. It reports the run's MLflow tags, the steps logged per metric,
and the time lost: the gap between the two registrations around the event minus the shortest
gap between undisturbed epochs.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 150 * 2**20}
SNAPSHOT = "checkpoint_manager_snapshot.json"
KEYS = ("train/loss", "train/segmentation", "val/iou", "scaling/world_size")


class HoldAfterEpoch:
    """Worker-loop wrapper for the elastic drill: a long epoch, simulated.

    After its first report with one worker, the worker waits (up to `hold_s`) instead of
    starting the next epoch, so the run is still going when capacity returns and Ray Train's
    resize monitor restarts it with two workers. Losses are untouched.
    """

    def __init__(self, hold_s: float = 300.0) -> None:
        self.hold_s = hold_s

    def __call__(self, loop_config: dict[str, Any]) -> None:
        import ray.train

        from orchestrator.train.worker import train_loop_per_worker

        real = ray.train.report
        world = ray.train.get_context().get_world_size()

        def report(metrics, checkpoint=None, **kwargs):
            real(metrics, checkpoint=checkpoint, **kwargs)
            if world == 1:
                time.sleep(self.hold_s)

        ray.train.report = report
        train_loop_per_worker(loop_config)


def _read_text(location: str) -> str | None:
    """A file's text from a local folder or a bucket alike; None while it does not exist."""
    from orchestrator.storage import filesystem

    fs, where = filesystem(location)
    try:
        with fs.open_input_stream(where) as f:
            return f.read().decode("latin-1")
    except OSError:  # missing (FileNotFoundError) or not readable yet
        return None


def registered(run_dir: str) -> list[str]:
    """Checkpoint directory names Ray Train's controller has registered, oldest first."""
    from orchestrator.storage import join

    text = _read_text(join(run_dir, SNAPSHOT))
    if text is None:
        return []
    return sorted(set(re.findall(r"checkpoint_epoch_\d{4}(?:_step_\d{5})?", text)))


def wait_for(
    condition, timeout: float, what: str, *, alive: threading.Thread | None = None
) -> None:
    """Poll `condition`; give up after `timeout` or as soon as the training thread ended."""
    deadline = time.time() + timeout
    while not condition():
        if alive is not None and not alive.is_alive():
            raise RuntimeError(f"training ended while waiting for {what}")
        if time.time() > deadline:
            raise TimeoutError(f"waited {timeout:.0f} s for {what}")
        time.sleep(0.2)


def worker_nodes() -> list[str]:
    """Node ids hosting a live Ray Train worker (Ray's state API)."""
    from ray.util.state import list_actors

    actors = list_actors(
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")], detail=True
    )
    return sorted({a.node_id for a in actors if a.node_id})


def drain(node_id: str, notice_s: float) -> int:
    """What a cloud's reclaim notice becomes in Ray: a drain with the preemption reason."""
    import ray
    from ray._raylet import GcsClient
    from ray.core.generated import autoscaler_pb2

    client = GcsClient(address=ray.get_runtime_context().gcs_address)
    deadline_ms = int((time.time() + notice_s) * 1000)
    accepted, message = client.drain_node(
        node_id,
        autoscaler_pb2.DrainNodeReason.Value("DRAIN_NODE_REASON_PREEMPTION"),
        "spot reclaim (drill)",
        deadline_ms,
    )
    if not accepted:
        raise RuntimeError(f"drain of {node_id} refused: {message}")
    return deadline_ms


def config(workdir: Path, data_root: Path | None, *overrides: str, storage: str | None = None):
    from orchestrator.config import load_config

    base = [
        f"storage.path={storage or workdir / 'runs'}",
        "tracking.experiment=spot",
        "tracking.overlays=0",
        "scaling.worker_resources={slot: 1}",
        "scaling.cpus_per_worker=0.5",
        "scaling.max_failures=2",
    ]
    if data_root is not None:
        base += [f"data.root={data_root}", "data.synthesize=false"]
    else:
        base += [f"data.root={workdir / 'data'}"]
    return load_config(ROOT / "experiments" / "configs" / "smoke.yaml", [*base, *overrides])


def _epochs_on(run_dir: str, cfg: Any, world: int) -> bool:
    """Whether MLflow holds an epoch trained by `world` workers (metric `scaling/world_size`)."""
    from mlflow.tracking import MlflowClient

    from orchestrator.storage import join
    from orchestrator.tracking.runs import resolve_tracking_uri

    run_id = _read_text(join(run_dir, "mlflow_run_id"))
    if run_id is None:
        return False
    client = MlflowClient(resolve_tracking_uri(cfg.tracking.uri, cfg.storage.path))
    points = client.get_metric_history(run_id.strip(), "scaling/world_size")
    return any(int(p.value) == world for p in points)


def _find_node(cluster: Any, node_id: str) -> Any:
    for node in cluster.worker_nodes:
        if node.node_id == node_id:
            return node
    raise RuntimeError(f"node {node_id} is not a worker node of this cluster")


def _summary(result: Any, events: dict[str, float]) -> dict[str, Any]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    steps = {
        k: sorted(p.step for p in client.get_metric_history(result.run_id, k))
        for k in KEYS
        if k in run.data.metrics
    }
    stamps = {p.step: p.timestamp / 1000 for p in client.get_metric_history(result.run_id, KEYS[0])}
    epochs = sorted(stamps)
    gaps = {e: stamps[e] - stamps[e - 1] for e in epochs[1:]}
    event_t = min(events.values()) if events else None
    hit = [e for e in gaps if event_t is not None and stamps[e - 1] <= event_t < stamps[e]]
    calm = [g for e, g in gaps.items() if e not in hit]
    lost = None
    if hit and calm:
        lost = sum(gaps[e] for e in hit) - len(hit) * min(calm)
    return {
        "status": run.info.status,
        "tags": {k: v for k, v in run.data.tags.items() if k.startswith("infosam.")},
        "steps": steps,
        "history": result.history,
        "registered_at": stamps,
        "events": events,
        "epoch_gaps_s": gaps,
        "time_lost_s": lost,
        "checkpoint_dir": result.checkpoint_dir,
    }


def run(
    drill: str,
    workdir: Path,
    *,
    data_root: Path | None = None,
    epochs: int = 4,
    notice_s: float = 3.0,
    start_timeout_s: float = 30.0,
    overrides: tuple[str, ...] = (),
    storage: str | None = None,
) -> dict[str, Any]:
    """Run one drill on a fresh simulated cluster; returns `_summary` plus drill specifics.
    `storage` is the runs' location (default `workdir/runs`), a bucket such as s3://b/runs
    included: the nodes then read and write checkpoints there, as on a cloud cluster."""
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.train.driver import fit

    if drill not in ("node-loss", "preemption", "elastic"):
        raise ValueError(f"unknown drill {drill!r}: node-loss, preemption or elastic")
    if __name__ != "__main__":  # imported (tests): workers cannot import experiments/
        import ray.cloudpickle

        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    workdir = Path(workdir)
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20},
    )
    saved: dict[str, str | None] = {}  # environment to restore
    try:
        for _ in range(2):
            cluster.add_node(resources={"slot": 1}, **NODE_ARGS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        extra = [f"optim.epochs={epochs}", f"storage.name={drill}", *overrides]
        train_loop = None
        env: dict[str, str] = {}  # Ray Train settings (propagated to its controller)
        out: dict[str, Any] = {}
        if drill == "elastic":
            # One batch per epoch (4 images, batch 4) and deterministic prompts: then a run's
            # losses do not depend on how many workers share the batch, which is what the drill
            # checks against an uninterrupted two-worker run.
            extra += [
                "scaling.num_workers=[1, 2]",
                "scaling.elastic_resize_interval_s=2",
                "optim.batch_size=4",
                "data.prompt=box",
                "data.box_jitter=0",
                "data.shuffle_buffer=0",
            ]
            reference = fit(
                config(
                    workdir,
                    data_root,
                    *extra,
                    "scaling.num_workers=2",
                    "storage.name=elastic-reference",
                    storage=storage,
                ),
                quiet=True,
            )
            out["reference_history"] = reference.history
            train_loop = HoldAfterEpoch()
            # Right after a node is lost, Ray's view of free capacity can still count it: the
            # first restart then waits for a worker that cannot start, for Ray Train's start
            # timeout (60 s default), before shrinking. Shortened here; see the README.
            env["RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S"] = str(start_timeout_s)
        if drill == "preemption":
            extra += ["scaling.preemption_check_steps=1"]
            # Ray Train's watcher polls the drain state every 5 s by default; the drill's
            # notice is short, so poll every second (propagated to the controller).
            env["RAY_TRAIN_PREEMPTION_POLL_INTERVAL_S"] = "1"
        saved.update({k: os.environ.get(k) for k in env})
        os.environ.update(env)
        from orchestrator.storage import join

        cfg = config(workdir, data_root, *extra, storage=storage)
        run_dir = join(cfg.storage.path, drill)
        holder: dict[str, Any] = {}

        def target() -> None:
            try:
                kwargs = {"train_loop": train_loop} if train_loop else {}
                holder["result"] = fit(cfg, quiet=True, **kwargs)
            except BaseException as exc:  # surfaced below
                holder["error"] = exc

        thread = threading.Thread(target=target, daemon=True)
        thread.start()
        events: dict[str, float] = {}
        try:
            wait_for(
                lambda: "checkpoint_epoch_0000" in registered(run_dir), 600, "epoch 0", alive=thread
            )
        except RuntimeError:
            thread.join()
            raise holder.get("error") or RuntimeError("training ended before epoch 0") from None
        if drill != "preemption":  # a notice right at the start of epoch 1: the reclaim
            time.sleep(1.0)  # comes before the epoch can end, else well into epoch 1
        victim = worker_nodes()[-1]
        if drill == "preemption":
            deadline_ms = drain(victim, notice_s)
            events["notice"] = time.time()
            print(f"[spot] drained {victim[:8]}, reclaim in {notice_s:.0f} s", flush=True)
            cluster.add_node(resources={"slot": 1}, **NODE_ARGS)  # the replacement
            time.sleep(max(deadline_ms / 1000 - time.time(), 0))
            cluster.remove_node(_find_node(cluster, victim), allow_graceful=False)
            events["reclaimed"] = time.time()
            out["deadline"] = deadline_ms / 1000
        else:
            cluster.remove_node(_find_node(cluster, victim), allow_graceful=False)
            events["node_lost"] = time.time()
            print(f"[spot] removed node {victim[:8]}", flush=True)
            if drill == "node-loss":
                cluster.add_node(resources={"slot": 1}, **NODE_ARGS)
            else:  # elastic: carry on with one worker, then capacity returns
                # Capacity returns once an epoch was registered by the shrunk group (a
                # registration alone could still be the two-worker group's last one).
                wait_for(
                    lambda: _epochs_on(run_dir, cfg, 1), 600, "an epoch on 1 worker", alive=thread
                )
                cluster.add_node(resources={"slot": 1}, **NODE_ARGS)
                events["node_added"] = time.time()
                print("[spot] added a node", flush=True)
        thread.join(timeout=900)
        if thread.is_alive():
            raise TimeoutError("training did not finish within 15 minutes of the event")
        if "error" in holder:
            raise holder["error"]
        out.update(_summary(holder["result"], events))
        out["victim"] = victim
        return out
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        ray.shutdown()
        cluster.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("drill", choices=["node-loss", "preemption", "elastic"])
    p.add_argument("--workdir", type=Path, default=Path("runs/spot-drill"))
    p.add_argument("--data-root", type=Path, default=None)
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--notice-s", type=float, default=3.0)
    p.add_argument(
        "--storage",
        default=None,
        help="runs' location, e.g. s3://bucket/runs (default WORKDIR/runs)",
    )
    args = p.parse_args(argv)
    out = run(
        args.drill,
        args.workdir,
        data_root=args.data_root,
        epochs=args.epochs,
        notice_s=args.notice_s,
        storage=args.storage,
    )
    keep = ("status", "tags", "steps", "epoch_gaps_s", "time_lost_s", "events")
    print(json.dumps({k: out[k] for k in keep}, indent=2, default=str))
    return 0 if out["status"] == "FINISHED" else 1


if __name__ == "__main__":
    sys.exit(main())
