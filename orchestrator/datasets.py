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
import re
import shutil
import threading
import uuid
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from glob import escape as glob_escape
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import (  # the decoders PIL_FORMATS names, registered before the first open
    BmpImagePlugin,  # noqa: F401
    Image,
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401  (JPEG's factory opens multi-picture files with it)
    PngImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from orchestrator.storage import atomic_write_json, exclusive, safe_component, swap_dir

__all__ = [
    "INSTANCE_COLUMNS",
    "INSTANCE_SCHEMA",
    "MASK_RULE",
    "PARQUET_SCHEMA",
    "SCHEMA_VERSION",
    "DatasetWriter",
    "FolderLayout",
    "IngestError",
    "Rejected",
    "decode_image",
    "decode_mask",
    "ingest_convlora",
    "ingest_folders",
    "load_manifest",
    "ordered_map",
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
# Instance datasets (COCO, label images): one row per IMAGE, its bytes stored once, and parallel
# lists with one entry per instance; `mask` stays null. Readers explode rows into one sample per
# instance (`orchestrator.pipeline.decode_batch`). Manifests of such datasets say
# `"kind": "instances"`; `counts` are instances per split and `images` images per split.
INSTANCE_COLUMNS = ["instance_ids", "instance_masks", "instance_categories"]
INSTANCE_SCHEMA = PARQUET_SCHEMA.append(pa.field("instance_ids", pa.list_(pa.string())))
INSTANCE_SCHEMA = INSTANCE_SCHEMA.append(pa.field("instance_masks", pa.list_(pa.binary())))
INSTANCE_SCHEMA = INSTANCE_SCHEMA.append(pa.field("instance_categories", pa.list_(pa.string())))
INSTANCE_SCHEMA = INSTANCE_SCHEMA.append(
    pa.field("instance_flags", pa.list_(pa.list_(pa.string())))
)
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
DEFAULT_SHARD_BYTES = 64 << 20
# One decoding budget for ingest, the Ray Data reader and predict, checked from the file's header
# before any pixel is decoded: large remote-sensing tiles are legitimate (PIL's own default stops
# at 89 M px), a 1.6 MB file declaring 40000x40000 px is not.
MAX_PIXELS = 1 << 28  # 268 M px, e.g. 16384 x 16384
MAX_DECODED_BYTES = 3 << 28  # 768 MiB: an 8-bit RGB image of MAX_PIXELS; 16-bit counts double
MAX_FILE_BYTES = 1 << 30  # an encoded file larger than this is refused before it is read
MAX_TIFF_PAGES = 64  # a TIFF with more pages is a stack; read only its header
# The image formats PIL may decode (TIFF goes through tifffile): PIL otherwise sniffs every format
# it knows (EPS runs Ghostscript). JPEG includes MPO, the multi-picture JPEG of some cameras.
PIL_FORMATS = ("PNG", "JPEG", "BMP", "WEBP")
# Below this many images decoding threads are not worth starting.
POOL_MIN_ITEMS = 32


class IngestError(Exception):
    """The input as a whole is unusable (missing folder, CSV without required columns)."""


class Rejected(Exception):
    """One sample cannot be used; the message is the reason recorded in the manifest."""


def printable(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text (undecodable bytes shown as \\xNN) for manifests and errors."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


# ----------------------------------------------------------------------------- decoding


_limit_lock = threading.Lock()
_limit_users = 0
_limit_previous: int | None = None


@contextlib.contextmanager
def _pil_check_off():
    """PIL's own decompression-bomb check off while any of our decoders runs: `check_budget`
    decides from the header instead, with one limit and one message for every format (PIL's
    would stop at 2x its 89 M px default). PIL reads one global: decoding threads share one
    change and the last one out restores the caller's value (importing us changes nothing)."""
    global _limit_users, _limit_previous
    with _limit_lock:
        if _limit_users == 0:
            _limit_previous = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = None
        _limit_users += 1
    try:
        yield
    finally:
        with _limit_lock:
            _limit_users -= 1
            if _limit_users == 0:
                Image.MAX_IMAGE_PIXELS = _limit_previous


def check_budget(width: int, height: int, channels: int, itemsize: int, what: str) -> None:
    """Refuse an image whose header declares more than the decoding budget (`MAX_PIXELS`,
    `MAX_DECODED_BYTES` at its working dtype) before it is decoded."""
    pixels = int(width) * int(height)
    decoded = pixels * max(int(channels), 1) * max(int(itemsize), 1)
    if pixels > MAX_PIXELS or decoded > MAX_DECODED_BYTES:
        raise Rejected(
            f"{what} declares {width}x{height} px x {channels} channel(s) of {itemsize} byte(s) "
            f"({decoded / 2**20:.1f} MiB decoded), over the limit of {MAX_PIXELS} px and "
            f"{MAX_DECODED_BYTES >> 20} MiB (orchestrator.datasets.MAX_PIXELS); tile it into "
            "smaller images"
        )


def _check_file_size(data: bytes, what: str) -> None:
    if not data:
        raise Rejected(f"{what} is a zero-byte file")
    if len(data) > MAX_FILE_BYTES:
        raise Rejected(
            f"{what} is {len(data) / 2**30:.1f} GiB, over the {MAX_FILE_BYTES >> 30} GiB file "
            "limit; tile it into smaller images"
        )


_MODE_BYTES = {"I;16": 2, "I;16B": 2, "I;16L": 2, "I": 4, "F": 4, "I;16N": 2}


def open_encoded(data: bytes, what: str, working_itemsize: int | None = None) -> Image.Image:
    """Decode image bytes of a supported format (`PIL_FORMATS`) within the decoding budget
    (counted at `working_itemsize` bytes per channel when the caller converts to a wider
    dtype); a Rejected names `what` and why. Ingest, the Ray Data reader and predict all
    decode here."""
    _check_file_size(data, what)
    try:
        with _pil_check_off():
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            itemsize = working_itemsize or _MODE_BYTES.get(img.mode, 1)
            check_budget(*img.size, len(img.getbands()), itemsize, what)
            img.load()
    except Rejected:
        raise
    except Exception as exc:  # PIL raises many types for corrupt data
        # PIL names the buffer "<_io.BytesIO object at 0x...>": an address would make two
        # ingests of one source differ
        message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
        if isinstance(exc, Image.UnidentifiedImageError):
            message += f" (supported: {', '.join(PIL_FORMATS)}, TIFF)"
        raise Rejected(f"{what} is unreadable ({type(exc).__name__}: {message})") from None
    return img


def is_tiff(data: bytes) -> bool:
    return data[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")


def read_tiff(data: bytes, what: str, working_itemsize: int | None = None) -> np.ndarray:
    """A TIFF (microscopy: 16-bit, float, BigTIFF) as an array through `tifffile`; its shape,
    dtype and page count are read from the header and checked against the budget first."""
    import tifffile

    _check_file_size(data, what)
    try:
        with tifffile.TiffFile(io.BytesIO(data)) as tif:
            if len(tif.pages) > MAX_TIFF_PAGES:
                raise Rejected(
                    f"{what} is a TIFF of {len(tif.pages)} pages (a stack or volume); save one "
                    "2-D plane per file"
                )
            series = tif.series[0]
            shape, dtype = tuple(series.shape), np.dtype(series.dtype)
            planes = [d for d in shape if d > 1]
            if len(planes) > 3 or (len(planes) == 3 and min(planes) not in (3, 4)):
                raise Rejected(
                    f"{what} is a TIFF of shape {shape} (a stack or volume); save one 2-D plane "
                    "per file"
                )
            h, w, c = _plane_dims(planes)
            check_budget(w, h, c, working_itemsize or dtype.itemsize, what)
            arr = series.asarray()
    except Rejected:
        raise
    except Exception as exc:
        raise Rejected(f"{what} is unreadable ({type(exc).__name__}: {exc})") from None
    arr = np.squeeze(arr)
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[-1] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar RGB(A)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
        raise Rejected(
            f"{what} is a TIFF of shape {arr.shape} (a stack or volume); save one 2-D plane per file"
        )
    return arr


def _plane_dims(planes: list[int]) -> tuple[int, int, int]:
    """(height, width, channels) of a TIFF series' non-singleton dims, channels last or first."""
    if len(planes) == 3:
        if planes[-1] in (3, 4):
            return planes[0], planes[1], planes[2]
        return planes[1], planes[2], planes[0]
    padded = [1] * (2 - len(planes)) + planes
    return padded[0], padded[1], 1


def _to_uint8(arr: np.ndarray, stretch: bool) -> np.ndarray:
    """Integer or float pixels -> uint8. `stretch` (TIFF): [min, max] -> [0, 255] when values
    leave [0, 255]; else (16-bit PNG): divided by max(255, max). 8/16-bit inputs go through a
    lookup table and others in blocks of rows, so a large tile never gets a float64 copy."""
    lo, hi = float(arr.min()), float(arr.max())
    if stretch:
        lo, hi = (0.0, 255.0) if hi <= 255 and lo >= 0 else (lo, hi)
    else:
        lo, hi = 0.0, (hi if hi > 255 else 255.0)
    span = max(hi - lo, 1e-12)

    def convert(a: np.ndarray) -> np.ndarray:
        return np.clip((a.astype(np.float64) - lo) / span * 255.0 + 0.5, 0, 255).astype(np.uint8)

    if arr.dtype.kind == "u" and arr.dtype.itemsize <= 2:
        return convert(np.arange(1 << (8 * arr.dtype.itemsize)))[arr]
    out = np.empty(arr.shape, np.uint8)
    step = max(1, (1 << 22) // max(1, arr[:1].size))
    for start in range(0, arr.shape[0], step):
        out[start : start + step] = convert(arr[start : start + step])
    return out


def decode_image(data: bytes) -> tuple[np.ndarray, bytes, list[str]]:
    """Encoded image -> (H, W, 3) uint8, bytes to store, conversion flags."""
    if is_tiff(data):
        arr = read_tiff(data, "image")
        flags = ["reencoded_TIFF"]
        if arr.dtype != np.uint8:
            flags.append(f"converted_{arr.dtype}")
            arr = _to_uint8(arr, stretch=True)
        if arr.ndim == 2:
            arr = np.stack([arr] * 3, axis=-1)
        arr = np.ascontiguousarray(arr[..., :3])
        return arr, encode_png(arr), flags
    img = open_encoded(data, "image")
    flags: list[str] = []
    fmt = img.format
    arr = np.asarray(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I") or arr.dtype in (np.uint16, np.int32):
        flags.append("converted_16bit")
        arr = _to_uint8(arr, stretch=False)
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
    img = open_encoded(data, "mask")
    if img.mode == "1":
        return np.asarray(img).astype(np.uint8), []
    arr = np.asarray(img)
    if img.mode == "P":
        arr = np.asarray(img.convert("L"))
    if arr.ndim == 3:
        arr = grey_channel(
            arr, "mask is a colour image whose channels differ; save it as a single-channel mask"
        )
    return binarise_mask(arr)


def grey_channel(arr: np.ndarray, error: str) -> np.ndarray:
    """(H, W, C) whose colour channels agree -> (H, W); else Rejected(error)."""
    chans = arr[..., :3]
    if not (
        np.array_equal(chans[..., 0], chans[..., 1])
        and np.array_equal(chans[..., 0], chans[..., 2])
    ):
        raise Rejected(error)
    return chans[..., 0]


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=6)
    return buf.getvalue()


def encode_mask(mask01: np.ndarray) -> bytes:
    return encode_png(mask01.astype(np.uint8))


# ----------------------------------------------------------------------------- parallel decode


def default_workers() -> int:
    """The CPUs this process may use (its affinity, not the machine's count), at most 8: past
    that the single writer (parquet, sha256) is the bottleneck."""
    return max(1, min(8, len(os.sched_getaffinity(0))))


def ordered_map(
    fn: Callable[[object], object], items: Sequence[object], workers: int | None = None
) -> Iterator[object]:
    """`fn(item)` for each item, in item order, computed by `workers` threads.

    Decoding (images, polygons, masks, PNG encoding) is the cost of an ingest and independent
    per image; Pillow's codecs, zlib, pycocotools and numpy release the GIL, so threads scale
    (COCO, 2 cores: 2.0x) and beat processes (1.7x: pickling the bytes, starting interpreters,
    re-importing the caller's script). Writing stays in the caller, in input order, so the shards
    and the manifest are the same bytes for any number of workers. At most 4 results per worker
    wait ahead of the writer: a large dataset never piles up in memory. `workers=None`:
    `default_workers()`, or 1 below `POOL_MIN_ITEMS` items."""
    if workers is None:
        workers = default_workers() if len(items) >= POOL_MIN_ITEMS else 1
    if workers < 1:  # raised here, not at the first result: before anything is decoded
        raise IngestError(f"--workers must be at least 1, got {workers}")
    workers = min(workers, len(items))
    return map(fn, items) if workers <= 1 else _threaded(fn, items, workers)


def _threaded(fn: Callable, items: Sequence[object], workers: int) -> Iterator[object]:
    pending: deque = deque()
    todo = iter(items)
    with ThreadPoolExecutor(workers, thread_name_prefix="ingest") as pool:
        try:
            for item in todo:
                pending.append(pool.submit(fn, item))
                if len(pending) >= 4 * workers:
                    break
            while pending:
                result = pending.popleft().result()
                for item in todo:  # refill the window by one
                    pending.append(pool.submit(fn, item))
                    break
                yield result
        finally:  # an error or Ctrl-C: drop what has not started
            for future in pending:
                future.cancel()


# ----------------------------------------------------------------------------- writing


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
        shard = self.open.setdefault(split, _Shard(split))
        shard.rows.append(
            {
                "id": image_id,
                "dataset": self.name,
                "split": split,
                "image": image,
                "mask": None,
                "height": int(height),
                "width": int(width),
                "source": source,
                "flags": sorted(set(flags)),
                "instance_ids": [str(i["id"]) for i in instances],
                "instance_masks": [i["mask"] for i in instances],
                "instance_categories": [str(i["category"]) for i in instances],
                "instance_flags": [sorted(set(i["flags"])) for i in instances],
            }
        )
        shard.nbytes += len(image) + sum(len(i["mask"]) for i in instances)
        self.counts[split] += len(instances)
        self.image_counts[split] += 1
        fc = self.flag_counts.setdefault(split, Counter())
        fc.update(set(flags))
        for inst in instances:
            fc.update(set(inst["flags"]))
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
    workers: int | None = None,
) -> dict:
    """Conv-LoRA benchmark folder: train.csv / val.csv / test*.csv with `image`,`label` columns
    (paths relative to the folder; a leading unnamed index column is ignored). `workers`: decoding
    threads (`ordered_map`)."""
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
        src.resolve().name if name is None else name,
        shard_bytes=shard_bytes,
        source=printable(src.resolve()),
        fmt="convlora",
        sources=[src],
    )
    with writer:
        _write_pairs(writer, _convlora_pairs(src, frames), workers)
        return writer.close()


def _convlora_pairs(src: Path, frames: list[tuple[str, object]]) -> list[tuple]:
    """(split, id, image, mask, row) per CSV row; a row whose cells are empty or lead out of
    the folder gets the reason in its mask's place (`_write_pairs`)."""
    pairs: list[tuple] = []
    for split, df in frames:
        for row, (image_rel, label_rel) in enumerate(zip(df["image"], df["label"], strict=True)):
            if not image_rel or not label_rel:
                pairs.append((split, "", None, "empty image or label cell", row))
                continue
            try:
                image_path = inside(src, image_rel, "image cell")
                label_path = inside(src, label_rel, "label cell")
            except Rejected as exc:
                pairs.append((split, "", None, str(exc), row))
                continue
            sample_id = str(Path(image_rel).with_suffix("")).replace(os.sep, "/")
            pairs.append((split, sample_id, image_path, label_path, row))
    return pairs


# ----------------------------------------------------------------------------- folders layout


@dataclass(frozen=True)
class FolderLayout:
    """Where a source keeps its images and masks, and how a mask's name follows from its image's.

    `splits`: (split, images folder, masks folder), relative to SRC; several splits may share a
    masks folder (CAMO keeps all ground truth in GT/). `image_glob` picks the images (ISIC keeps
    `*_superpixels.png` next to its JPEGs). `mask_name` builds a mask's file name from its image's
    stem, e.g. "{stem}_segmentation.png"; None matches by stem (`x.jpg` <-> `x.png`, `x_mask.png`).
    """

    splits: tuple[tuple[str, str, str], ...]
    image_glob: str = "*"
    mask_name: str | None = None

    def describe(self) -> str:
        names = ", ".join(f"{s}: {i}/ + {m}/" for s, i, m in self.splits)
        return f"{names} (images {self.image_glob}, masks {self.mask_name or 'by stem'})"


# The paper's benchmarks as their archives unpack (the folder you pass is the one shown).
PRESETS: dict[str, FolderLayout] = {
    # Kvasir-SEG/: images/*.jpg, masks/*.jpg (JPEG masks: the near-binary rule thresholds them)
    "kvasir": FolderLayout((("train", "images", "masks"),), "*.jpg", "{stem}.jpg"),
    # ISIC 2017 part 1: ISIC-2017_<Set>_Data/ISIC_0000000.jpg and
    # ISIC-2017_<Set>_Part1_GroundTruth/ISIC_0000000_segmentation.png
    "isic2017": FolderLayout(
        (
            ("train", "ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
            ("val", "ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
            ("test", "ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth"),
        ),
        "ISIC_*.jpg",
        "{stem}_segmentation.png",
    ),
    # CAMO-V.1.0-CVPR19/: Images/Train/*.jpg, Images/Test/*.jpg, GT/*.png (one GT folder)
    "camo": FolderLayout(
        (("train", "Images/Train", "GT"), ("test", "Images/Test", "GT")), "*.jpg", "{stem}.png"
    ),
    # COD10K-v3/: Train|Test/Image/*.jpg, Train|Test/GT_Object/*.png; the camouflaged images only
    # (COD10K-CAM-*; the NonCAM images have no object to segment)
    "cod10k": FolderLayout(
        (("train", "Train/Image", "Train/GT_Object"), ("test", "Test/Image", "Test/GT_Object")),
        "COD10K-CAM-*.jpg",
        "{stem}.png",
    ),
}
# Instance label images of the same benchmarks (`--format labels --preset ...`).
LABEL_PRESETS: dict[str, FolderLayout] = {
    "cod10k": FolderLayout(
        (
            ("train", "Train/Image", "Train/GT_Instance"),
            ("test", "Test/Image", "Test/GT_Instance"),
        ),
        "COD10K-CAM-*.jpg",
        "{stem}.png",
    ),
}


def _files_by_stem(folder: Path, glob: str = "*") -> tuple[dict[str, Path], list[Path]]:
    by_stem: dict[str, Path] = {}
    clashes: list[Path] = []
    for p in sorted(folder.glob(glob), key=lambda q: os.fsencode(q.name)):
        if p.name.startswith(".") or not p.is_file():
            continue
        if p.suffix.lower() not in IMAGE_EXTENSIONS:
            continue
        stem = p.stem
        if glob == "*" and stem.endswith(("_mask", "_label", "_gt", "_segmentation")):
            stem = stem.rsplit("_", 1)[0]
        if stem in by_stem:
            clashes.append(p)
        else:
            by_stem[stem] = p
    return by_stem, clashes


def default_layout(src: Path, masks: tuple[str, ...] = ("masks",)) -> FolderLayout:
    """SRC/images + SRC/<masks> (one split), or SRC/<split>/images + SRC/<split>/<masks>."""
    for m in masks:
        if (src / "images").is_dir() and (src / m).is_dir():
            return FolderLayout((("train", "images", m),))
    splits = []
    for d in sorted(src.iterdir()):
        found = [m for m in masks if d.is_dir() and (d / "images").is_dir() and (d / m).is_dir()]
        if found:
            splits.append((d.name, f"{d.name}/images", f"{d.name}/{found[0]}"))
    if not splits:
        want = "/".join(masks)
        raise IngestError(
            f"{printable(src)} has no images/ + {want}/ folders: expected SRC/images and "
            f"SRC/{masks[0]}, or SRC/<split>/images and SRC/<split>/{masks[0]} (matched by file "
            "stem); for other layouts use --preset, or --images/--masks/--mask-name"
        )
    return FolderLayout(tuple(splits))


def resolve_layout(
    src: Path,
    *,
    preset: str | None = None,
    images: str | None = None,
    masks: str | None = None,
    mask_name: str | None = None,
    image_glob: str | None = None,
    split: str | None = None,
    presets: dict[str, FolderLayout] = PRESETS,
    default_masks: tuple[str, ...] = ("masks",),
) -> FolderLayout:
    """The layout a user asked for: a preset, explicit folders/patterns, or the default; only
    the splits whose folders exist (an error names what was expected when none do)."""
    if preset:
        if preset not in presets:
            raise IngestError(f"unknown preset {preset!r}: choose from {sorted(presets)}")
        layout = presets[preset]
    elif images or masks:
        if not (images and masks):
            raise IngestError("--images and --masks go together (folders relative to SRC)")
        layout = FolderLayout(((split or "train", images, masks),))
    else:
        layout = default_layout(src, default_masks)
    if mask_name is not None or image_glob is not None:
        layout = FolderLayout(
            layout.splits, image_glob or layout.image_glob, mask_name or layout.mask_name
        )
    if layout.mask_name is not None:
        try:
            layout.mask_name.format(stem="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise IngestError(
                f"--mask-name {layout.mask_name!r} is not a pattern with {{stem}} ({exc}); "
                "e.g. '{stem}_segmentation.png'"
            ) from None
    present = tuple(s for s in layout.splits if (src / s[1]).is_dir() and (src / s[2]).is_dir())
    if not present:
        raise IngestError(
            f"{printable(src)} does not match the layout {layout.describe()}: none of these "
            "folder pairs exists"
        )
    if split and len(present) == 1:
        present = ((split, present[0][1], present[0][2]),)
    return FolderLayout(present, layout.image_glob, layout.mask_name)


def layout_pairs(writer: DatasetWriter, src: Path, layout: FolderLayout) -> list[tuple]:
    """(split, id, image path, mask path) for every image with a mask; every image without one,
    clashing name or unused mask goes to the manifest's `rejected` list."""
    pairs: list[tuple[str, str, Path, Path]] = []
    claimed: set[Path] = set()
    mask_dirs: dict[Path, str] = {}
    for split, images_rel, masks_rel in layout.splits:
        images_dir, masks_dir = src / images_rel, src / masks_rel
        mask_dirs.setdefault(masks_dir, split)
        images, image_clashes = _files_by_stem(images_dir, layout.image_glob)
        for p in image_clashes:
            writer.reject(
                printable(p),
                f"duplicate id {p.stem!r}: another image in the folder has the same stem",
                split,
            )
        by_stem: dict[str, Path] = {}
        if layout.mask_name is None:
            by_stem, mask_clashes = _files_by_stem(masks_dir)
            for p in mask_clashes:
                writer.reject(
                    printable(p), f"mask stem {p.stem!r} matches more than one mask file", split
                )
                claimed.add(p)
        for stem, image_path in images.items():
            if layout.mask_name is None:
                mask_path = by_stem.get(stem)
                want = f"with stem {printable(stem)!r}"
            else:
                name = layout.mask_name.format(stem=stem)
                mask_path = masks_dir / name if (masks_dir / name).is_file() else None
                want = f"named {printable(name)!r}"
            if mask_path is None:
                writer.reject(
                    printable(image_path), f"no mask {want} in {printable(masks_dir)}", split
                )
                continue
            claimed.add(mask_path)
            pairs.append((split, printable(stem), image_path, mask_path))
    orphan = (
        "mask without an image of the same stem"
        if layout.mask_name is None
        else f"mask without an image (masks are named {layout.mask_name} after their image)"
    )
    for masks_dir, split in mask_dirs.items():
        for p in sorted(masks_dir.iterdir(), key=lambda q: os.fsencode(q.name)):
            usable = p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS
            if usable and p not in claimed and not p.name.startswith("."):
                writer.reject(printable(p), orphan, split)
    return pairs


def parse_holdout(specs: list[str] | None) -> dict[str, float]:
    """["val=0.1", "test=50"] -> {"val": 0.1, "test": 50.0} (a fraction below 1, else a count)."""
    out: dict[str, float] = {}
    for spec in specs or []:
        name, _, value = spec.partition("=")
        try:
            number = float(value)
        except ValueError:
            number = -1.0
        if not name or number <= 0 or (number >= 1 and not number.is_integer()):
            raise IngestError(
                f"--holdout {spec!r}: expected SPLIT=FRACTION (0 < f < 1) or SPLIT=COUNT, "
                "e.g. val=0.1 or test=50"
            )
        out[name] = number
    return out


def assign_holdout(ids: list[str], holdout: dict[str, float]) -> dict[str, str]:
    """Deterministic held-out splits by IMAGE (an image's instances never straddle splits):
    images ordered by the sha256 of their id, the first ones go to the holdout splits in order."""
    order = sorted(ids, key=lambda i: hashlib.sha256(i.encode()).hexdigest())
    out: dict[str, str] = {}
    start = 0
    for split, value in holdout.items():
        n = int(value) if value >= 1 else round(value * len(order))
        for image_id in order[start : start + n]:
            out[image_id] = split
        start += n
    if start >= len(order) and order:
        raise IngestError(
            f"--holdout takes {start} of {len(order)} images and leaves none for training"
        )
    return out


def open_folder_source(
    src: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None,
    *,
    fmt: str,
    holdout: dict[str, float] | None = None,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    extra: dict | None = None,
    instances: bool = False,
    presets: dict[str, FolderLayout] = PRESETS,
    default_masks: tuple[str, ...] = ("masks",),
    **layout_options: str | None,
) -> tuple[DatasetWriter, list[tuple[str, str, Path, Path]]]:
    """The writer and the (split, id, image, mask) pairs of a folder source: its layout resolved
    (`resolve_layout`), unmatched files rejected, held-out splits applied by image."""
    src = Path(src)
    if not src.is_dir():
        raise IngestError(f"source folder not found: {printable(src)}")
    layout = resolve_layout(src, presets=presets, default_masks=default_masks, **layout_options)
    if holdout and len(layout.splits) > 1:
        raise IngestError(
            f"--holdout splits one split, but the source already has {len(layout.splits)} "
            f"({', '.join(s[0] for s in layout.splits)}); drop --holdout"
        )
    meta = {"layout": layout.describe(), **(extra or {})}
    if holdout:
        meta["holdout"] = holdout
    writer = DatasetWriter(
        out,
        src.resolve().name if name is None else name,
        shard_bytes=shard_bytes,
        source=printable(src.resolve()),
        fmt=fmt,
        extra=meta,
        instances=instances,
        sources=[src, *(src / d for s in layout.splits for d in s[1:])],
    )
    try:
        pairs = layout_pairs(writer, src, layout)
    except BaseException:
        writer.abort()
        raise
    moved = assign_holdout([p[1] for p in pairs], holdout) if holdout else {}
    return writer, [(moved.get(p[1], p[0]), p[1], p[2], p[3]) for p in pairs]


def ingest_folders(
    src: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    *,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    holdout: dict[str, float] | None = None,
    workers: int | None = None,
    **layout_options: str | None,
) -> dict:
    """Folder(s) of images with folder(s) of binary masks. Default layout: `SRC/images` +
    `SRC/masks` is one split (`split`, default train), `SRC/<split>/images` + `SRC/<split>/masks`
    one split per sub-folder, masks matched by stem; `preset` or `images`/`masks`/`mask_name`/
    `image_glob` for other layouts (see `PRESETS`, `resolve_layout`); `holdout` carves splits
    out of one split; `workers` decoding threads (`ordered_map`)."""
    writer, pairs = open_folder_source(
        src, out, name, fmt="folders", holdout=holdout, shard_bytes=shard_bytes, **layout_options
    )
    with writer:
        _write_pairs(writer, [(*p, None) for p in pairs], workers)
        return writer.close()


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
