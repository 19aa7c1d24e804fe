"""Autoscaling from zero on one machine: `cluster.yaml`'s node types on Ray's own fake multi-node
provider (`fake_multinode`), a benchmark submitted with `ray job submit`, and what happened.

The fake provider starts each "node" as a set of Ray processes on this machine, with the
resources its node type declares, when the autoscaler asks for one, and kills it when the
autoscaler removes it. What changes against `cluster.yaml`, and only that:
  * the head (`CPU: 0`, the `driver` resource) is the fake provider's `ray.head.default`;
  * a GPU node type advertises a custom resource `accelerator_slot` (one per GPU) instead of
    `GPU`, and `cpus_per_slot` logical CPUs per GPU, so cells that reserve a slot land on them
    and nothing tries CUDA;
  * `min_workers: 0` for every type (from zero), `max_workers` capped by `max_nodes`, and a
    short `idle_timeout_minutes` so the removal of idle nodes is seen within a test.
Run it inside a PID namespace (`unshare --fork --pid --mount-proc`): the `ray stop` at the end
then reaches only the processes this run started.
"""

from __future__ import annotations

import itertools
import json
import os
import secrets
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["SLOT", "AutoscalerReport", "SimulatedCluster", "report", "simulated_autoscaling_config"]


SLOT = "accelerator_slot"  # the custom resource standing for a simulated GPU


FAKE_HEAD = "ray.head.default"  # the head node type the fake provider registers itself


# The fake provider starts nodes in-process: no sync, no setup, no start commands.
_NOTHING_TO_RUN: dict[str, Any] = {
    "auth": {},
    "docker": {},
    "file_mounts": {},
    "cluster_synced_files": [],
    "file_mounts_sync_continuously": False,
    "rsync_exclude": [],
    "rsync_filter": [],
    "initialization_commands": [],
    "setup_commands": [],
    "head_setup_commands": [],
    "worker_setup_commands": [],
    "head_start_ray_commands": [],
    "worker_start_ray_commands": [],
}


