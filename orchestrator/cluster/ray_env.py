"""Starting or joining a Ray with explicit options, and where this process runs.

Every entry point (CLI, benchmark, sweep) starts Ray through `init_ray`, so the options a laptop
and a cluster need are decided in one place. Nothing here trains or reads data.
"""

from __future__ import annotations

import os
import sys


def init_ray(
    address: str | None = None,
    *,
    num_cpus: int | None = None,
    progress_bars: bool | None = None,
    log_to_driver: bool = True,
) -> bool:
    """Connect to a cluster (`address` or $RAY_ADDRESS) or start a local Ray.

    Returns True when this call connected to an existing cluster (or one was already running),
    False when it started a local Ray. If Ray is already initialised, nothing changes: the first
    caller's options stand, and that is stated here rather than hidden. `progress_bars`: Ray
    Data's bars; default on at a terminal, off in logs (CI, `ray job submit` output).
    `log_to_driver=False` keeps tasks' output in Ray's log files (the benchmark prints its own
    progress; a cell's error still reaches the driver with its exception).
    """
    import ray
    import ray.data

    if progress_bars is None:
        progress_bars = sys.stdout.isatty()
    if not progress_bars:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.data.DataContext.get_current().enable_progress_bars = progress_bars
    if ray.is_initialized():
        return True
    address = address or os.environ.get("RAY_ADDRESS")
    env = {} if progress_bars else {"RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
    if address:
        ray.init(
            address=address,
            runtime_env={"env_vars": env} if env else None,
            log_to_driver=log_to_driver,
        )
        return True
    # The dashboard (loopback only) also serves the state API that Ray Train's placement-group
    # cleaner needs: without it, a trial stopped by Tune can leak its workers' resources.
    ray.init(
        num_cpus=num_cpus,
        log_to_driver=log_to_driver,
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        runtime_env={"env_vars": env} if env else None,
    )
    return False


def in_ray_worker() -> bool:
    """True inside a Ray task or actor: its signals belong to Ray, not to our run closing."""
    import ray

    return ray.is_initialized() and ray.get_runtime_context().worker.mode == ray.WORKER_MODE


def on_one_machine() -> bool:
    """A single-node Ray reached without an address: a laptop (or a test), not a cluster.

    Concurrency defaults differ: on a laptop the benchmark and sweeps cap what runs at once by
    its CPUs; on a cluster nothing is capped, so pending work can ask the autoscaler for nodes.
    """
    import ray

    if os.environ.get("RAY_ADDRESS"):
        return False
    return sum(1 for n in ray.nodes() if n.get("Alive")) <= 1


def concurrency_cap(explicit: int | None, cpus_each: float, laptop: bool) -> int | None:
    """How many benchmark cells or sweep trials run at once: `explicit` if the user set it;
    else no cap on a cluster (pending work is what asks the autoscaler for nodes); else as
    many as this machine's CPUs hold at `cpus_each`."""
    import ray

    if explicit:
        return explicit
    if not laptop:
        return None
    cpus = ray.cluster_resources().get("CPU", 1.0)
    return max(1, int(cpus // max(cpus_each, 1e-6)))
