"""Decoding images and masks within one budget, and the mask rule, for ingest, the Ray Data
reader and prediction alike.

Every decoder reads the header first and refuses a file over the budget (pixels, decoded bytes,
file size, TIFF pages) with a message naming it, so one hostile file costs a rejection, not the
process. Images: grayscale, palette, RGBA (alpha dropped) and 16-bit images become 8-bit RGB and
are flagged, not rejected. Masks follow `manifest.MASK_RULE`.
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import threading
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np
from PIL import (  # the decoders PIL_FORMATS names, registered before the first open
    BmpImagePlugin,  # noqa: F401
    Image,
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401  (JPEG's factory opens multi-picture files with it)
    PngImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}


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


class SampleDecodeError(RuntimeError):
    """A stored sample no longer decodes (the shard changed after ingest); raised while
    reading for training, where `Rejected` is what ingest records."""


class Rejected(Exception):
    """One sample cannot be used; the message is the reason recorded in the manifest."""


def printable(path: str | os.PathLike) -> str:
    """A path as valid UTF-8 text (undecodable bytes shown as \\xNN) for manifests and errors."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


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
            f"{MAX_DECODED_BYTES >> 20} MiB (the limits in orchestrator.data.codec); tile it into "
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


def open_rgb(data: bytes, what: str = "stored image") -> Image.Image:
    """Stored PNG/JPEG bytes -> an RGB PIL image under the decoding budget (no copy when it
    already is RGB, as every stored JPEG and most PNGs are)."""
    img = open_encoded(data, what)
    return img if img.mode == "RGB" else img.convert("RGB")


def open_header(data: bytes, what: str) -> Image.Image:
    """A supported image opened for its header alone (size, mode), budget checked, pixels not
    decoded: what a reader needs when the pixels are decoded elsewhere (on the GPU)."""
    _check_file_size(data, what)
    try:
        with _pil_check_off():
            img = Image.open(io.BytesIO(data), formats=PIL_FORMATS)
            check_budget(*img.size, len(img.getbands()), _MODE_BYTES.get(img.mode, 1), what)
    except Rejected:
        raise
    except Exception as exc:
        message = re.sub(r"\s*<_io\.BytesIO object at 0x[0-9a-f]+>", "", str(exc))
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
    if arr.size and arr.dtype.kind in "ub" and arr.max() <= 1:  # 0/1 already, as stored:
        return arr.astype(np.uint8), []  # one pass instead of a 4 ms `unique` per 1 M px
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
