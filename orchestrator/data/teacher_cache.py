"""Teacher image-embedding cache: the frozen teacher's encoder run once per dataset, not per step.

The teacher is frozen and training images are not augmented, so its image embeddings are a pure
function of (teacher weights, image bytes, input size, channel order). A Ray Data batch-inference
pass (one teacher per GPU actor, or one CPU actor) writes them as bf16 next to the shards:

    <dataset>/teacher_cache/<variant>-<size>-<channel_order>-<teacher sha256[:16]>/
        cache.json              what it was computed from (teacher sha256, source shard sha256s)
        <split>-<build id>/     parquet: every source column + `teacher_embedding` (bf16 bytes)

Training then streams these shards instead of the source shards and skips the teacher encoder.
A cache whose teacher hash, sizes or source shards differ from the run's is refused (and rebuilt
by `ensure_teacher_cache`); augmentation with a cache is refused by the config.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infosam.sam import SAM_VARIANTS
from orchestrator.data.codec import printable
from orchestrator.data.manifest import INSTANCE_SCHEMA, _fs, _join, load_manifest, shard_paths
from orchestrator.data.reader import columns, decode_images, read_shards
from orchestrator.storage import atomic_write, is_remote, join, resolve_location

__all__ = [
    "CACHE_VERSION",
    "CacheKey",
    "TeacherCache",
    "TeacherCacheError",
    "TeacherEncoder",
    "build_teacher_cache",
    "cache_location",
    "ensure_teacher_cache",
    "open_teacher_cache",
]


CACHE_VERSION = 1


EMBEDDING_COLUMN = "teacher_embedding"


class TeacherCacheError(RuntimeError):
    """The cache is missing or was computed from something else; the message says what."""


class TeacherCache(dict):
    """`location`, `files` (parquet paths of one split), `embedding_shape`, `rows`, `meta`."""


@dataclass(frozen=True)
class CacheKey:
    """What makes cached embeddings valid for a run: the teacher, its input size, channel order."""

    variant: str
    image_size: int
    channel_order: str
    teacher_sha256: str
    family: str = "sam"  # sam | sam2 (SAM 2.1: square inputs, packed high-res features)

    @classmethod
    def for_config(cls, cfg: Any, teacher_sha256: str) -> CacheKey:
        """The key of an `orchestrator.config.Config` whose teacher hashes to `teacher_sha256`."""
        return cls(
            cfg.model.variant,
            cfg.model.image_size,
            cfg.data.channel_order,
            teacher_sha256,
            cfg.model.family,
        )

    @property
    def dirname(self) -> str:
        name = f"{self.variant}-{self.image_size}-{self.channel_order}-{self.teacher_sha256[:16]}"
        return name if self.family == "sam" else f"{self.family}-{name}"


def cache_location(dataset_dir: str | os.PathLike, key: CacheKey) -> str:
    """The cache folder for this (teacher, input size, channel order); a URI on shared storage."""
    return join(resolve_location(dataset_dir), "teacher_cache", key.dirname)


def _read_json(location: str) -> dict | None:
    import pyarrow.fs as pafs

    fs, path = _fs(location)
    if fs.get_file_info(path).type != pafs.FileType.File:
        return None
    with fs.open_input_stream(path) as f:
        return json.loads(f.read())


def _write_json(location: str, data: dict) -> None:
    atomic_write(location, json.dumps(data, indent=2))  # one PUT on object stores


def image_rows(manifest: dict, split: str) -> int:
    """Parquet rows of a split: images (one embedding each), also for instance datasets."""
    return int(manifest.get("images", manifest["counts"]).get(split, 0))


def _source_shards(manifest: dict, split: str) -> list[str]:
    return [s["sha256"] for s in manifest["shards"] if s["split"] == split]


def open_teacher_cache(
    dataset_dir: str | os.PathLike,
    split: str,
    key: CacheKey,
    *,
    manifest: dict | None = None,
) -> TeacherCache:
    """The cache of one split, checked against the run; TeacherCacheError says why not."""
    import pyarrow.fs as pafs

    manifest = manifest or load_manifest(dataset_dir)
    location = cache_location(dataset_dir, key)
    meta = _read_json(_join(location, "cache.json"))
    if meta is None:
        raise TeacherCacheError(f"no teacher cache at {printable(location)}")
    expected = {"version": CACHE_VERSION, **dataclasses.asdict(key)}
    meta = {"family": "sam", **meta}  # caches from before SAM 2.1 are SAM's
    for key, value in expected.items():
        if meta.get(key) != value:
            raise TeacherCacheError(
                f"teacher cache {printable(location)} was computed with {key}={meta.get(key)!r}, "
                f"this run has {value!r}"
            )
    entry = meta.get("splits", {}).get(split)
    if entry is None:
        raise TeacherCacheError(f"teacher cache {printable(location)} has no split {split!r}")
    if entry["source_shards"] != _source_shards(manifest, split):
        raise TeacherCacheError(
            f"teacher cache {printable(location)} split {split!r} was computed from other shards "
            "(the dataset was re-ingested since)"
        )
    if entry["rows"] != image_rows(manifest, split):
        raise TeacherCacheError(
            f"teacher cache {printable(location)} split {split!r} holds {entry['rows']} rows, "
            f"the dataset {image_rows(manifest, split)}"
        )
    fs, root = _fs(location)
    infos = fs.get_file_info([_join(root, f) for f in entry["files"]])
    for name, info in zip(entry["files"], infos):
        if info.type != pafs.FileType.File:
            raise TeacherCacheError(
                f"teacher cache file {printable(_join(location, name))} is missing"
            )
    return TeacherCache(
        location=location,
        files=[_join(location, f) for f in entry["files"]],
        embedding_shape=tuple(meta["embedding_shape"]),
        rows=entry["rows"],
        meta=meta,
    )


class TeacherEncoder:
    """Ray Data callable class: one frozen teacher per actor; batches -> rows + bf16 embedding."""

    def __init__(
        self,
        variant: str,
        checkpoint: str,
        image_size: int,
        channel_order: str,
        attention: str = "folded",
        family: str = "sam",
    ) -> None:
        from infosam.sam import PromptableSam, build_sam
        from infosam.speed import use_attention

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if family == "sam2":  # Hiera attention is SDPA already
            from infosam.sam2 import PromptableSam2, build_sam2_model

            model = PromptableSam2(build_sam2_model(variant, checkpoint))
        else:
            sam = build_sam(variant, checkpoint)
            use_attention(sam, attention)
            model = PromptableSam(sam)
        self.model = model.to(self.device).eval().requires_grad_(False)
        self.image_size = image_size
        self.channel_order = channel_order
        self.square = family == "sam2"

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:
        decoded = decode_images(batch["image"], self.image_size, self.channel_order, self.square)
        images = torch.from_numpy(decoded[0]).to(self.device)
        sizes = torch.from_numpy(decoded[1]).to(self.device)
        with (
            torch.no_grad(),
            torch.autocast("cuda", dtype=torch.bfloat16, enabled=self.device.type == "cuda"),
        ):
            emb = self.model.encode(images, sizes)
        raw = emb.to(torch.bfloat16).contiguous().view(torch.int16).cpu().numpy()
        # An Arrow table with the dataset's own column types: list columns of instance datasets
        # would otherwise be stored as pickled objects, which Ray refuses to read back.
        import pyarrow as pa

        arrays = {
            k: pa.array(
                [list(v) if isinstance(v, np.ndarray) else v for v in batch[k]],
                type=INSTANCE_SCHEMA.field(k).type,
            )
            for k in batch
            if k != EMBEDDING_COLUMN
        }
        arrays[EMBEDDING_COLUMN] = pa.array([r.tobytes() for r in raw], type=pa.binary())
        return pa.table(arrays)


def build_teacher_cache(
    dataset_dir: str | os.PathLike,
    splits: list[str],
    key: CacheKey,
    *,
    checkpoint: str,
    attention: str = "folded",
    batch_size: int | None = None,
    use_gpu: bool | None = None,
    concurrency: int | None = None,
    quiet: bool = False,
) -> dict:
    """Run the teacher encoder over `splits` with Ray Data and record the cache; returns cache.json.

    One actor per GPU in the cluster when `use_gpu` (default: when the cluster has GPUs), else
    one CPU actor. Existing splits of the same cache stay until the new ones are complete.
    The phases: decide the actors, read or start cache.json, then per split encode it into a
    new generation folder, count its rows, and point cache.json at it.
    """
    build = _CacheBuild.plan(
        dataset_dir, key, checkpoint, attention, batch_size, use_gpu, concurrency
    )
    meta = _cache_meta(build)
    for split in splits:
        t0 = time.perf_counter()
        name = f"{split}-{uuid.uuid4().hex[:8]}"
        files, rows = build.encode(split, name)
        _commit_split(build, meta, split, name, files, rows, time.perf_counter() - t0)
        if not quiet:
            seconds = meta["splits"][split]["seconds"]
            print(
                f"[infosam] teacher cache {split}: {rows} images in {seconds:.1f} s "
                f"({rows / max(seconds, 1e-9):.1f} img/s, {build.workers} "
                f"{'GPU' if build.use_gpu else 'CPU'} actor(s)) -> "
                f"{printable(_join(build.location, name))}",
                flush=True,
            )
    return meta


@dataclass
class _CacheBuild:
    """One cache build: the dataset, where the cache goes, and the encoder actors."""

    dataset_dir: str | os.PathLike
    manifest: dict
    location: str  # the cache folder (a URI on shared storage)
    fs: Any  # pyarrow filesystem of `location`
    root: str  # `location` inside `fs`
    key: CacheKey
    checkpoint: str
    attention: str
    batch_size: int
    use_gpu: bool
    workers: int

    @classmethod
    def plan(
        cls,
        dataset_dir: str | os.PathLike,
        key: CacheKey,
        checkpoint: str,
        attention: str,
        batch_size: int | None,
        use_gpu: bool | None,
        concurrency: int | None,
    ) -> _CacheBuild:
        import ray

        gpus = int(ray.cluster_resources().get("GPU", 0))
        use_gpu = gpus > 0 if use_gpu is None else use_gpu
        if use_gpu and gpus == 0:
            raise TeacherCacheError("use_gpu=True but the Ray cluster has no GPUs")
        location = cache_location(dataset_dir, key)
        fs, root = _fs(location)
        fs.create_dir(root, recursive=True)
        return cls(
            dataset_dir,
            load_manifest(dataset_dir),
            location,
            fs,
            root,
            key,
            checkpoint,
            attention,
            batch_size or (16 if use_gpu else 8),
            use_gpu,
            concurrency or (gpus if use_gpu else 1),
        )

    def encode(self, split: str, name: str) -> tuple[list[str], int]:
        """Encode `split` into the generation folder `name`: (its parquet files, rows)."""
        import pyarrow.fs as pafs
        import pyarrow.parquet as pq
        import ray.data

        k = self.key
        ds = read_shards(
            shard_paths(self.dataset_dir, split, self.manifest), columns(self.manifest)
        )
        ds = ds.map_batches(
            TeacherEncoder,
            fn_constructor_kwargs={
                "variant": k.variant,
                "checkpoint": self.checkpoint,
                "image_size": k.image_size,
                "channel_order": k.channel_order,
                "attention": self.attention,
                "family": k.family,
            },
            batch_size=self.batch_size,
            batch_format="numpy",
            num_gpus=1 if self.use_gpu else 0,
            num_cpus=1,
            compute=ray.data.ActorPoolStrategy(size=self.workers),
        )
        ds.write_parquet(_join(self.location, name))
        out_local = _join(self.root, name)
        infos = self.fs.get_file_info(pafs.FileSelector(out_local, recursive=False))
        files = sorted(i.base_name for i in infos if i.base_name.endswith(".parquet"))
        rows = sum(
            pq.ParquetFile(_join(out_local, f), filesystem=self.fs).metadata.num_rows for f in files
        )
        expected = image_rows(self.manifest, split)
        if rows != expected:
            raise TeacherCacheError(
                f"teacher cache of split {split!r} wrote {rows} rows, the dataset has {expected}"
            )
        return files, rows


def _cache_meta(build: _CacheBuild) -> dict:
    """cache.json as it stands (other splits kept), restated for this teacher and input."""
    key = build.key
    meta = _read_json(_join(build.location, "cache.json")) or {}
    if meta.get("teacher_sha256") not in (None, key.teacher_sha256):
        meta = {}  # a foreign cache.json under our key: start over
    meta.update(
        version=CACHE_VERSION,
        teacher_sha256=key.teacher_sha256,
        variant=key.variant,
        family=key.family,
        image_size=key.image_size,
        channel_order=key.channel_order,
        dtype="bfloat16",
        checkpoint=os.path.basename(build.checkpoint),
    )
    meta.setdefault("splits", {})
    if key.family == "sam2":  # the embedding and the packed high-res maps, stride 16
        from infosam.sam2 import SAM2_EMBEDDING_DIMS

        grid = key.image_size // 16
        meta["embedding_shape"] = [4 * SAM2_EMBEDDING_DIMS[key.variant], grid, grid]
        return meta
    spec = SAM_VARIANTS[key.variant]
    grid = key.image_size // spec.patch_size
    meta["embedding_shape"] = [spec.prompt_embed_dim, grid, grid]
    return meta


def _commit_split(
    build: _CacheBuild,
    meta: dict,
    split: str,
    name: str,
    files: list[str],
    rows: int,
    seconds: float,
) -> None:
    """Point cache.json at the new generation of `split`. The generation just superseded
    stays (a run that opened it may still be streaming it); the one before goes, only once
    the new cache.json points elsewhere."""
    previous = meta["splits"].get(split)
    kept = sorted({p.split("/")[0] for p in previous["files"]} - {name}) if previous else []
    meta["splits"][split] = {
        "rows": rows,
        "files": [f"{name}/{f}" for f in files],
        "source_shards": _source_shards(build.manifest, split),
        "seconds": round(seconds, 2),
        "images_per_s": round(rows / max(seconds, 1e-9), 2),
        "workers": build.workers,
        "device": "gpu" if build.use_gpu else "cpu",
        "previous": kept,
    }
    _write_json(_join(build.location, "cache.json"), meta)
    for d in set((previous or {}).get("previous", [])) - {name, *kept}:
        with contextlib.suppress(OSError):
            build.fs.delete_dir(_join(build.root, d))


def ensure_teacher_cache(
    dataset_dir: str | os.PathLike,
    split: str,
    key: CacheKey | None,
    *,
    checkpoint: str | None,
    use_gpu: bool | None = None,
    quiet: bool = False,
) -> TeacherCache:
    """The valid cache of `split`, building (or rebuilding) it first when needed.

    `key` is None for a random teacher (no checkpoint, no hash): refused.
    """
    if checkpoint is None or key is None:
        raise TeacherCacheError(
            "speed.teacher_cache needs a teacher checkpoint (model.checkpoint is null: a random "
            "teacher differs in every process); set model.checkpoint or speed.teacher_cache=false"
        )
    try:
        return open_teacher_cache(dataset_dir, split, key)
    except TeacherCacheError:
        pass
    with _build_lock(dataset_dir):  # concurrent runs (Tune trials) build it once, not racing
        try:
            return open_teacher_cache(dataset_dir, split, key)
        except TeacherCacheError as exc:
            if not quiet:
                print(f"[infosam] {exc}: computing it now (Ray Data batch inference)", flush=True)
        build_teacher_cache(
            dataset_dir, [split], key, checkpoint=checkpoint, use_gpu=use_gpu, quiet=quiet
        )
        return open_teacher_cache(dataset_dir, split, key)


@contextlib.contextmanager
def _build_lock(dataset_dir: str | os.PathLike) -> Iterator[None]:
    """An exclusive file lock next to local caches; object stores have none (build ahead with
    `infosam data teacher-cache` before launching concurrent trials there)."""
    if is_remote(dataset_dir):
        yield
        return
    folder = Path(dataset_dir).expanduser().resolve() / "teacher_cache"
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
