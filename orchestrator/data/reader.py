"""Ray Data: parquet shards -> decoded, resized, padded uint8 batches for training workers.

`read_parquet` over a split's shards, a streaming repartition into blocks of one decode batch (so
every CPU decodes, not one task per shard), then `map_batches(decode_batch)`: decode PNG/JPEG,
resize the longest side to the model size and zero-pad (uint8; normalisation happens on the
device). With `decode_on="gpu"` the images stay encoded and `to_torch` decodes them on the
worker's device. Train workers consume it through `ray.train.get_dataset_shard(...)`.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from PIL import Image
from ray.data.collate_fn import NumpyBatchCollateFn

from infosam.transforms import model_frame, resize_longest_side
from orchestrator.data.codec import (
    SampleDecodeError,
    binarise_mask,
    open_encoded,
    open_header,
    open_rgb,
)
from orchestrator.data.manifest import INSTANCE_COLUMNS, load_manifest, shard_paths

__all__ = [
    "COLUMNS",
    "Collate",
    "SampleDecodeError",
    "collate",
    "columns",
    "decode_batch",
    "decode_images",
    "read_shards",
    "read_split",
    "to_torch",
]


COLUMNS = ["id", "dataset", "split", "image", "mask", "height", "width", "source"]


def columns(manifest: dict) -> list[str]:
    """The parquet columns a reader needs: instance datasets add their instance lists."""
    return [*COLUMNS, *INSTANCE_COLUMNS] if manifest.get("kind") == "instances" else COLUMNS


def _decode_mask(mask: bytes, shape: tuple[int, ...]) -> np.ndarray:
    m, _ = binarise_mask(np.asarray(open_encoded(mask, "stored mask")))
    if m.shape != shape[:2]:
        raise ValueError(f"mask {m.shape} and image {shape[:2]} sizes differ")
    return m


def _place_image(
    img: Image.Image, image_size: int, channel_order: str, out: np.ndarray, square: bool = False
) -> None:
    """Resize the longest side (bilinear, as `resize_longest_side`; with `square` to S x S, as
    SAM 2.1 takes images) and write the CHW pixels into `out`'s top-left corner (already zero:
    the padding). Resizing the PIL image itself and writing once saves three full-size copies
    per image against array -> resize -> pad -> transpose (the same bytes:
    `tests/data/test_reader.py`)."""
    h, w = model_frame(img.height, img.width, image_size, square)
    if (h, w) != (img.height, img.width):
        img = img.resize((w, h), resample=Image.BILINEAR)
    hwc = np.asarray(img)
    chw = hwc.transpose(2, 0, 1)
    out[:, :h, :w] = chw[::-1] if channel_order == "bgr" else chw


def decode_images(
    encoded: np.ndarray, image_size: int, channel_order: str = "rgb", square: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """Images alone -> (B,3,S,S) uint8 and input sizes: one per ROW (per image), what the
    teacher's embedding needs, also for instance datasets."""
    images = np.zeros((len(encoded), 3, image_size, image_size), np.uint8)
    sizes = np.zeros((len(encoded), 2), np.int64)
    for i, data in enumerate(encoded):
        img = open_rgb(data)
        _place_image(img, image_size, channel_order, images[i], square)
        sizes[i] = model_frame(img.height, img.width, image_size, square)
    return images, sizes


def _samples(batch: dict[str, np.ndarray], i: int) -> list[tuple[str, bytes, str | None]]:
    """(sample id, mask bytes, category) of row i: the row itself (no category), or one per
    instance of an image row."""
    masks = batch.get("instance_masks")
    if masks is None or masks[i] is None:
        return [(batch["id"][i], batch["mask"][i], None)]
    ids = batch["instance_ids"][i]
    cats = batch.get("instance_categories")
    cats = cats[i] if cats is not None and cats[i] is not None else [""] * len(ids)
    return [
        (f"{batch['id'][i]}#{k}", m, str(c)) for k, m, c in zip(ids, masks[i], cats, strict=True)
    ]


