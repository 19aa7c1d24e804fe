"""What every entry point needs before it trains: a Ray, a dataset folder, the teacher weights.

Kept apart from the trainer so that the benchmark, the sweeps, the CLI and prediction share these
without importing training internals. Nothing here trains.
"""

from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path

from infosam.sam import SAM_VARIANTS, checkpoint_sha256, resolve_checkpoint
from orchestrator.config import SYNTHETIC_DOMAINS, Config, ConfigError
from orchestrator.datasets import load_manifest

__all__ = [
    "ensure_data",
    "init_ray",
    "on_one_machine",
    "teacher_checkpoint",
    "teacher_hash",
]


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


def ensure_data(cfg: Config) -> Path | str:
    """The dataset folder; synthesises an embedded domain on first use (under a file lock)."""
    if "://" in cfg.data.root:  # shared storage on clusters (s3://...): must be ingested already
        uri = f"{cfg.data.root.rstrip('/')}/{cfg.data.dataset}"
        load_manifest(uri)
        return uri
    root = Path(cfg.data.root).expanduser().resolve()
    path = root / cfg.data.dataset
    if (path / "manifest.json").is_file() and not _stale_synthetic(cfg, path):
        return path
    if not (cfg.data.synthesize and cfg.data.dataset in SYNTHETIC_DOMAINS):
        raise ConfigError(
            f"dataset not found: {path} has no manifest.json. For the paper benchmarks, download "
            "the Conv-LoRA dataset zips (polyp, camo_sem_seg, isic2017, leaf_disease_segmentation, "
            f"road_segmentation), unzip each, and run `infosam data ingest --format convlora "
            f"<unzipped folder> {root}`; or point data.root/data.dataset at an ingested dataset"
        )
    from orchestrator.synthetic import synthesize

    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synth.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "manifest.json").is_file() or _stale_synthetic(cfg, path):
            print(
                f"[infosam] generating synthetic domain {cfg.data.dataset!r} in {root}", flush=True
            )
            synthesize(  # replaces our own stale domain whole (DatasetWriter), nothing else
                root,
                [cfg.data.dataset],
                seed=cfg.data.synth_seed,
                scale=cfg.data.synth_scale,
                counts=cfg.data.synth_counts,
            )
    return path


def _stale_synthetic(cfg: Config, path: Path) -> bool:
    """A synthetic domain this project generated with other split sizes or seed than `cfg`'s."""
    if not (cfg.data.synthesize and cfg.data.dataset in SYNTHETIC_DOMAINS):
        return False
    import json

    from orchestrator.synthetic import split_sizes

    manifest = json.loads((path / "manifest.json").read_text())  # no shard checks: just sizes
    generator = manifest.get("generator") or {}
    if manifest.get("format") != "synthetic" or not generator:
        return False  # a user's dataset under a synthetic name: never touched
    wanted = split_sizes(cfg.data.dataset, cfg.data.synth_scale, cfg.data.synth_counts)
    return generator.get("splits") != wanted or generator.get("seed") != cfg.data.synth_seed


def teacher_checkpoint(cfg: Config) -> str | None:
    """The teacher's weights file (None = random init); a missing file says where to get it."""
    path = resolve_checkpoint(cfg.model.checkpoint)
    if path is not None and not os.path.isfile(path):
        raise ConfigError(
            f"model.checkpoint not found: {path}. Download the official SAM weights for "
            f"{cfg.model.variant} ({SAM_VARIANTS[cfg.model.variant].official_checkpoint}) from "
            "facebookresearch/segment-anything and set model.checkpoint to their path"
        )
    return path


def teacher_hash(cfg: Config) -> str | None:
    """sha256 of the teacher's weights (None for a random teacher): computed once per run."""
    path = teacher_checkpoint(cfg)
    return checkpoint_sha256(path) if path else None
