"""Ingest image/mask pairs into sharded parquet + a manifest, with no silent loss.

Every input sample ends up either as a row in a shard or in the manifest's `rejected` list with
its reason; never neither. Re-running an ingest on the same input gives the same bytes (and the
old output is only replaced once the new one is complete).

Mask rule (applied the same everywhere, written into every manifest as `mask_rule`):
  * values {0, 1}                    -> as is
  * two values {0, k}, any k > 0     -> mask = value > 0 (0/255 masks, label images)
  * 8-bit maps with more values whose pixels are >= 98 % near 0 or near the maximum (JPEG
    artefacts, anti-aliased edges) -> mask = value > max/2, flagged `mask_thresholded`
  * anything else (multi-class label maps, soft masks) -> rejected with the values found
  * colour masks are read as grey when their channels agree, otherwise rejected
Images: grayscale, palette, RGBA (alpha dropped) and 16-bit images are converted to 8-bit RGB and
flagged, not rejected. PNG/JPEG bytes are stored untouched when no conversion is needed.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import warnings
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

__all__ = [
    "MASK_RULE",
    "PARQUET_SCHEMA",
    "SCHEMA_VERSION",
    "DatasetWriter",
    "IngestError",
    "Rejected",
    "decode_image",
    "decode_mask",
    "ingest",
    "ingest_convlora",
    "ingest_folders",
    "load_manifest",
    "shard_paths",
]

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
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULT_SHARD_BYTES = 64 << 20
MAX_PIXELS = 1 << 28  # large remote-sensing tiles are legitimate input (PIL warns at 89 M)


class IngestError(Exception):
    """The input as a whole is unusable (missing folder, CSV without required columns)."""


class Rejected(Exception):
    """One sample cannot be used; the message is the reason recorded in the manifest."""


def printable(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text (undecodable bytes shown as \\xNN) for manifests and errors."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# ----------------------------------------------------------------------------- decoding


@contextlib.contextmanager
def _pixel_limit(limit: int):
    """PIL's decompression-bomb limit for this call only (importing us changes nothing)."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _open(data: bytes, what: str) -> Image.Image:
    if not data:
        raise Rejected(f"{what} is a zero-byte file")
    try:
        with _pixel_limit(MAX_PIXELS):
            img = Image.open(io.BytesIO(data))
            img.load()
    except Exception as exc:  # PIL raises many types for corrupt data
        raise Rejected(f"{what} is unreadable ({type(exc).__name__}: {exc})") from None
    return img