def decode_batch(
    batch: dict[str, np.ndarray],
    image_size: int,
    channel_order: str = "rgb",
    keep_original_mask: bool = False,
    embedding_shape: tuple[int, ...] | None = None,
    decode_on: str = "cpu",
    square: bool = False,
) -> dict[str, np.ndarray]:
    """A numpy batch of parquet rows -> image (B,3,S,S), mask (B,S,S), input/original sizes, id
    (`square`: resized to S x S for SAM 2.1, not longest side + padding).
    `decode_on="gpu"` ships `image_bytes` (sizes from the header, budget checked) and
    `channel_order` instead of `image` for `to_torch` to decode on the worker's device; masks
    are decoded here either way (cheap, and needed at original resolution).
    Rows of an instance dataset (one image, a list of instance masks) become one sample per
    instance, id `<image id>#<instance id>`, the image decoded and resized once; their batches
    carry each instance's `category`.
    `keep_original_mask` adds `mask_original`, (H, W) uint8 masks for evaluation. Teacher-cache
    rows also yield `teacher_embedding` (B, *embedding_shape), uint16 bit patterns of bf16.
    """
    n = len(batch["id"])
    per_row = [_samples(batch, i) for i in range(n)]
    total = sum(len(s) for s in per_row)
    on_device = decode_on == "gpu"
    if not on_device:
        images = np.zeros((total, 3, image_size, image_size), np.uint8)
    masks = np.zeros((total, image_size, image_size), np.uint8)
    input_size = np.zeros((total, 2), np.int64)
    original_size = np.zeros((total, 2), np.int64)
    originals = np.empty(total, dtype=object)
    ids = np.empty(total, dtype=object)
    image_ids = np.empty(total, dtype=object)
    categories = np.empty(total, dtype=object)
    rows = np.zeros(total, np.int64)
    j = 0
    for i in range(n):
        img, decoded = _decode_row(batch, i, per_row[i], on_device)
        first = j
        if not on_device:
            _place_image(img, image_size, channel_order, images[first], square)
        h, w = model_frame(img.height, img.width, image_size, square)
        for sid, m, category in decoded:
            if not on_device and j != first:  # another instance of the same image
                images[j] = images[first]
            masks[j, :h, :w] = resize_longest_side(m, image_size, is_mask=True, square=square)
            input_size[j] = (h, w)
            original_size[j] = m.shape
            originals[j], ids[j], image_ids[j], rows[j] = m, sid, batch["id"][i], i
            categories[j] = category
            j += 1
    out = {"id": ids, "image_id": image_ids}
    if on_device:  # the stored bytes, one per sample
        out["image_bytes"] = batch["image"][rows]
        out["channel_order"] = np.full(total, channel_order, dtype=object)
    else:
        out["image"] = images
    out.update(mask=masks, input_size=input_size, original_size=original_size)
    if keep_original_mask:
        out["mask_original"] = originals
    return _add_row_columns(out, batch, categories, rows, embedding_shape)


def _add_row_columns(
    out: dict[str, np.ndarray],
    batch: dict[str, np.ndarray],
    categories: np.ndarray,
    rows: np.ndarray,
    embedding_shape: tuple[int, ...] | None,
) -> dict[str, np.ndarray]:
    """The per-instance category and the cached teacher embedding (one per image, shared by
    its instances; indexed only then: 2 MiB a row to copy)."""
    if any(c is not None for c in categories):  # an instance dataset's batch
        out["category"] = np.array(["" if c is None else c for c in categories], dtype=object)
    if "teacher_embedding" in batch and embedding_shape is not None:
        emb = _teacher_embeddings(batch, embedding_shape)
        out["teacher_embedding"] = emb if len(rows) == len(batch["id"]) else emb[rows]
    return out


def _decode_row(
    batch: dict[str, np.ndarray], i: int, samples: list, header_only: bool = False
) -> tuple[Image.Image, list]:
    """Row i's image (RGB PIL; with `header_only` opened, not decoded) and each of its samples'
    masks, or an error naming the sample and fix."""
    try:
        data = batch["image"][i]
        img = open_header(data, "stored image") if header_only else open_rgb(data)
        shape = (img.height, img.width)
        return img, [(sid, _decode_mask(m, shape), c) for sid, m, c in samples]
    except Exception as exc:
        source = batch["source"][i] if "source" in batch else "?"
        raise SampleDecodeError(
            f"sample id={batch['id'][i]!r} (source {source}) cannot be decoded: "
            f"{type(exc).__name__}: {exc}. The shard changed after ingest: run "
            "`infosam data inspect --verify DIR` and re-run `infosam data ingest`."
        ) from None


def _teacher_embeddings(
    batch: dict[str, np.ndarray], embedding_shape: tuple[int, ...]
) -> np.ndarray:
    """(rows, *embedding_shape) uint16 bf16 bit patterns from the cache's bytes, sizes checked."""
    count = int(np.prod(embedding_shape))
    emb = np.empty((len(batch["id"]), *embedding_shape), np.uint16)
    for i, raw in enumerate(batch["teacher_embedding"]):
        if len(raw) != 2 * count:
            raise SampleDecodeError(
                f"sample id={batch['id'][i]!r}: cached teacher embedding has {len(raw)} bytes, "
                f"expected {2 * count} for shape {tuple(embedding_shape)}; rebuild the cache "
                "(`infosam data teacher-cache`)"
            )
        emb[i] = np.frombuffer(raw, np.uint16).reshape(embedding_shape)
    return emb


