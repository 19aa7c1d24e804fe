"""Benchmark cells in parallel on a simulated multi-node Ray cluster, on one machine.

    python experiments/bench_concurrency.py                   # 2 slots, 4 x 2 equal cells
    python experiments/bench_concurrency.py --slots 3 --add-node-after 2

Ray's own test harness (`ray.cluster_utils.Cluster`) starts a head (the driver's node, no slot)
and one node per slot; each node advertises one `slot`, a custom resource standing for one
accelerator, and every cell asks for one (`scaling.worker_resources`). Prints the peak
concurrency (should equal the slots) and the makespan against the ideal (sum of cell durations
/ slots). `--add-node-after N` adds a node once N cells have finished: pending cells must start
on it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

NODE_ARGS: dict[str, Any] = {"num_cpus": 1, "object_store_memory": 150 * 2**20}


def run(
    slots: int,
    cells_per_slot: int,
    workdir: Path,
    *,
    data_root: Path | None = None,
    add_node_after: int | None = None,
    lose_node_after: int | None = None,
    epochs: int = 1,
) -> dict[str, Any]:
    """Run the matrix on a fresh simulated cluster; returns the benchmark's result + node ids.

    `lose_node_after N`: once N cells have finished and a running cell has checkpointed an
    epoch, the node running it is removed without grace (a spot reclaim) and a replacement
    node joins; Ray re-runs the cell elsewhere and it resumes from its checkpoint.
    """
    import ray
    from ray.cluster_utils import Cluster

    from orchestrator.benchmark.config import load_benchmark
    from orchestrator.benchmark.run import run_benchmark

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 1, "object_store_memory": 200 * 2**20},
    )
    added: list[str] = []
    try:
        for _ in range(slots):
            cluster.add_node(resources={"slot": 1}, **NODE_ARGS)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        seeds = list(range(slots * cells_per_slot))
        bench, base = load_benchmark(
            ROOT / "orchestrator" / "benchmark" / "demo.yaml",
            [
                "benchmark.name=concurrency",
                "benchmark.methods=[adapter]",
                "benchmark.datasets=[camouflage]",
                f"benchmark.seeds={json.dumps(seeds)}",
                f"optim.epochs={epochs}",
                "scaling.worker_resources={slot: 1}",
                "scaling.cpus_per_worker=0.5",
                f"storage.path={workdir / 'runs'}",
                f"data.root={data_root or workdir / 'data'}",
            ],
        )
        result: dict[str, Any] = {}
        errors: list[BaseException] = []

        def target() -> None:
            try:
                result.update(vars(run_benchmark(bench, base)))
            except BaseException as exc:  # surfaced below
                errors.append(exc)

        thread = threading.Thread(target=target)
        thread.start()
        cells_json = workdir / "runs" / "concurrency" / "cells.json"
        while add_node_after is not None and thread.is_alive():
            if cells_json.is_file():
                state = json.loads(cells_json.read_text())
                if len(state.get("cells", {})) >= add_node_after:
                    node = cluster.add_node(resources={"slot": 1}, **NODE_ARGS)
                    added.append(node.node_id)
                    print(f"[concurrency] added node {node.node_id[:6]}", flush=True)
                    break
            time.sleep(0.5)
        while lose_node_after is not None and thread.is_alive():
            victim = _cell_to_lose(workdir / "runs", cells_json, lose_node_after)
            if victim is not None:
                cell, node_id = victim
                node = next(n for n in cluster.worker_nodes if n.node_id == node_id)
                cluster.remove_node(node, allow_graceful=False)
                result["lost"] = {"cell": cell, "node_id": node_id, "at": time.time()}
                print(f"[concurrency] removed node {node_id[:6]} running {cell}", flush=True)
                node = cluster.add_node(resources={"slot": 1}, **NODE_ARGS)
                added.append(node.node_id)
                break
            time.sleep(0.3)
        thread.join()
        if errors:
            raise errors[0]
        result["added_node_ids"] = added
        result["slot_node_ids"] = [
            n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("slot")
        ]
        return result
    finally:
        ray.shutdown()
        cluster.shutdown()


def _cell_to_lose(runs: Path, cells_json: Path, after: int) -> tuple[str, str] | None:
    """(cell, node id) of a running training cell with a checkpointed epoch, once `after` are done."""
    from ray.util.state import list_tasks

    if not cells_json.is_file() or len(json.loads(cells_json.read_text()).get("cells", {})) < after:
        return None
    import ray

    driver_node = ray.get_runtime_context().get_node_id()  # stays up: it runs the benchmark
    running = list_tasks(filters=[("state", "=", "RUNNING")], detail=True)
    for task in running:
        name = task.name or ""
        if not name.startswith("cell:") or "zero_shot" in name or not task.node_id:
            continue
        if task.node_id == driver_node:
            continue
        cell = name.split(":", 1)[1]
        folder = cell.replace("/", "-")  # method/dataset/seedN -> the cell's run directory
        if any(runs.glob(f"*/{folder}/checkpoint_epoch_0000/history.json")):
            return cell, task.node_id
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--slots", type=int, default=2)
    p.add_argument("--cells-per-slot", type=int, default=4)
    p.add_argument("--add-node-after", type=int, default=None)
    p.add_argument("--lose-node-after", type=int, default=None)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workdir", default=None)
    args = p.parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="concurrency-"))
    result = run(
        args.slots,
        args.cells_per_slot,
        workdir,
        add_node_after=args.add_node_after,
        lose_node_after=args.lose_node_after,
        epochs=args.epochs,
    )
    s = result["stats"]
    ideal = s["busy_s"] / args.slots
    summary = {
        "slots": args.slots,
        "cells": len(result["timeline"]),
        "peak_concurrency": s["peak_concurrency"],
        "makespan_s": round(s["makespan_s"], 1),
        "ideal_s": round(ideal, 1),
        "makespan_over_ideal": round(s["makespan_s"] / ideal, 3),
        "nodes_used": len({r["node"] for r in result["timeline"]}),
        "timeline": result["files"]["timeline"],
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