def decode_image(data: bytes) -> tuple[np.ndarray, bytes, list[str]]:
    """Encoded image -> (H, W, 3) uint8, bytes to store, conversion flags."""
    img = _open(data, "image")
    flags: list[str] = []
    fmt = img.format
    arr = np.asarray(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I") or arr.dtype in (np.uint16, np.int32):
        flags.append("converted_16bit")
        a = arr.astype(np.float64)
        hi = a.max() if a.max() > 255 else 255.0
        arr = np.clip(a / max(hi, 1) * 255.0 + 0.5, 0, 255).astype(np.uint8)
        arr = np.stack([arr] * 3, axis=-1) if arr.ndim == 2 else arr[..., :3]
    elif img.mode != "RGB":
        flags.append(f"converted_{img.mode}")
        arr = np.asarray(img.convert("RGB"))
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise Rejected(f"image has unsupported shape {arr.shape}")
    if flags or fmt not in ("PNG", "JPEG"):
        if fmt not in ("PNG", "JPEG"):
            flags.append(f"reencoded_{fmt or 'unknown'}")
        stored = encode_png(arr)
    else:
        stored = data
    return np.ascontiguousarray(arr), stored, flags


def binarise_mask(arr: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """Apply MASK_RULE to a 2-D integer array -> (uint8 0/1, flags) or raise Rejected."""
    values = np.unique(arr)
    if values.size <= 2 and set(values.tolist()) <= {0, 1}:
        return arr.astype(np.uint8), []
    if values.size == 2 and values[0] == 0:
        return (arr > 0).astype(np.uint8), []
    if values.size == 1:  # a constant non-zero mask: the whole image is foreground
        return np.ones_like(arr, dtype=np.uint8), []
    top = float(values[-1])
    near = (arr <= top * 0.125) | (arr >= top * 0.875)
    if top >= 128 and near.mean() >= 0.98:
        return (arr > top / 2).astype(np.uint8), ["mask_thresholded"]
    shown = values[:8].tolist()
    more = f" ... ({values.size} distinct)" if values.size > 8 else ""
    raise Rejected(
        f"mask values {shown}{more} are not binary (expected 0/1, 0/255 or 0/k): a multi-class "
        "label map or a soft mask; binarise it (e.g. mask > 0 for the class you want) and re-run"
    )


def decode_mask(data: bytes) -> tuple[np.ndarray, list[str]]:
    """Encoded mask -> (H, W) uint8 0/1 and flags, following MASK_RULE."""
    img = _open(data, "mask")
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8), []
    arr = np.asarray(img)
    if img.mode == "P":
        arr = np.asarray(img.convert("L"))
    if arr.ndim == 3:
        chans = arr[..., :3]
        if not (
            np.array_equal(chans[..., 0], chans[..., 1])
            and np.array_equal(chans[..., 0], chans[..., 2])
        ):
            raise Rejected(
                "mask is a colour image whose channels differ; save it as a single-channel mask"
            )
        arr = chans[..., 0]
    return binarise_mask(arr)


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_mask(mask01: np.ndarray) -> bytes:
    return encode_png(mask01.astype(np.uint8))


# ----------------------------------------------------------------------------- writing


@dataclass
class _Shard:
    split: str
    rows: list[dict] = field(default_factory=list)
    nbytes: int = 0


class DatasetWriter:
    """Writes rows to per-split parquet shards of ~`shard_bytes`, then a manifest.

    Output goes to `<out>/<name>.partial/` and replaces `<out>/<name>/` only in `close()`, so an
    interrupted ingest never destroys a previous complete one.
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
    ) -> None:
        self.final = Path(out) / name
        self.tmp = Path(out) / f"{name}.partial"
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.name, self.shard_bytes = name, shard_bytes
        self.meta = {"source": source, "format": fmt, **(extra or {})}
        self.open: dict[str, _Shard] = {}
        self.shards: list[dict] = []
        self.counts: Counter[str] = Counter()
        self.flag_counts: dict[str, Counter[str]] = {}
        self.rejected: list[dict] = []
        self.ids: dict[str, str] = {}
        self.shard_index: Counter[str] = Counter()

    def reject(self, source: str, reason: str, split: str = "", row: int | None = None) -> None:
        entry = {"source": source, "split": split, "reason": reason}
        if row is not None:
            entry["row"] = row
        self.rejected.append(entry)

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
        if sample_id in self.ids:
            self.reject(
                source,
                f"duplicate id {sample_id!r} (first seen in split {self.ids[sample_id]!r})",
                split,
            )
            return False
        self.ids[sample_id] = split
        shard = self.open.setdefault(split, _Shard(split))
        shard.rows.append(
            {
                "id": sample_id,
                "dataset": self.name,
                "split": split,
                "image": image,
                "mask": mask,
                "height": int(height),
                "width": int(width),
                "source": source,
                "flags": sorted(set(flags)),
            }
        )
        shard.nbytes += len(image) + len(mask)
        self.counts[split] += 1
        fc = self.flag_counts.setdefault(split, Counter())
        fc.update(set(flags))
        if shard.nbytes >= self.shard_bytes:
            self._flush(split)
        return True

    def _flush(self, split: str) -> None:
        shard = self.open.pop(split, None)
        if shard is None or not shard.rows:
            return
        k = self.shard_index[split]
        self.shard_index[split] += 1
        rel = f"{split}-{k:05d}.parquet"
        table = pa.Table.from_pylist(shard.rows, schema=PARQUET_SCHEMA)
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

    def close(self) -> dict:
        for split in list(self.open):
            self._flush(split)
        manifest = {
            "schema_version": SCHEMA_VERSION,
            "dataset": self.name,
            **self.meta,
            "mask_rule": MASK_RULE,
            "counts": dict(sorted(self.counts.items())),
            "flags": {s: dict(sorted(c.items())) for s, c in sorted(self.flag_counts.items()) if c},
            "shards": sorted(self.shards, key=lambda s: s["path"]),
            "rejected": self.rejected,
        }
        (self.tmp / "manifest.json").write_text(
            json.dumps(manifest, indent=2, ensure_ascii=False) + "\n"
        )
        if self.final.exists():
            shutil.rmtree(self.final)
        os.replace(self.tmp, self.final)
        return manifest


def _add_pair(
    writer: DatasetWriter,
    split: str,
    sample_id: str,
    image_path: Path,
    mask_path: Path,
    row: int | None,
) -> None:
    source = printable(image_path)
    try:
        if not image_path.is_file():
            raise Rejected(f"image file not found: {printable(image_path)}")
        if not mask_path.is_file():
            raise Rejected(f"mask file not found: {printable(mask_path)}")
        img, stored, flags = decode_image(image_path.read_bytes())
        try:
            mask, mflags = decode_mask(mask_path.read_bytes())
        except Rejected as exc:
            raise Rejected(f"{exc} [{printable(mask_path)}]") from None
        if mask.shape != img.shape[:2]:
            raise Rejected(
                f"mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                f"{img.shape[1]}x{img.shape[0]} [{printable(mask_path)}]"
            )
    except Rejected as exc:
        writer.reject(source, str(exc), split, row)
        return
    flags = flags + mflags + (["empty_mask"] if not mask.any() else [])
    writer.add(
        split, sample_id, stored, encode_mask(mask), img.shape[0], img.shape[1], source, flags
    )


# ----------------------------------------------------------------------------- Conv-LoRA layout


def _convlora_csvs(src: Path) -> list[tuple[str, Path]]:
    csvs = sorted(p for p in src.glob("*.csv"))
    order = {"train": 0, "val": 1}
    chosen = [(p.stem, p) for p in csvs if p.stem in ("train", "val") or p.stem.startswith("test")]
    return sorted(chosen, key=lambda sp: (order.get(sp[0], 2), sp[0]))


def ingest_convlora(
    src: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Conv-LoRA benchmark folder: train.csv / val.csv / test*.csv with `image`,`label` columns
    (paths relative to the folder; a leading unnamed index column is ignored)."""
    import pandas as pd

    src = Path(src)
    if not src.is_dir():
        raise IngestError(
            f"source folder not found: {printable(src)} (unzip the benchmark, e.g. polyp.zip, and pass its folder)"
        )
    csvs = _convlora_csvs(src)
    if not csvs:
        raise IngestError(
            f"no train.csv/val.csv/test*.csv in {printable(src)}: this is not the Conv-LoRA layout; "
            "use --format folders for images/ + masks/ folders"
        )
    frames = []
    for split, path in csvs:
        try:
            df = pd.read_csv(path, dtype=str, keep_default_na=False)
        except Exception as exc:
            raise IngestError(f"{printable(path)}: cannot be read as CSV ({exc})") from None
        missing = {"image", "label"} - set(df.columns)
        if missing:
            raise IngestError(
                f"{printable(path)} lacks column(s) {sorted(missing)} (has {list(df.columns)}); "
                "the Conv-LoRA layout needs `image` and `label` columns with paths relative to the folder"
            )
        frames.append((split, df))
    writer = DatasetWriter(
        out,
        name or src.name,
        shard_bytes=shard_bytes,
        source=printable(src.resolve()),
        fmt="convlora",
    )
    for split, df in frames:
        for row, (image_rel, label_rel) in enumerate(zip(df["image"], df["label"], strict=True)):
            if not image_rel or not label_rel:
                writer.reject(f"{split}.csv row {row}", "empty image or label cell", split, row)
                continue
            image_path, mask_path = src / image_rel, src / label_rel
            sample_id = str(Path(image_rel).with_suffix("")).replace(os.sep, "/")
            _add_pair(writer, split, sample_id, image_path, mask_path, row)
    return writer.close()


# ----------------------------------------------------------------------------- folders layout


def _files_by_stem(folder: Path) -> tuple[dict[str, Path], list[Path]]:
    by_stem: dict[str, Path] = {}
    clashes: list[Path] = []
    for p in sorted(folder.iterdir(), key=lambda q: os.fsencode(q.name)):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        stem = p.stem
        if stem.endswith(("_mask", "_label", "_gt", "_segmentation")):
            stem = stem.rsplit("_", 1)[0]
        if stem in by_stem:
            clashes.append(p)
        else:
            by_stem[stem] = p
    return by_stem, clashes


def _folder_splits(src: Path) -> list[tuple[str, Path, Path]]:
    if (src / "images").is_dir() and (src / "masks").is_dir():
        return [("train", src / "images", src / "masks")]
    splits = [
        (d.name, d / "images", d / "masks")
        for d in sorted(src.iterdir())
        if d.is_dir() and (d / "images").is_dir() and (d / "masks").is_dir()
    ]
    if not splits:
        raise IngestError(
            f"{printable(src)} has no images/ + masks/ folders: expected SRC/images and SRC/masks, "
            "or SRC/<split>/images and SRC/<split>/masks (masks matched to images by file stem)"
        )
    return splits


def ingest_folders(
    src: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    *,
    split: str | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> dict:
    """Folder(s) of images with folder(s) of masks matched by file stem (`x.jpg` <-> `x.png`,
    also `x_mask.png`). `SRC/images` + `SRC/masks` is one split (`split`, default train);
    `SRC/<split>/images` + `SRC/<split>/masks` gives one split per sub-folder."""
    src = Path(src)
    if not src.is_dir():
        raise IngestError(f"source folder not found: {printable(src)}")
    splits = _folder_splits(src)
    if split and len(splits) == 1:
        splits = [(split, splits[0][1], splits[0][2])]
    writer = DatasetWriter(
        out,
        name or src.name,
        shard_bytes=shard_bytes,
        source=printable(src.resolve()),
        fmt="folders",
    )
    for split_name, images_dir, masks_dir in splits:
        images, image_clashes = _files_by_stem(images_dir)
        masks, mask_clashes = _files_by_stem(masks_dir)
        for p in image_clashes:
            writer.reject(
                printable(p),
                f"duplicate id {p.stem!r}: another image in the folder has the same stem",
                split_name,
            )
        for p in mask_clashes:
            writer.reject(
                printable(p), f"mask stem {p.stem!r} matches more than one mask file", split_name
            )
        for stem, image_path in images.items():
            if stem not in masks:
                writer.reject(
                    printable(image_path),
                    f"no mask with stem {printable(stem)!r} in {printable(masks_dir)}",
                    split_name,
                )
                continue
            _add_pair(writer, split_name, printable(stem), image_path, masks[stem], None)
        for stem in sorted(set(masks) - set(images)):
            writer.reject(
                printable(masks[stem]), "mask without an image of the same stem", split_name
            )
    return writer.close()


def ingest(fmt: str, src: str | os.PathLike, out: str | os.PathLike, **kwargs: object) -> dict:
    if fmt == "convlora":
        return ingest_convlora(src, out, **kwargs)
    if fmt == "folders":
        return ingest_folders(src, out, **kwargs)
    raise IngestError(f"unknown format {fmt!r}: use convlora or folders")


# ----------------------------------------------------------------------------- reading


def _fs(location: str | os.PathLike) -> tuple[object, str]:
    """(pyarrow filesystem, path) for a local folder or a URI such as s3://bucket/data/polyp."""
    import pyarrow.fs as pafs

    text = os.fspath(location)
    if "://" in text:
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), str(Path(text).expanduser().resolve())


def _join(root: str, name: str) -> str:
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
        manifest = json.loads(f.read())
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
        if verify:
            with fs.open_input_stream(info.path) as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != shard["sha256"]:
                raise IngestError(
                    f"shard {shard['path']} changed after ingest (sha256 mismatch); re-run the ingest"
                )
    uri = os.fspath(dataset_dir)
    manifest["root"] = uri.rstrip("/") if "://" in uri else root
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
    lines = [
        f"dataset {manifest['dataset']}: "
        + ", ".join(f"{s}={n}" for s, n in manifest["counts"].items())
    ]
    for split, flags in manifest.get("flags", {}).items():
        lines.append(f"  flagged in {split}: " + ", ".join(f"{k}={v}" for k, v in flags.items()))
    lines.append(
        f"  shards: {len(manifest['shards'])}, {sum(s['bytes'] for s in manifest['shards']) / 1e6:.1f} MB"
    )
    rej = manifest["rejected"]
    lines.append(f"  rejected: {len(rej)}")
    for r in rej[:20]:
        lines.append(f"    - {r['source']}: {r['reason']}")
    if len(rej) > 20:
        lines.append(f"    ... {len(rej) - 20} more in manifest.json")
    return "\n".join(lines)


warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)
