"""What a dataset folder holds: the parquet schemas, the mask rule, and reading the manifest
and shards back (local folders or object storage) with their sizes and hashes checked.

Mask rule (applied the same everywhere, written into every manifest as `mask_rule`):
  * values {0, 1}                    -> as is
  * two values {0, k}, any k > 0     -> mask = value > 0 (0/255 masks, label images)
  * 8-bit maps with more values whose pixels are >= 98 % near 0 or near the maximum (JPEG
    artefacts, anti-aliased edges) -> mask = value > max/2, flagged `mask_thresholded`
  * anything else (multi-class label maps, soft masks) -> rejected with the values found
  * colour masks are read as grey when their channels agree, otherwise rejected
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from collections.abc import Iterator

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import (  # the decoders PIL_FORMATS names, registered before the first open
    BmpImagePlugin,  # noqa: F401
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401  (JPEG's factory opens multi-picture files with it)
    PngImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from orchestrator.data.codec import IngestError, printable
from orchestrator.storage import filesystem, resolve_location

SCHEMA_VERSION = 1


MASK_RULE = (
    "{0,1} as is; {0,k} -> >0; near-binary 8-bit (>=98% of pixels near 0 or max) -> >max/2 "
    "(flag mask_thresholded); other value sets rejected"
)


PARQUET_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("dataset", pa.string()),
        ("split", pa.string()),
        ("image", pa.binary()),  # encoded PNG/JPEG, 8-bit RGB
        ("mask", pa.binary()),  # PNG, 8-bit, values 0/1
        ("height", pa.int32()),
        ("width", pa.int32()),
        ("source", pa.string()),  # original path (or generator spec)
        ("flags", pa.list_(pa.string())),  # e.g. empty_mask, converted_RGBA, mask_thresholded
    ]
)


# Instance datasets (COCO, label images): one row per IMAGE, its bytes stored once, and parallel
# lists with one entry per instance; `mask` stays null. Readers explode rows into one sample per
# instance (`orchestrator.data.reader.decode_batch`). Manifests of such datasets say
# `"kind": "instances"`; `counts` are instances per split and `images` images per split.
INSTANCE_COLUMNS = ["instance_ids", "instance_masks", "instance_categories"]


INSTANCE_SCHEMA = PARQUET_SCHEMA.append(pa.field("instance_ids", pa.list_(pa.string())))


INSTANCE_SCHEMA = INSTANCE_SCHEMA.append(pa.field("instance_masks", pa.list_(pa.binary())))


INSTANCE_SCHEMA = INSTANCE_SCHEMA.append(pa.field("instance_categories", pa.list_(pa.string())))


INSTANCE_SCHEMA = INSTANCE_SCHEMA.append(
    pa.field("instance_flags", pa.list_(pa.list_(pa.string())))
)


_fs = filesystem  # (pyarrow filesystem, path): local folders and s3:// alike


def _join(root: str, name: str) -> str:
    """A path inside a pyarrow filesystem (always "/"-separated)."""
    return f"{root.rstrip('/')}/{name}"


def load_manifest(dataset_dir: str | os.PathLike, *, verify: bool = False) -> dict:
    """Read `manifest.json` (local folder or s3://...); check every shard exists (and, with
    `verify`, its checksum)."""
    import pyarrow.fs as pafs

    fs, root = _fs(dataset_dir)
    path = _join(root, "manifest.json")
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise IngestError(
            f"no manifest.json in {printable(dataset_dir)}: point at a dataset folder written by "
            "`infosam data ingest` or `infosam data synth`"
        )
    with fs.open_input_stream(path) as f:
        raw = f.read()
    try:
        manifest = json.loads(raw)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("shards"), list):
            raise ValueError("not a manifest (no shards list)")
    except ValueError as exc:
        raise IngestError(
            f"{printable(path)} is damaged ({exc}); re-run the ingest that wrote it"
        ) from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise IngestError(
            f"{printable(path)}: schema version {manifest.get('schema_version')} != {SCHEMA_VERSION}; re-run the ingest"
        )
    infos = fs.get_file_info([_join(root, s["path"]) for s in manifest["shards"]])
    for shard, info in zip(manifest["shards"], infos):
        if info.type != pafs.FileType.File:
            raise IngestError(
                f"shard {shard['path']} listed in {printable(path)} is missing; re-run the ingest"
            )
        if info.size != shard["bytes"]:  # a truncated copy or an edited file, found at once
            raise IngestError(
                f"shard {shard['path']} of {printable(dataset_dir)} is {info.size} bytes but was "
                f"written as {shard['bytes']}: it was truncated or changed after ingest; copy it "
                "again from its source, or re-run the ingest"
            )
        if verify:
            with fs.open_input_stream(info.path) as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != shard["sha256"]:
                raise IngestError(
                    f"shard {shard['path']} changed after ingest (sha256 mismatch); re-run the ingest"
                )
    manifest["root"] = resolve_location(dataset_dir)
    return manifest


def shard_paths(
    dataset_dir: str | os.PathLike, split: str, manifest: dict | None = None
) -> list[str]:
    """Absolute shard paths (or URIs) of one split, for `ray.data.read_parquet`."""
    manifest = manifest or load_manifest(dataset_dir)
    paths = [_join(manifest["root"], s["path"]) for s in manifest["shards"] if s["split"] == split]
    if not paths:
        have = sorted(manifest["counts"])
        raise IngestError(f"dataset {manifest['dataset']!r} has no split {split!r} (has {have})")
    return paths


def iter_rows(dataset_dir: str | os.PathLike, split: str) -> Iterator[dict]:
    """Rows of one split without Ray (small evaluations, inspection, tests)."""
    for path in shard_paths(dataset_dir, split):
        for batch in pq.ParquetFile(path).iter_batches(batch_size=64):
            yield from batch.to_pylist()


def summarise(manifest: dict) -> str:
    if manifest.get("kind") == "instances":
        images = manifest["images"]
        lines = [
            f"dataset {manifest['dataset']} (instances): "
            + ", ".join(
                f"{s}={n} instances in {images.get(s, 0)} images"
                for s, n in manifest["counts"].items()
            )
        ]
        if manifest.get("categories"):
            lines.append(
                "  categories: " + ", ".join(f"{k}={v}" for k, v in manifest["categories"].items())
            )
        if manifest.get("skipped"):
            kinds = Counter(
                "iscrowd" if r["reason"].startswith("iscrowd") else "category not selected"
                for r in manifest["skipped"]
            )
            lines.append(
                f"  skipped: {len(manifest['skipped'])} ("
                + ", ".join(f"{k}={n}" for k, n in sorted(kinds.items()))
                + ")"
            )
        if manifest.get("selected_categories"):
            lines.append("  selected categories: " + ", ".join(manifest["selected_categories"]))
        if manifest.get("unannotated_images"):
            lines.append(f"  images without annotations: {manifest['unannotated_images']}")
    else:
        lines = [
            f"dataset {manifest['dataset']}: "
            + ", ".join(f"{s}={n}" for s, n in manifest["counts"].items())
        ]
    for split, flags in manifest.get("flags", {}).items():
        lines.append(f"  flagged in {split}: " + ", ".join(f"{k}={v}" for k, v in flags.items()))
    lines.append(
        f"  shards: {len(manifest['shards'])}, {sum(s['bytes'] for s in manifest['shards']) / 1e6:.1f} MB"
    )
    dup = manifest.get("duplicates_across_splits", [])
    if dup:
        first = dup[0]
        lines.append(
            f"  warning: {len(dup)} image(s) have identical bytes in two splits, e.g. "
            f"{first['id']!r} ({first['split']}) = {first['same_bytes_as']!r} "
            f"({first['in_split']}); see duplicates_across_splits in manifest.json"
        )
    rej = manifest["rejected"]
    lines.append(f"  rejected: {len(rej)}")
    for r in rej[:20]:
        lines.append(f"    - {r['source']}: {r['reason']}")
    if len(rej) > 20:
        lines.append(f"    ... {len(rej) - 20} more in manifest.json")
    return "\n".join(lines)