def to_torch(batch: dict[str, np.ndarray], device: Any = None) -> dict[str, Any]:
    """Numeric columns become tensors (on `device`); ids and original masks stay lists. A
    batch read with `decode_on="gpu"` gets its `image` decoded here, on `device`."""
    out: dict[str, Any] = {}
    if "image_bytes" in batch:
        from orchestrator.data.device_decode import decode_on_device

        out["image"] = decode_on_device(batch, batch["mask"].shape[-1], device)
        batch = {k: v for k, v in batch.items() if k not in ("image_bytes", "channel_order")}
    for key, value in batch.items():
        if key == "teacher_embedding" and value.dtype == np.uint16:  # bf16 bit patterns
            bits = (value if value.flags.writeable else value.copy()).view(np.int16)
            out[key] = torch.from_numpy(bits).view(torch.bfloat16).to(device)
        elif value.dtype == object or value.dtype.kind in "US":
            out[key] = list(value)
        else:
            out[key] = torch.as_tensor(
                value if value.flags.writeable else value.copy(), device=device
            )
    return out


class Collate(NumpyBatchCollateFn):
    """`collate_fn` for `iter_torch_batches` (string ids cannot become tensors)."""

    def __init__(self, device: Any = None) -> None:
        self.device = device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        return to_torch(batch, self.device)


collate = Collate()


def read_shards(paths: list[str], columns: list[str]) -> Any:
    """`ray.data.read_parquet` of a split's shards through Ray Data's V1 parquet reader.

    Ray 2.60's default (V2) reader lists the files by starting 32 footer-reading actors on
    every execution: a split of 8 images took 0.86-1.72 s to read and decode that way against
    0.13-0.18 s with V1 (2-vCPU Xeon, after a warm-up), a cost every run pays per split and
    every epoch of a streamed training split pays again. Our shards are listed in the manifest
    (no discovery to do), so the V1 reader loses nothing. Only this call is switched: the
    DataContext is restored at once.
    """
    import ray.data

    ctx = ray.data.DataContext.get_current()
    v2, ctx.use_datasource_v2 = ctx.use_datasource_v2, False
    try:
        return ray.data.read_parquet(paths, columns=columns)
    finally:
        ctx.use_datasource_v2 = v2


def read_split(
    dataset_dir: str | os.PathLike,
    split: str,
    *,
    image_size: int,
    channel_order: str = "rgb",
    keep_original_mask: bool = False,
    batch_size: int = 32,
    num_cpus: float = 1.0,
    concurrency: int | None = None,
    verify: bool = False,
    teacher_cache: dict | None = None,
    decode_on: str = "cpu",
    square: bool = False,
) -> Any:
    """A lazy `ray.data.Dataset` of decoded, padded (`square`: S x S) samples of one split.

    `decode_on="gpu"` ships the stored image bytes instead of decoded pixels (see
    `decode_batch`); `to_torch` decodes them on the consumer's device.
    With `teacher_cache` (from `orchestrator.data.teacher_cache.open_teacher_cache`) the split is read
    from the cache's shards and batches carry the cached `teacher_embedding`. On instance
    datasets `batch_size` counts output samples (images are read in proportionally fewer
    rows), so a decoded block stays the same size however many objects an image holds.
    """
    manifest = load_manifest(dataset_dir, verify=verify and teacher_cache is None)
    if teacher_cache is not None:
        ds = read_shards(teacher_cache["files"], [*columns(manifest), "teacher_embedding"])
        shape = tuple(teacher_cache["embedding_shape"])
    else:
        ds = read_shards(shard_paths(dataset_dir, split, manifest), columns(manifest))
        shape = None
    if manifest.get("kind") == "instances":  # a row is an image that becomes its instances
        per_image = manifest["counts"].get(split, 0) / max(manifest["images"].get(split, 0), 1)
        batch_size = max(1, round(batch_size / max(per_image, 1.0)))  # ~batch_size samples out
    # A shard is read as one block (a 256-image shard of 1280 px JPEGs is 43 MB); decoding it
    # would then be ONE task working through the whole shard while the other CPUs idle (1 of
    # 2 CPUs busy: half the rate). Cutting the encoded rows into blocks of one decode batch
    # first (cheap: bytes, no pixels) lets every CPU decode (docs/speed.md, "Is the GPU fed?").
    ds = ds.repartition(target_num_rows_per_block=batch_size, strict=True)
    return ds.map_batches(
        decode_batch,
        fn_kwargs={
            "image_size": image_size,
            "channel_order": channel_order,
            "keep_original_mask": keep_original_mask,
            "embedding_shape": shape,
            "decode_on": decode_on,
            "square": square,
        },
        batch_format="numpy",
        batch_size=batch_size,
        num_cpus=num_cpus,
        concurrency=concurrency,
    )