def simulated_autoscaling_config(
    cluster: dict[str, Any],
    *,
    gcs_address: str,
    max_nodes: int = 3,
    cpus_per_slot: float = 2.0,
    idle_timeout_minutes: float = 0.25,
    only: list[str] | None = None,
) -> dict[str, Any]:
    """The autoscaling config for `ray start --head --autoscaling-config`, from a cluster.yaml
    (its worker types, or those named in `only`)."""
    types = cluster["available_node_types"]
    head = types[cluster["head_node_type"]]
    node_types: dict[str, Any] = {
        FAKE_HEAD: {
            "resources": dict(head.get("resources", {})),
            "node_config": {},
            "max_workers": 0,
        }
    }
    for name, node in types.items():
        if name == cluster["head_node_type"] or (only and name not in only):
            continue
        gpus = float(node.get("resources", {}).get("GPU", 0))
        resources = {"CPU": cpus_per_slot * max(gpus, 1), "object_store_memory": 300 * 2**20}
        if gpus:
            resources[SLOT] = gpus
        node_types[name] = {
            "resources": resources,
            "node_config": {},
            "min_workers": 0,
            "max_workers": min(int(node.get("max_workers", max_nodes)), max_nodes),
        }
    return {
        "cluster_name": f"{cluster.get('cluster_name', 'infosam')}-simulated",
        "max_workers": max_nodes,
        "upscaling_speed": float(cluster.get("upscaling_speed", 1.0)),
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "available_node_types": node_types,
        "head_node_type": FAKE_HEAD,
        **_NOTHING_TO_RUN,
    }


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SimulatedCluster:
    """A head started with the fake provider; `nodes()` samples the worker nodes alive."""

    config: dict[str, Any]
    head_resources: dict[str, float]
    port: int = field(default_factory=_free_port)
    dashboard_port: int = field(default_factory=_free_port)
    temp_dir: str = field(default_factory=lambda: tempfile.mkdtemp(prefix="ray", dir="/tmp"))
    token: str = field(default_factory=lambda: secrets.token_hex(16))  # token auth, as cluster.yaml
    samples: list[tuple[float, int, float]] = field(default_factory=list)  # (t, nodes, slots)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def environment(self) -> dict[str, str]:
        env = dict(os.environ, RAY_FAKE_CLUSTER="1", AUTOSCALER_UPDATE_INTERVAL_S="1")
        env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        env.pop("RAY_ADDRESS", None)
        return env

    def start(self) -> None:
        """`ray start --head --autoscaling-config=...` (no CPU, the head's resources)."""
        path = Path(self.temp_dir) / "autoscaling.json"
        path.write_text(json.dumps(self.config))
        res = dict(self.head_resources)
        cpus = res.pop("CPU", 0)
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "start", "--head", f"--port={self.port}", f"--num-cpus={cpus}"]
        cmd += [f"--resources={json.dumps(res)}", f"--autoscaling-config={path}"]
        cmd += ["--include-dashboard=true", "--dashboard-host=127.0.0.1"]
        cmd += [f"--dashboard-port={self.dashboard_port}", f"--temp-dir={self.temp_dir}"]
        cmd += [f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats"]
        cmd += [f"--runtime-env-agent-port={_free_port()}", f"--metrics-export-port={_free_port()}"]
        subprocess.run(cmd, env=self.environment(), check=True, capture_output=True, text=True)
        threading.Thread(target=self._sample, daemon=True).start()

    def _alive_workers(self) -> tuple[int, float]:
        """(worker nodes alive, simulated accelerator slots they hold)."""
        from ray.util.state import list_nodes

        # Unfiltered: with a state filter, a removed (DEAD) node makes the state API refuse.
        nodes = list_nodes(address=self.address, timeout=10, raise_on_missing_output=False)
        workers = [n for n in nodes if n.state == "ALIVE" and not n.is_head_node]
        return len(workers), sum(float((n.resources_total or {}).get(SLOT, 0)) for n in workers)

    def _sample(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((time.time(), *self._alive_workers()))
            except Exception as exc:  # the head starting, a node going: sample again
                self.errors.append(repr(exc))
            self._stop.wait(1.0)

    def submit(self, entrypoint: list[str], timeout_s: float) -> tuple[int, str]:
        """`ray job submit` the entrypoint; (returncode, output). Without `--working-dir`: the
        project is installed (as cluster.yaml's setup command installs it on every node), and
        the simulated nodes share one session folder, where each node's runtime-env agent
        unpacking the same working_dir package pulls it from under the others' workers."""
        ray = str(Path(sys.executable).parent / "ray")
        cmd = [ray, "job", "submit", "--address", self.address]
        cmd += ["--entrypoint-resources", json.dumps({"driver": 1}), "--", *entrypoint]
        for _ in range(30):  # the head answers before its job agent takes jobs
            job = subprocess.run(
                cmd, env=self.environment(), capture_output=True, text=True, timeout=timeout_s
            )
            if "No available agent" not in job.stdout + job.stderr:
                break
            time.sleep(2)
        return job.returncode, job.stdout + job.stderr

    def wait_for_workers(self, count: int, timeout_s: float) -> bool:
        """Until `count` worker nodes are alive (0: all removed), or the timeout."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            if self.samples and self.samples[-1][1] == count:
                return True
            time.sleep(1.0)
        return False

    def stop(self) -> None:
        """`ray stop` in this PID namespace: only what this run started."""
        self._stop.set()
        ray = str(Path(sys.executable).parent / "ray")
        subprocess.run([ray, "stop", "--force"], capture_output=True, timeout=120)


@dataclass
class AutoscalerReport:
    """What the autoscaler did for one submitted benchmark (seconds, counts)."""

    submit_to_first_node_s: float | None
    peak_nodes: int
    slots_reached: float
    cells: int
    nodes_used: int
    job_s: float  # submit to the job's end (node launch, shared data, cells, report)
    makespan_s: float  # first cell start to last cell end
    ideal_s: float
    idle_node_minutes: float
    removed_after_s: float | None

    @property
    def makespan_ratio(self) -> float:
        return self.makespan_s / max(self.ideal_s, 1e-9)

    def lines(self) -> list[str]:
        first = self.submit_to_first_node_s
        removed = self.removed_after_s
        return [
            f"first node {first:.1f} s after submit" if first is not None else "no node launched",
            f"peak {self.peak_nodes} node(s), {self.slots_reached:g} slot(s); "
            f"{self.cells} cells ran on {self.nodes_used} node(s)",
            f"cells' makespan {self.makespan_s:.1f} s vs ideal {self.ideal_s:.1f} s "
            f"(sum of cell durations / slots): {self.makespan_ratio:.2f}x; job {self.job_s:.1f} s",
            f"idle node-minutes {self.idle_node_minutes:.2f}; "
            + (f"all nodes removed {removed:.1f} s after the job" if removed else "nodes remained"),
        ]


def report(
    cluster: SimulatedCluster, cells: list[dict[str, Any]], submitted: float, finished: float
) -> AutoscalerReport:
    """Figures from the node samples and the cells' own start/end/node records. The ideal is
    the makespan a perfect packing of these cells onto the peak's slots would take: the sum of
    their durations over the slots, and never less than the longest cell."""
    samples = cluster.samples
    first = next((t for t, n, _ in samples if n > 0 and t >= submitted), None)
    peak = max((n for _, n, _ in samples), default=0)
    slots = max((k for _, _, k in samples), default=0.0)
    durations = [c["end"] - c["start"] for c in cells]
    idle = 0.0  # node-minutes with no cell on them: free slots / slots per node, integrated
    for (t0, n, k), (t1, _, _) in itertools.pairwise(samples):
        running = sum(1 for c in cells if c["start"] <= t0 < c["end"])
        idle += (max(k - running, 0) / k * n if k else n) * (t1 - t0)
    gone = next((t for t, n, _ in samples if t > finished and n == 0), None)
    return AutoscalerReport(
        submit_to_first_node_s=None if first is None else first - submitted,
        peak_nodes=peak,
        slots_reached=slots,
        cells=len(cells),
        nodes_used=len({c["node_id"] for c in cells}),
        job_s=finished - submitted,
        makespan_s=max(c["end"] for c in cells) - min(c["start"] for c in cells) if cells else 0.0,
        ideal_s=max(sum(durations) / max(slots, 1e-9), max(durations, default=0.0)),
        idle_node_minutes=idle / 60,
        removed_after_s=None if gone is None else gone - finished,
    )


def in_own_pid_namespace(argv: list[str]) -> None:
    """Re-run this process as PID 1 of a new PID namespace (with its own /proc) unless it is
    one already: `ray stop` there sees only the Ray this run starts."""
    if os.getpid() == 1:
        return
    cmd = ["unshare", "--fork", "--pid", "--mount-proc"]
    if os.geteuid() != 0:
        cmd.append("--map-root-user")
    os.execvp(cmd[0], [*cmd, sys.executable, *argv])


def benchmark_overrides(
    data_root: str, storage: str, methods: list[str], seeds: list[int]
) -> list[str]:
    """A demo-shaped benchmark whose training cells each reserve one simulated accelerator."""
    values = [
        f"benchmark.methods=[{','.join(methods)}]",
        "benchmark.datasets=[camouflage]",
        f"benchmark.seeds=[{','.join(map(str, seeds))}]",
        "benchmark.name=autoscaled",
        "benchmark.bootstrap_resamples=200",
        "optim.epochs=1",
        f"data.root={data_root}",  # synthesised by the job's driver on first use
        "data.synth_scale=0.2",
        "data.synth_counts={test: 24}",
        f"storage.path={storage}",
        f"scaling.worker_resources={{{SLOT}: 1}}",
        "scaling.cpus_per_worker=1",
    ]
    return [arg for value in values for arg in ("--set", value)]


def _cells(results: Path) -> list[dict[str, Any]]:
    """Every cell of the finished benchmark (its timeline.csv): start, end, node. The zero-shot
    rows too: they reserve a slot like training (the teacher is evaluated on a GPU node)."""
    import pandas as pd

    frame = pd.read_csv(results / "timeline.csv")
    return frame.rename(columns={"node": "node_id"})[["start", "end", "node_id"]].to_dict("records")


def _parse(argv: list[str] | None) -> Any:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--cluster", default="cluster.yaml")
    p.add_argument("--max-nodes", type=int, default=2)
    p.add_argument(
        "--node-types",
        default="gpu_1x_spot",
        help="worker types of the yaml to offer ('all': every one; gpu_4x's 4 slots would run "
        "more cells at once than a 2-core machine can compute)",
    )
    p.add_argument("--cpus-per-slot", type=float, default=2.0)
    p.add_argument("--idle-timeout-minutes", type=float, default=0.25)
    p.add_argument("--methods", default="decoder,adapter")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--workdir", help="data and results (default: a temporary folder)")
    p.add_argument("--json", help="write the figures here")
    p.add_argument("--timeout-s", type=float, default=1200)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Start the simulated cluster, submit the benchmark, wait for the nodes to go, report."""
    from orchestrator.cluster.check import load_cluster_yaml

    args = _parse(argv)
    sim = SimulatedCluster(config={}, head_resources={})
    # Ray reads its auth mode when imported: this process (list_nodes) holds the token first.
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=sim.token)
    root = Path(__file__).resolve().parents[2]
    work = Path(args.workdir or tempfile.mkdtemp(prefix="infosam-autoscale-")).resolve()
    import ray._private.services as services

    cluster = load_cluster_yaml(
        root / args.cluster if not Path(args.cluster).is_absolute() else args.cluster
    )
    head = cluster["available_node_types"][cluster["head_node_type"]]
    sim.head_resources = dict(head.get("resources", {}))
    sim.config = simulated_autoscaling_config(
        cluster,
        gcs_address=f"{services.get_node_ip_address()}:{sim.port}",
        max_nodes=args.max_nodes,
        cpus_per_slot=args.cpus_per_slot,
        idle_timeout_minutes=args.idle_timeout_minutes,
        only=None if args.node_types == "all" else args.node_types.split(","),
    )
    methods, seeds = args.methods.split(","), [int(s) for s in args.seeds.split(",")]
    entry = [str(Path(sys.executable).parent / "infosam"), "benchmark"]  # the installed CLI
    entry += benchmark_overrides(str(work / "data"), str(work / "runs"), methods, seeds)
    try:
        sim.start()
        submitted = time.time()
        rc, out = sim.submit(entry, args.timeout_s)
        finished = time.time()
        if rc != 0:
            print(out[-4000:], file=sys.stderr)
            return 1
        print("\n".join(x for x in out.splitlines() if x.startswith("[benchmark]")), flush=True)
        if not sim.wait_for_workers(0, args.idle_timeout_minutes * 60 + 180):
            print("[autoscaler] idle nodes were not all removed in time", flush=True)
        if not sim.samples:
            print(f"[autoscaler] no node sample: {sim.errors[-3:]}", file=sys.stderr)
        rep = report(sim, _cells(work / "runs" / "autoscaled"), submitted, finished)
    finally:
        sim.stop()
    for line in rep.lines():
        print(f"[autoscaler] {line}", flush=True)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {**rep.__dict__, "makespan_ratio": rep.makespan_ratio, "samples": sim.samples},
                indent=2,
            )
        )
    return 0
