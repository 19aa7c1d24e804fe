"""Write image/mask pairs into sharded parquet + a manifest, with no silent loss.

Every input sample ends up either as a row in a shard or in the manifest's `rejected` list with
its reason; never neither. Re-running an ingest on the same input gives the same bytes (and the
old output is only replaced once the new one is complete). The writer refuses names and output
folders that could touch a source or a user's own files (`check_output`, `check_replaceable`).
PNG/JPEG bytes are stored untouched when no conversion is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import (  # the decoders PIL_FORMATS names, registered before the first open
    BmpImagePlugin,  # noqa: F401
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401  (JPEG's factory opens multi-picture files with it)
    PngImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from orchestrator.data.codec import (
    IngestError,
    Rejected,
    decode_image,
    decode_mask,
    encode_mask,
    ordered_map,
    printable,
)
from orchestrator.data.manifest import INSTANCE_SCHEMA, MASK_RULE, PARQUET_SCHEMA, SCHEMA_VERSION
from orchestrator.data.publish import check_remote_replaceable, publish_dataset
from orchestrator.storage import (
    atomic_write_json,
    exclusive,
    is_remote,
    join,
    safe_component,
    staging_root,
    swap_dir,
)

DEFAULT_SHARD_BYTES = 64 << 20


@dataclass
class _Shard:
    split: str
    rows: list[dict] = field(default_factory=list)
    nbytes: int = 0


class DatasetWriter:
    """Writes rows to per-split parquet shards of ~`shard_bytes`, then a manifest.

    What it may replace, checked before anything is read (`IngestError` otherwise):
      * `name` is one plain folder name (not empty, `.`, `..`, no separator);
      * `<out>/<name>` is not, does not contain and does not lie inside any of `sources` (the
        folders and files the ingest reads);
      * an existing `<out>/<name>` is replaced only when it is a dataset this project wrote (a
        manifest, its shards and the project's own side files, nothing else).
    Output goes to a hidden `<out>/.<name>.partial-*` folder and replaces `<out>/<name>` by
    renames in `close()` (`storage.swap_dir`): an interrupted or failed ingest never destroys a
    previous complete one. Ingests of one name queue on a lock file `<out>/.<name>.lock`.
    Use it as a context manager: an error in the block removes the partial output.
    """

    def __init__(
        self,
        out: str | os.PathLike,
        name: str,
        *,
        shard_bytes: int = DEFAULT_SHARD_BYTES,
        source: str = "",
        fmt: str = "",
        extra: dict | None = None,
        instances: bool = False,
        sources: Sequence[str | os.PathLike] = (),
    ) -> None:
        try:
            safe_component(name, "dataset name (--name)")
        except ValueError as exc:
            raise IngestError(str(exc)) from None
        self.remote = None  # s3://.../<name>: staged here whole, then published (data.publish)
        if is_remote(out):
            self.remote = join(out, name)
            check_remote_replaceable(self.remote)
            out = staging_root("ingest", self.remote)
        out = Path(out).expanduser()
        self.final = out / name
        check_output(self.final, sources)
        self._lock = contextlib.ExitStack()
        self._lock.enter_context(exclusive(out / f".{name}.lock", f"dataset {name!r}", wait=True))
        try:
            check_replaceable(self.final)
            self._remove_stale_partials(out, name)
            self.tmp = out / f".{name}.partial-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            self.tmp.mkdir(parents=True)
            (self.tmp / PARTIAL_MARKER).touch()
        except BaseException:
            self._lock.close()
            raise
        self.closed = False
        self.name, self.shard_bytes = name, shard_bytes
        self.meta = {"source": source, "format": fmt, **(extra or {})}
        self.instances = instances
        self.schema = INSTANCE_SCHEMA if instances else PARQUET_SCHEMA
        self.image_counts: Counter[str] = Counter()
        self.open: dict[str, _Shard] = {}
        self.shards: list[dict] = []
        self.counts: Counter[str] = Counter()
        self.flag_counts: dict[str, Counter[str]] = {}
        self.rejected: list[dict] = []
        self.ids: dict[str, str] = {}
        self.digests: dict[bytes, tuple[str, str]] = {}  # image sha256 -> (split, id)
        self.cross_split: list[dict] = []
        self.shard_index: Counter[str] = Counter()

    @staticmethod
    def _remove_stale_partials(out: Path, name: str) -> None:
        """Partial folders of interrupted ingests of this name (ours: they hold the marker)."""
        for old in out.glob(f".{glob_escape(name)}.partial-*"):
            if old.is_dir() and not old.is_symlink() and (old / PARTIAL_MARKER).is_file():
                shutil.rmtree(old, ignore_errors=True)

    def __enter__(self) -> DatasetWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if not self.closed:
            self.abort()

    def abort(self) -> None:
        """Drop the partial output and the lock; the previous dataset, if any, stays."""
        self.closed = True
        shutil.rmtree(self.tmp, ignore_errors=True)
        self._lock.close()

    def reject(self, source: str, reason: str, split: str = "", row: int | None = None) -> None:
        entry = {"source": source, "split": split, "reason": reason}
        if row is not None:
            entry["row"] = row
        self.rejected.append(entry)

    def conflict(self, image_id: str) -> str | None:
        """Why an image id cannot be added: it is taken (two files of one name, or one image
        listed in two splits)."""
        if image_id in self.ids:
            return f"duplicate id {image_id!r} (first seen in split {self.ids[image_id]!r})"
        return None

    def _claim(self, image_id: str, image: bytes, split: str) -> None:
        """Take the id; the same image bytes under another split are recorded (not rejected:
        a benchmark's published splits stay as published) in `duplicates_across_splits`."""
        self.ids[image_id] = split
        digest = hashlib.sha256(image).digest()
        seen = self.digests.setdefault(digest, (split, image_id))
        if seen[0] != split:
            self.cross_split.append(
                {"id": image_id, "split": split, "same_bytes_as": seen[1], "in_split": seen[0]}
            )

    def add(
        self,
        split: str,
        sample_id: str,
        image: bytes,
        mask: bytes,
        height: int,
        width: int,
        source: str,
        flags: list[str],
    ) -> bool:
        """Add one row; a duplicate id is rejected (first occurrence wins) and returns False."""
        reason = self.conflict(sample_id)
        if reason:
            self.reject(source, reason, split)
            return False
        self._claim(sample_id, image, split)
        row = self._row(split, sample_id, image, mask, height, width, source, flags)
        self._append(split, row, len(image) + len(mask), flags)
        self.counts[split] += 1
        return True

    def add_image(
        self,
        split: str,
        image_id: str,
        image: bytes,
        height: int,
        width: int,
        source: str,
        flags: list[str],
        instances: list[dict],
    ) -> bool:
        """Add one image of an instance dataset with its instances (dicts with `id`, `mask` PNG
        bytes, `category`, `flags`); each instance becomes a sample `<image_id>#<id>`."""
        assert self.instances, "add_image needs DatasetWriter(..., instances=True)"
        reason = self.conflict(image_id)
        if reason:
            for inst in instances:
                self.reject(f"{source}#{inst['id']}", reason, split)
            return False
        self._claim(image_id, image, split)
        row = self._row(split, image_id, image, None, height, width, source, flags)
        row |= {
            "instance_ids": [str(i["id"]) for i in instances],
            "instance_masks": [i["mask"] for i in instances],
            "instance_categories": [str(i["category"]) for i in instances],
            "instance_flags": [sorted(set(i["flags"])) for i in instances],
        }
        nbytes = len(image) + sum(len(i["mask"]) for i in instances)
        self._append(split, row, nbytes, flags, *(i["flags"] for i in instances))
        self.counts[split] += len(instances)
        self.image_counts[split] += 1
        return True

    def _row(
        self,
        split: str,
        row_id: str,
        image: bytes,
        mask: bytes | None,
        height: int,
        width: int,
        source: str,
        flags: list[str],
    ) -> dict:
        return {
            "id": row_id,
            "dataset": self.name,
            "split": split,
            "image": image,
            "mask": mask,
            "height": int(height),
            "width": int(width),
            "source": source,
            "flags": sorted(set(flags)),
        }

    def _append(self, split: str, row: dict, nbytes: int, *flag_lists: list[str]) -> None:
        """Queue a row in its split's open shard (flushed once it reaches the shard size)."""
        shard = self.open.setdefault(split, _Shard(split))
        shard.rows.append(row)
        shard.nbytes += nbytes
        fc = self.flag_counts.setdefault(split, Counter())
        for flags in flag_lists:
            fc.update(set(flags))
        if shard.nbytes >= self.shard_bytes:
            self._flush(split)

    def _flush(self, split: str) -> None:
        shard = self.open.pop(split, None)
        if shard is None or not shard.rows:
            return
        k = self.shard_index[split]
        self.shard_index[split] += 1
        rel = f"{split}-{k:05d}.parquet"
        table = pa.Table.from_pylist(shard.rows, schema=self.schema)
        pq.write_table(table, self.tmp / rel, compression="zstd", row_group_size=256)
        data = (self.tmp / rel).read_bytes()
        self.shards.append(
            {
                "path": rel,
                "split": split,
                "rows": len(shard.rows),
                "bytes": len(data),
                "sha256": hashlib.sha256(data).hexdigest(),
            }
        )

    def close(self, finalize: Callable[[Path], None] | None = None) -> dict:
        """Write the manifest and put the dataset in place. `finalize(folder)` adds side files
        (a contact sheet) to the complete partial folder before it replaces the old one. A
        dataset without a single usable sample is refused (`IngestError` with the reasons):
        an old dataset of that name stays as it was."""
        try:
            for split in list(self.open):
                self._flush(split)
            empty = self.empty_splits()
            if empty:
                raise IngestError(no_sample_message(self.rejected, empty, bool(self.counts)))
            manifest = self._manifest()
            atomic_write_json(self.tmp / "manifest.json", manifest, indent=2, ensure_ascii=False)
            if finalize is not None:
                finalize(self.tmp)
            (self.tmp / PARTIAL_MARKER).unlink()
            swap_dir(self.tmp, self.final)
            if self.remote:
                manifest = publish_dataset(self.final, self.remote)
                shutil.rmtree(self.final, ignore_errors=True)
        except BaseException:
            self.abort()
            raise
        self.closed = True
        self._lock.close()
        return manifest

    def empty_splits(self) -> list[str]:
        """Splits that had inputs but not one usable sample (all if nothing was found)."""
        seen = {r["split"] for r in self.rejected if r.get("split")} | set(self.counts)
        if not seen:
            return [""]
        return sorted(s for s in seen if not self.counts.get(s))

    def _manifest(self) -> dict:
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.name,
            **self.meta,
            "mask_rule": MASK_RULE,
            "counts": dict(sorted(self.counts.items())),
            **(
                {"kind": "instances", "images": dict(sorted(self.image_counts.items()))}
                if self.instances
                else {}
            ),
            "flags": {s: dict(sorted(c.items())) for s, c in sorted(self.flag_counts.items()) if c},
            "shards": sorted(self.shards, key=lambda s: s["path"]),
            "rejected": self.rejected,
        }
        if self.cross_split:  # only when there are some: manifests without stay as they were
            manifest["duplicates_across_splits"] = self.cross_split
        return manifest


def no_sample_message(rejected: list[dict], empty: list[str], others: bool) -> str:
    """Why an ingest wrote nothing: per empty split, its reject reasons, most frequent first."""
    if empty == [""]:
        return "no sample found in the source: nothing was written (check the layout and paths)"
    parts = []
    for split in empty:
        mine = [r for r in rejected if r.get("split") == split]
        reasons = Counter(re.sub(r"\s*\[.*\]$", "", r["reason"]) for r in mine)
        top = "; ".join(f"{n} x {reason}" for reason, n in reasons.most_common(5))
        parts.append(f"split {split!r}: all {len(mine)} input(s) rejected ({top})")
    kept = " (the other splits were fine)" if others else ""
    return (
        f"no usable sample in {'; '.join(parts)}{kept}; nothing was written and any previous "
        "dataset of this name is unchanged"
    )


def _real(path: str | os.PathLike) -> Path:
    return Path(os.path.realpath(Path(path).expanduser()))


def check_output(final: Path, sources: Sequence[str | os.PathLike]) -> None:
    """Refuse an output folder that is, holds or lies inside something the ingest reads."""
    target = _real(final)
    for source in sources:
        src = _real(source)
        if target == src or target in src.parents or src in target.parents:
            relation = (
                "is" if target == src else ("contains" if target in src.parents else "lies inside")
            )
            raise IngestError(
                f"the output folder {printable(final)} {relation} the source "
                f"{printable(source)}: writing there could replace the data being read; choose "
                "another OUT or --name (e.g. OUT=datasets/parquet)"
            )


# Files a dataset folder of ours may hold besides its shards and manifest.
OWN_SIDE_FILES = {"manifest.json", "contact_sheet.png", "teacher_cache"}


PARTIAL_MARKER = ".infosam-partial"


def check_replaceable(final: Path) -> None:
    """An existing `final` may be replaced only when it is a dataset this project wrote."""
    if not os.path.lexists(final):
        return
    where = printable(final)
    if final.is_symlink() or not final.is_dir():
        raise IngestError(
            f"{where} exists and is not a dataset folder (a file or a link): ingest never "
            "replaces it; choose another --name or OUT, or move it away"
        )
    try:
        manifest = json.loads((final / "manifest.json").read_bytes())
        shards = {s["path"] for s in manifest["shards"]}
        ours = isinstance(manifest, dict) and "schema_version" in manifest and "counts" in manifest
    except (OSError, ValueError, KeyError, TypeError):
        ours, shards = False, set()
    if not ours:
        raise IngestError(
            f"{where} exists and holds no manifest.json written by infosam: ingest replaces only "
            "its own datasets; choose another --name or OUT, or move that folder away"
        )
    foreign = sorted(p.name for p in final.iterdir() if p.name not in shards | OWN_SIDE_FILES)
    if foreign:
        shown = ", ".join(printable(f) for f in foreign[:5]) + (" ..." if len(foreign) > 5 else "")
        raise IngestError(
            f"{where} is an infosam dataset but also holds files it did not write ({shown}): "
            "ingest would delete them; move them out or choose another --name"
        )


def decode_with_image(
    image_path: Path, companion_path: Path, decode: Callable, what: str
) -> tuple[np.ndarray, bytes, list[str], np.ndarray, list[str]]:
    """An image and its companion (a mask, a label image), both decoded: (image, bytes to
    store, flags, companion array, companion flags); `decode(bytes) -> (array, flags)`. A
    Rejected names the companion's file when it is the companion that is wrong."""
    img, stored, flags = decode_image(image_path.read_bytes())
    try:
        arr, extra = decode(companion_path.read_bytes())
    except Rejected as exc:
        raise Rejected(f"{exc} [{printable(companion_path)}]") from None
    if arr.shape != img.shape[:2]:
        raise Rejected(
            f"{what} size {arr.shape[1]}x{arr.shape[0]} differs from image size "
            f"{img.shape[1]}x{img.shape[0]} [{printable(companion_path)}]"
        )
    return img, stored, flags, arr, extra


def decode_pair(paths: tuple[Path, Path]) -> tuple:
    """(image, mask) paths -> ("ok", image bytes, mask PNG, height, width, flags) or
    ("rejected", reason). Runs in an ingest thread (`ordered_map`)."""
    image_path, mask_path = paths
    try:
        if not image_path.is_file():
            raise Rejected(f"image file not found: {printable(image_path)}")
        if not mask_path.is_file():
            raise Rejected(f"mask file not found: {printable(mask_path)}")
        img, stored, flags, mask, mflags = decode_with_image(
            image_path, mask_path, decode_mask, "mask"
        )
    except Rejected as exc:
        return ("rejected", str(exc))
    flags = flags + mflags + (["empty_mask"] if not mask.any() else [])
    return ("ok", stored, encode_mask(mask), img.shape[0], img.shape[1], flags)


def _write_pairs(
    writer: DatasetWriter,
    pairs: Sequence[tuple[str, str, Path | None, Path | str, int | None]],
    workers: int | None,
) -> None:
    """(split, id, image, mask, csv row) pairs, decoded in parallel, written in input order; a
    pair whose image is None is rejected with the reason in its mask's place (an empty or
    escaping CSV cell)."""
    todo = [(p[2], p[3]) for p in pairs if p[2] is not None]
    results = ordered_map(decode_pair, todo, workers)
    for split, sample_id, image_path, mask_path, row in pairs:
        if image_path is None:
            writer.reject(f"{split}.csv row {row}", str(mask_path), split, row)
            continue
        result = next(results)
        source = printable(image_path)
        if result[0] == "rejected":
            writer.reject(source, result[1], split, row)
        else:
            _, stored, mask, height, width, flags = result
            writer.add(split, sample_id, stored, mask, height, width, source, flags)


def inside(root: Path, rel: object, what: str) -> Path:
    """`root / rel` for a path named in an annotation file or CSV, refused (Rejected) unless it
    is a relative path string that stays inside `root`, symbolic links resolved: a hostile file
    must not pull other files of the host into a dataset."""
    if not isinstance(rel, str) or not rel:
        shown = repr(rel)[:60]
        raise Rejected(
            f"{what} must be a non-empty path string relative to {printable(root)}, got "
            f"{type(rel).__name__} {shown}"
        )
    base = os.path.realpath(root)
    real = os.path.realpath(os.path.join(base, rel))
    if os.path.isabs(rel) or real == base or os.path.commonpath([real, base]) != base:
        raise Rejected(
            f"{what} {printable(rel)!r} leads outside {printable(root)}: paths must be relative "
            "to that folder and stay inside it (no absolute paths, '..' or links leading out)"
        )
    return root / rel


DEFAULT_MIN_AREA = 16  # pixels; smaller instances are kept and flagged `small_instance`


def _instance(instance_id: object, mask: np.ndarray, min_area: int) -> dict:
    area = int(mask.sum())
    return {
        "id": str(instance_id),
        "mask": encode_mask(mask),
        "flags": ["small_instance"] if area < min_area else [],
    }
