"""Putting a finished dataset on object storage (`s3://bucket/prefix/<name>`) without a window in
which readers see half of it, and without deleting what this project did not write.

An object store has no rename, so the local recipe (`storage.swap_dir`) cannot apply. Instead the
dataset is written whole on local disk first (`DatasetWriter` stages it), then published:
  1. the bucket folder is checked before anything is read: empty, or a dataset of ours (its
     `manifest.json`, the shards it lists, our side files, leftovers of an interrupted publish);
  2. the shards are uploaded under names new to this generation (`train-g<id>-00000.parquet`), so
     the previous dataset, still named by the old manifest, stays complete and readable;
  3. `manifest.json` is PUT (one request, applied whole by the store): readers switch here;
  4. the previous generation's shards are deleted (pyarrow then leaves a zero-byte folder
     marker `<name>/`, as S3 consoles do).
A publish killed at any point leaves the previous dataset intact; its stray shards are ours by
name and the next publish removes them. There is no lock on a bucket: publish a given name from
one process at a time.
"""

from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path
from typing import Any

from orchestrator.data.codec import IngestError, printable
from orchestrator.storage import filesystem

__all__ = ["check_remote_replaceable", "publish_dataset"]


# A shard of a published generation: what step 2 writes (and the only names it may delete).
GENERATION_SHARD = re.compile(r"^[A-Za-z0-9_.-]+-g[0-9a-f]{8}-\d{5}\.parquet$")


# Objects of a dataset folder of ours besides its shards (the teacher cache is a folder).
SIDE_OBJECTS = ("manifest.json", "contact_sheet.png")
SIDE_FOLDERS = ("teacher_cache/",)


def _listing(fs: Any, root: str) -> list[str]:
    """Every object under `root`, relative to it ('' when the folder does not exist)."""
    import pyarrow.fs as pafs

    if fs.get_file_info(root).type != pafs.FileType.Directory:
        return []
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
    return sorted(i.path[len(root) :].lstrip("/") for i in infos if i.type == pafs.FileType.File)


def _remote_manifest(fs: Any, root: str) -> dict | None:
    try:
        with fs.open_input_stream(f"{root}/manifest.json") as f:
            manifest = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    ours = isinstance(manifest, dict) and "schema_version" in manifest and "counts" in manifest
    return manifest if ours and isinstance(manifest.get("shards"), list) else None


def check_remote_replaceable(uri: str) -> None:
    """Refuse a bucket folder that holds anything but a dataset of ours (`IngestError`)."""
    fs, root = filesystem(uri)
    objects = _listing(fs, root)
    if not objects:
        return
    manifest = _remote_manifest(fs, root)
    listed = {s["path"] for s in manifest["shards"]} if manifest else set()
    foreign = [
        o
        for o in objects
        if o not in listed
        and o not in SIDE_OBJECTS
        and not o.startswith(SIDE_FOLDERS)
        and not GENERATION_SHARD.match(o)
    ]
    if manifest is None and foreign:
        raise IngestError(
            f"{printable(uri)} holds objects and no manifest.json written by infosam: ingest "
            "replaces only its own datasets; choose another --name or OUT, or move them away"
        )
    if foreign:
        shown = ", ".join(printable(f) for f in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise IngestError(
            f"{printable(uri)} is an infosam dataset but also holds objects it did not write "
            f"({shown}): ingest would delete them; move them out or choose another --name"
        )


def _upload(fs: Any, local: Path, where: str) -> None:
    with open(local, "rb") as src, fs.open_output_stream(where) as dst:
        while chunk := src.read(8 << 20):
            dst.write(chunk)


def publish_dataset(local: str | os.PathLike, uri: str) -> dict:
    """Publish the complete dataset folder `local` at `uri` (steps 1-4 above); returns the
    manifest as published (shard paths renamed to this generation's)."""
    local = Path(local)
    check_remote_replaceable(uri)
    fs, root = filesystem(uri)
    before = _listing(fs, root)
    manifest = json.loads((local / "manifest.json").read_text())
    generation = uuid.uuid4().hex[:8]
    for shard in manifest["shards"]:
        split, index = shard["path"].rsplit("-", 1)  # "<split>-00000.parquet"
        name = f"{split}-g{generation}-{index}"
        _upload(fs, local / shard["path"], f"{root}/{name}")
        shard["path"] = name
    if (local / "contact_sheet.png").is_file():
        _upload(fs, local / "contact_sheet.png", f"{root}/contact_sheet.png")
    body = json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
    with fs.open_output_stream(f"{root}/manifest.json") as f:  # the switch
        f.write(body.encode())
    keep = {s["path"] for s in manifest["shards"]}
    for old in before:
        if old.endswith(".parquet") and "/" not in old and old not in keep:
            fs.delete_file(f"{root}/{old}")
    return manifest
