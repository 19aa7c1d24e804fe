"""Instance label images (one integer per object): one sample per non-zero label, the image
stored once per row (`manifest.INSTANCE_SCHEMA`)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from orchestrator.data.codec import (
    Rejected,
    grey_channel,
    is_tiff,
    open_encoded,
    ordered_map,
    printable,
    read_tiff,
)
from orchestrator.data.formats.folders import LABEL_PRESETS, open_folder_source
from orchestrator.data.writer import (
    DEFAULT_MIN_AREA,
    DEFAULT_SHARD_BYTES,
    _instance,
    decode_with_image,
)


def decode_labels(data: bytes) -> np.ndarray:
    """An instance label image (8/16-bit PNG, TIFF, palette PNG) -> (H, W) int64 label ids."""
    # counted at the working dtype (int64 ids: 8 bytes a pixel), not the stored one
    if is_tiff(data):
        arr = read_tiff(data, "label image", working_itemsize=8)
    else:
        img = open_encoded(data, "label image", working_itemsize=8)
        # palette PNGs store label ids as indices; "L", "I;16", "I" store them as values
        arr = np.asarray(img)
    if arr.ndim == 3:
        arr = grey_channel(
            arr,
            "label image is a colour image whose channels differ; save the instance ids as "
            "a single-channel 8/16-bit PNG or TIFF (0 = background, one integer per object)",
        )
    if arr.dtype.kind == "f" and not (np.isfinite(arr).all() and (arr == np.round(arr)).all()):
        raise Rejected("label image has non-integer values: expected integer instance ids")
    if arr.dtype.kind in "if" and arr.min() < 0:
        raise Rejected("label image has negative values: expected 0 (background) and ids > 0")
    return arr.astype(np.int64)


def _label_masks(labels: np.ndarray) -> Iterator[tuple[int, np.ndarray]]:
    """(label id, 0/1 mask) per non-zero label; each mask built inside its label's bounding box
    (thousands of nuclei in a large tile stay linear in the pixels)."""
    from scipy import ndimage

    top = int(labels.max())
    if top < 1 << 20:  # 8/16-bit ids: a histogram, linear in the pixels (unique sorts them)
        values = np.flatnonzero(np.bincount(labels.ravel(), minlength=1))
        lookup = np.zeros(top + 1, np.int64)
        lookup[values] = np.arange(values.size)
        inverse = lookup[labels]
    else:
        values, inverse = np.unique(labels, return_inverse=True)
        inverse = inverse.reshape(labels.shape)
    if values[0] != 0:  # no background pixel: keep index 0 for background all the same
        values, inverse = np.concatenate([[0], values]), inverse + 1
    for k, box in enumerate(ndimage.find_objects(inverse), start=1):  # box of index k
        if box is None:
            continue
        mask = np.zeros(labels.shape, np.uint8)
        mask[box] = inverse[box] == k
        yield int(values[k]), mask


def decode_label_pair(item: tuple[Path, Path, int]) -> tuple:
    """(image, label image, min area) -> ("ok", image bytes, height, width, flags, instances)
    or ("rejected", reason). Runs in an ingest thread (`ordered_map`)."""
    image_path, label_path, min_area = item
    try:
        img, stored, flags, labels, _ = decode_with_image(
            image_path, label_path, lambda data: (decode_labels(data), []), "label image"
        )
        if not labels.any():
            raise Rejected(
                f"empty label image: every pixel is 0 (background), no instance "
                f"[{printable(label_path)}]"
            )
    except Rejected as exc:
        return ("rejected", str(exc))
    kept = [{**_instance(v, m, min_area), "category": "object"} for v, m in _label_masks(labels)]
    return ("ok", stored, img.shape[0], img.shape[1], flags, kept)


def ingest_labels(
    src: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    *,
    holdout: dict[str, float] | None = None,
    min_area: int = DEFAULT_MIN_AREA,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    workers: int | None = None,
    **layout_options: str | None,
) -> dict:
    """Folders of images + instance label images (each object a distinct integer, 0 background;
    ids need not be contiguous) -> one sample per non-zero label. Layout: `SRC/images` +
    `SRC/labels` (or `masks`), per-split sub-folders, a preset (`LABEL_PRESETS`) or explicit
    folders and a mask-name pattern (`split`, `preset`, `images`, `masks`, `mask_name`,
    `image_glob`), as for `--format folders`. `workers`: decoding threads (`ordered_map`)."""
    writer, pairs = open_folder_source(
        src,
        out,
        name,
        fmt="labels",
        holdout=holdout,
        shard_bytes=shard_bytes,
        extra={"min_instance_area": min_area},
        instances=True,
        presets=LABEL_PRESETS,
        default_masks=("labels", "masks"),
        **layout_options,
    )
    with writer:
        results = ordered_map(decode_label_pair, [(p[2], p[3], min_area) for p in pairs], workers)
        for (target, stem, image_path, _), result in zip(pairs, results, strict=True):
            source = printable(image_path)
            if result[0] == "rejected":
                writer.reject(source, result[1], target)
                continue
            _, stored, h, w, flags, kept = result
            writer.add_image(target, stem, stored, h, w, source, flags, kept)
        return writer.close()
