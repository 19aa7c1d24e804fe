"""What every Train worker reads, prepared once in the driver: the dataset folder, its manifest,
the small splits decoded once, the teacher cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from orchestrator.config import (
    Config,
    ConfigError,
)
from orchestrator.data.manifest import load_manifest
from orchestrator.data.synthetic import ensure_data
from orchestrator.train.models import (
    teacher_checkpoint,
)


@dataclass
class SharedData:
    """What every run on one dataset shares: prepared once, passed to many `fit` calls.

    The benchmark builds one per dataset (decoded small splits in Ray's object store, the
    teacher cache, the manifest, the teacher hash) and hands it to each of its cells, so cells
    no longer decode the same images again.
    """

    data_dir: str
    manifest: dict[str, Any]
    datasets: dict[str, Any]  # train/val/test Ray Datasets (materialized when small)
    teacher_sha256: str | None
    n_train: int
    train_cache: dict[str, Any] | None = None


def prepare_data(
    cfg: Config, *, teacher_sha256: str | None = None, quiet: bool = True
) -> SharedData:
    """Dataset folder, teacher cache and Ray Datasets for `cfg` (Ray must be initialised)."""
    from orchestrator.data.reader import read_split

    data_dir = ensure_data(cfg)
    manifest = load_manifest(data_dir)
    sc = cfg.scaling
    size, square = cfg.model.image_size, cfg.model.square_inputs
    train_cache = None
    if cfg.speed.teacher_cache and cfg.loss.needs_teacher:
        from orchestrator.data.teacher_cache import (
            CacheKey,
            TeacherCacheError,
            ensure_teacher_cache,
        )

        key = CacheKey.for_config(cfg, teacher_sha256) if teacher_sha256 else None
        try:
            train_cache = ensure_teacher_cache(
                data_dir,
                cfg.data.train_split,
                key,
                checkpoint=teacher_checkpoint(cfg),
                use_gpu=sc.use_gpu,
                quiet=quiet,
            )
        except TeacherCacheError as exc:
            raise ConfigError(str(exc)) from None
    splits = {"train": cfg.data.train_split, "val": cfg.data.val_split, "test": cfg.data.test_split}
    datasets = {}
    for key, split in splits.items():
        ds = read_split(
            data_dir,
            split,
            image_size=size,
            square=square,
            channel_order=cfg.data.channel_order,
            decode_on=cfg.data.decode_on,
            keep_original_mask=key != "train",
            num_cpus=sc.data_cpus,
            teacher_cache=train_cache if key == "train" else None,
        )
        # Small splits are decoded once and kept in the object store: every later epoch, every
        # evaluation and (in a benchmark) every cell then skips parquet reading and decoding.
        rows = manifest["counts"].get(split, 0)
        row_bytes = size * size * 4
        if key == "train" and train_cache is not None:
            row_bytes += 2 * int(np.prod(train_cache["embedding_shape"]))
        if rows * row_bytes <= cfg.data.materialize_max_mb * 2**20:
            ds = ds.materialize()
        datasets[key] = ds
    datasets.update(_retention_datasets(cfg, size))
    n_train = int(manifest["counts"].get(cfg.data.train_split, 0))
    return SharedData(str(data_dir), manifest, datasets, teacher_sha256, n_train, train_cache)


def _retention_datasets(cfg: Config, size: int) -> dict[str, Any]:
    """`data.retention`: each set's val split, decoded once like the run's own val split."""
    from orchestrator.data.reader import read_split

    out = {}
    for name in cfg.data.retention:
        data_dir = ensure_data(cfg.with_values({"data.dataset": name}))
        counts = load_manifest(data_dir)["counts"]
        if cfg.data.val_split not in counts:
            raise ConfigError(
                f"data.retention: {data_dir} has no {cfg.data.val_split!r} split (it has "
                f"{sorted(counts)}); retention sets are scored on the run's val split name"
            )
        ds = read_split(
            data_dir,
            cfg.data.val_split,
            image_size=size,
            square=cfg.model.square_inputs,
            channel_order=cfg.data.channel_order,
            decode_on=cfg.data.decode_on,
            keep_original_mask=True,
            num_cpus=cfg.scaling.data_cpus,
        )
        small = counts[cfg.data.val_split] * size * size * 4 <= cfg.data.materialize_max_mb * 2**20
        out[f"retention-{name}"] = ds.materialize() if small else ds
    return out


def eval_unit(manifest: dict) -> str:
    """What a metric is a mean over: images, or instances for instance datasets (COCO, labels)."""
    return "instance" if manifest.get("kind") == "instances" else "image"


def data_counts(cfg: Config, manifest: dict) -> dict[str, int]:
    """Samples (and for instance datasets, images) of the run's splits, for the run's params."""
    unit = eval_unit(manifest)
    out = {}
    for role in ("train", "val", "test"):
        split = getattr(cfg.data, f"{role}_split")
        out[f"data.{role}_{unit}s"] = int(manifest["counts"].get(split, 0))
        if unit == "instance":
            out[f"data.{role}_images"] = int(manifest["images"].get(split, 0))
    return out
