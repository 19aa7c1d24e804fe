"""COCO instance datasets (polygons, RLE): one sample per annotated object.

SAM is prompted per object, so an instance dataset trains and evaluates per instance: each
annotation (COCO) or non-zero label (label image) becomes one sample whose prompts come from its
own mask. The image's bytes are stored once per image: a parquet row is an image with parallel
lists of its instances (`manifest.INSTANCE_SCHEMA`), exploded into samples when read.

Nothing is lost silently: every annotation or label becomes an instance, or appears in the
manifest's `rejected` list with its reason (unknown image id, missing or unreadable image,
degenerate polygon, RLE or label image of another size than its image, duplicate annotation id,
empty label image), or, for COCO crowd regions, in `skipped`.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from orchestrator.data.codec import (
    IngestError,
    Rejected,
    decode_image,
    ordered_map,
    printable,
)
from orchestrator.data.formats.folders import assign_holdout
from orchestrator.data.writer import (
    DEFAULT_MIN_AREA,
    DEFAULT_SHARD_BYTES,
    DatasetWriter,
    _instance,
    inside,
)


def coco_mask(segmentation: object, height: int, width: int) -> np.ndarray:
    """A COCO `segmentation` (polygons, compressed or uncompressed RLE) -> (H, W) uint8 0/1,
    decoded by pycocotools; raises Rejected with the reason when it cannot be an object mask."""
    from pycocotools import mask as mask_utils

    if isinstance(segmentation, list):
        if not segmentation:
            raise Rejected("degenerate polygon: the segmentation list is empty")
        for k, poly in enumerate(segmentation):
            ok = isinstance(poly, list) and all(
                isinstance(v, int | float) and math.isfinite(v) for v in poly
            )
            if not ok or len(poly) < 6 or len(poly) % 2:
                n = len(poly) if isinstance(poly, list) else type(poly).__name__
                raise Rejected(
                    f"degenerate polygon: part {k} has {n} coordinates; a polygon needs at least "
                    "3 finite x,y points (an even count of 6 or more numbers)"
                )
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
        mask = mask_utils.decode(rle)
        if not mask.any():
            raise Rejected(
                "degenerate polygon: it encloses no pixel (zero area, or outside the image)"
            )
        return np.ascontiguousarray(mask, dtype=np.uint8)  # pycocotools decodes column-major
    if isinstance(segmentation, dict) and {"size", "counts"} <= set(segmentation):
        size = segmentation["size"]
        size = list(size) if isinstance(size, list | tuple) else [size]
        if size != [height, width]:
            shown = f"{size[1]}x{size[0]}" if len(size) == 2 else str(size)
            raise Rejected(
                f"RLE size {shown} differs from image size {width}x{height} (COCO sizes are "
                "[height, width])"
            )
        counts = segmentation["counts"]
        try:
            check_rle_counts(counts, height, width)  # pycocotools writes past its buffer else
            if isinstance(counts, list):  # uncompressed RLE
                rle = mask_utils.frPyObjects(segmentation, height, width)
            else:
                rle = {
                    "size": size,
                    "counts": counts.encode() if isinstance(counts, str) else counts,
                }
            mask = mask_utils.decode(rle)
        except Exception as exc:
            raise Rejected(f"RLE cannot be decoded ({type(exc).__name__}: {exc})") from None
        if mask.shape != (height, width):
            raise Rejected(f"RLE decodes to {mask.shape}, not ({height}, {width})")
        if not mask.any():
            raise Rejected("empty RLE: the mask has no foreground pixel, no object to prompt")
        return np.ascontiguousarray(mask, dtype=np.uint8)  # pycocotools decodes column-major
    raise Rejected(
        "segmentation is neither a list of polygons nor an RLE dict with 'size' and 'counts'"
    )


def _compressed_counts(text: bytes) -> list[int]:
    """The run lengths of a compressed COCO RLE string, decoded as pycocotools' `rleFrString`
    does (6-bit groups from '0', differential after the second run), so they can be checked
    before its C code trusts them."""
    counts: list[int] = []
    p, n = 0, len(text)
    while p < n:
        x, k, more = 0, 0, True
        while more:
            if p >= n or k > 12:
                raise ValueError("its counts string is truncated or has an over-long run")
            c = text[p] - 48
            if not 0 <= c < 64:
                raise ValueError(f"its counts string has a character outside '0'..'o' at {p}")
            x |= (c & 0x1F) << (5 * k)
            more = bool(c & 0x20)
            p, k = p + 1, k + 1
            if not more and c & 0x10:
                x |= -1 << (5 * k)
        if len(counts) > 2:
            x += counts[-2]
        counts.append(x)
    return counts


def check_rle_counts(counts: object, height: int, width: int) -> None:
    """An RLE's run lengths must be non-negative integers summing to height x width."""
    if isinstance(counts, list):
        if not all(isinstance(c, int) and not isinstance(c, bool) for c in counts):
            raise ValueError("its counts list holds values that are not integers")
        runs = counts
    elif isinstance(counts, str | bytes):
        raw = counts.encode("ascii", "replace") if isinstance(counts, str) else counts
        runs = _compressed_counts(raw)
    else:
        raise ValueError(f"its counts are a {type(counts).__name__}, not a string or a list")
    if any(c < 0 for c in runs):
        raise ValueError("its counts hold a negative run length")
    if sum(runs) != height * width:
        raise ValueError(f"its counts sum to {sum(runs)}, not {height * width}")


def decode_coco_image(item: tuple) -> tuple:
    """One COCO image and its annotations -> ("ok", height, width, image bytes, flags,
    size-mismatch reason or None, {row: instance dict or reject reason}) or ("rejected", reason).
    Runs in an ingest thread (`ordered_map`); categories are checked by the caller."""
    path, (said_h, said_w), anns, min_area = item
    try:
        if not path.is_file():
            raise Rejected(f"image file not found: {printable(path)}")
        try:
            img, stored, flags = decode_image(path.read_bytes())
        except Rejected as exc:
            raise Rejected(f"{exc} [{printable(path)}]") from None
    except Rejected as exc:
        return ("rejected", str(exc))
    h, w = img.shape[:2]
    if (said_h, said_w) != (None, None) and (said_h, said_w) != (h, w):
        reason = (
            f"image file {printable(path)} is {w}x{h} but the COCO file says "
            f"{said_w}x{said_h}: the annotations were made for another version of it"
        )
        return ("ok", h, w, stored, flags, reason, {})
    decoded: dict[int, dict | str] = {}
    for row, ann in anns:
        try:
            decoded[row] = _instance(ann["id"], coco_mask(ann.get("segmentation"), h, w), min_area)
        except Rejected as exc:
            decoded[row] = str(exc)
    return ("ok", h, w, stored, flags, None, decoded)


def _load_coco(path: Path, images_root: Path) -> dict:
    """A COCO file's JSON, checked to be an instances file whose images folder exists."""
    if not path.is_file():
        raise IngestError(f"COCO annotation file not found: {printable(path)}")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as exc:
        raise IngestError(f"{printable(path)} is not JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise IngestError(
            f"{printable(path)} has no 'images' list: not a COCO instances file "
            "(expected keys images, annotations, categories)"
        )
    if not isinstance(data.get("annotations"), list):
        raise IngestError(f"{printable(path)} has no 'annotations' list: not a COCO instances file")
    if not images_root.is_dir():
        raise IngestError(
            f"images folder not found: {printable(images_root)} (the folder that the file_name "
            f"entries of {printable(path)} are relative to)"
        )
    return data


def ingest_coco(
    src: str | os.PathLike,
    out: str | os.PathLike,
    name: str | None = None,
    *,
    images_dir: str | os.PathLike,
    split: str | None = None,
    more: Sequence[tuple[str, str | os.PathLike, str | os.PathLike]] = (),
    holdout: dict[str, float] | None = None,
    min_area: int = DEFAULT_MIN_AREA,
    shard_bytes: int = DEFAULT_SHARD_BYTES,
    workers: int | None = None,
    categories: Sequence[str] | None = None,
) -> dict:
    """A COCO instances file (`src`) with its images (`images_dir`, `file_name` relative to it)
    -> one sample per annotation, one parquet row per image, in split `split` (default train).
    `more`: (split, file, images_dir) of the other splits' files (COCO ships one per split).
    `iscrowd` regions are skipped and listed; `holdout` ({"val": 0.1, "test": 50}) moves whole
    images of a single file to held-out splits. `workers`: decoding threads (`ordered_map`);
    the output is the same bytes for any number. `categories`: the category names to keep
    (others are skipped and listed, as crowd regions are); default all."""
    sources = [(split or "train", Path(src), Path(images_dir))]
    sources += [(s, Path(a), Path(i)) for s, a, i in more]
    names = [s for s, _, _ in sources]
    if len(set(names)) != len(names):
        raise IngestError(f"each COCO file needs its own split, got splits {names}")
    if holdout and len(sources) > 1:
        raise IngestError("--holdout splits one COCO file; with one file per split, drop it")
    loaded = [(s, path, root, _load_coco(path, root)) for s, path, root in sources]
    selected = _check_selection(categories, loaded)
    writer = DatasetWriter(
        out,
        Path(src).stem if name is None else name,
        shard_bytes=shard_bytes,
        source=printable(Path(src).resolve()),
        fmt="coco",
        extra={
            "sources": [
                {
                    "split": s,
                    "annotations": printable(p.resolve()),
                    "images_dir": printable(r.resolve()),
                }
                for s, p, r, _ in loaded
            ],
            "min_instance_area": min_area,
            **({"selected_categories": sorted(selected)} if selected else {}),
        },
        instances=True,
        sources=[p for _, a, r, _ in loaded for p in (a, r)],
    )
    with writer:
        return _fill_coco(writer, loaded, holdout, min_area, workers, selected)


def _fill_coco(
    writer: DatasetWriter,
    loaded: list[tuple],
    holdout: dict[str, float] | None,
    min_area: int,
    workers: int | None,
    selected: frozenset[str] | None,
) -> dict:
    """Every COCO file's images and annotations into `writer`, then the manifest."""
    used: Counter[str] = Counter()
    skipped: list[dict] = []
    unannotated = 0
    for split_name, path, root, data in loaded:
        first = len(writer.rejected)
        unannotated += _ingest_coco_file(
            writer,
            data,
            path.name,
            root,
            split_name,
            holdout,
            min_area,
            used,
            skipped,
            workers,
            selected,
        )
        # in file order: image entries, then annotations by their row
        writer.rejected[first:] = sorted(
            writer.rejected[first:], key=lambda r: (" annotation" in r["source"], r.get("row", 0))
        )
    writer.meta.update(
        {
            "categories": dict(sorted(used.items())),
            "unannotated_images": unannotated,
            "skipped": skipped,
        }
    )
    if holdout:
        writer.meta["holdout"] = holdout
    return writer.close()


def _is_id(value: object) -> bool:
    return isinstance(value, int | str) and not isinstance(value, bool)


def _entry_problem(entry: object, images_root: Path) -> str | None:
    """Why an `images` entry cannot be used (wrong types, a file_name leading out of the
    images folder), or None."""
    if not isinstance(entry, dict) or "id" not in entry or not entry.get("file_name"):
        return "image entry without id or file_name"
    if not _is_id(entry["id"]):
        return f"image id {entry['id']!r:.60} is not an integer or a string"
    for key in ("height", "width"):
        value = entry.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
            return f"image {key} {value!r:.60} is not an integer"
    try:
        inside(images_root, entry["file_name"], "file_name")
    except Rejected as exc:
        return str(exc)
    return None


def _file_categories(data: dict) -> dict[object, str]:
    listed = data.get("categories")
    return {
        c.get("id"): str(c.get("name", c.get("id")))
        for c in (listed if isinstance(listed, list) else [])
        if isinstance(c, dict) and _is_id(c.get("id"))
    }


def _category_name(categories: dict[object, str], ann: dict) -> str | None:
    """An annotation's category name; None for an id its file's categories list lacks (that
    annotation is rejected). Files without a categories list (some exporters) keep the raw id
    as the name."""
    cat = ann.get("category_id")
    if cat is not None and not _is_id(cat):
        return None  # rejected as an unknown category
    if categories:
        return categories.get(cat)
    return "object" if cat is None else str(cat)


def _check_selection(wanted: Sequence[str] | None, loaded: list[tuple]) -> frozenset[str] | None:
    """`--category` names, each checked against the files' categories (a typo would otherwise
    ingest nothing and say so only in the counts)."""
    if not wanted:
        return None
    known: set[str] = set()
    for *_, data in loaded:
        names = set(_file_categories(data).values())
        if not names:  # no categories list: the names are the raw ids
            names = {_category_name({}, a) for a in data["annotations"] if isinstance(a, dict)}
        known |= {n for n in names if n is not None}
    missing = sorted(set(wanted) - known)
    if missing:
        shown = ", ".join(sorted(known)[:30]) + (" ..." if len(known) > 30 else "")
        files = ", ".join(printable(p) for _, p, _, _ in loaded)
        raise IngestError(
            f"--category {', '.join(repr(m) for m in missing)}: not a category of {files} "
            f"(its categories: {shown}); names are matched exactly, case included"
        )
    return frozenset(wanted)


def _ingest_coco_file(
    writer: DatasetWriter,
    data: dict,
    where: str,
    images_root: Path,
    split: str,
    holdout: dict[str, float] | None,
    min_area: int,
    used: Counter[str],
    skipped: list[dict],
    workers: int | None,
    selected: frozenset[str] | None = None,
) -> int:
    """One COCO file's images and annotations into `writer`; returns its unannotated images.

    The phases: index the image entries, group the annotations by image (rejecting or
    skipping each bad one), decode the annotated images in parallel, write each image's kept
    instances."""
    f = _CocoFile(writer, where, images_root, split, _file_categories(data), used, skipped)
    images = f.index_images(data["images"])
    per_image = f.group_annotations(data["annotations"], images, selected)
    image_ids = {i: str(Path(images[i]["file_name"]).with_suffix("")) for i in per_image}
    moved = assign_holdout(sorted(image_ids.values()), holdout) if holdout else {}
    todo = [coco_id for coco_id in images if per_image.get(coco_id)]
    items = [  # annotations of unknown categories are not decoded, only rejected when written
        (
            images_root / images[i]["file_name"],
            (images[i].get("height"), images[i].get("width")),
            [(r, a) for r, a in per_image[i] if _category_name(f.categories, a) is not None],
            min_area,
        )
        for i in todo
    ]
    results = ordered_map(decode_coco_image, items, workers)
    for coco_id, item, result in zip(todo, items, results, strict=True):
        image_id = image_ids[coco_id]
        f.write_image(image_id, moved.get(image_id, split), item[0], per_image[coco_id], result)
    return len(images) - len(per_image)


@dataclass
class _CocoFile:
    """One COCO file on its way into a writer: where its rows come from, what it counted."""

    writer: DatasetWriter
    where: str  # the file's name, in every rejection's source
    images_root: Path
    split: str
    categories: dict[object, str]
    used: Counter[str]  # instances kept per category
    skipped: list[dict]  # crowd regions and unselected categories

    def index_images(self, entries: list) -> dict[object, dict]:
        """id -> entry for every valid image entry; bad and duplicate entries rejected."""
        images: dict[object, dict] = {}
        for k, entry in enumerate(entries):
            reason = _entry_problem(entry, self.images_root)
            if reason:
                self.writer.reject(f"{self.where} images[{k}]", reason, self.split, k)
            elif entry["id"] in images:
                self.writer.reject(
                    f"{self.where} images[{k}] ({entry['file_name']})",
                    f"duplicate image id {entry['id']!r}: its annotations go to the first entry",
                    self.split,
                    k,
                )
            else:
                images[entry["id"]] = entry
        return images

    def group_annotations(
        self, annotations: list, images: dict[object, dict], selected: frozenset[str] | None
    ) -> dict[object, list[tuple[int, dict]]]:
        """image id -> [(row, annotation)] of the annotations to decode; each other one is
        rejected (no ids, duplicate, unknown image) or skipped (crowd, unselected category)."""
        per_image: dict[object, list[tuple[int, dict]]] = {}
        first_seen: dict[object, int] = {}
        for row, ann in enumerate(annotations):
            ann_id = ann.get("id") if isinstance(ann, dict) else None
            source = f"{self.where} annotation id={ann_id}"
            if not _is_id(ann_id) or not _is_id(ann.get("image_id")):
                reason = "annotation without an integer or string id and image_id"
                self.writer.reject(f"{self.where} annotations[{row}]", reason, self.split, row)
            elif ann_id in first_seen:
                reason = f"duplicate annotation id {ann_id!r} (first at annotations[{first_seen[ann_id]}])"
                self.writer.reject(source, reason, self.split, row)
            elif ann.get("image_id") not in images:
                first_seen[ann_id] = row
                reason = (
                    f"unknown image id {ann.get('image_id')!r}: no entry in the file's images list"
                )
                self.writer.reject(source, reason, self.split, row)
            elif ann.get("iscrowd"):
                first_seen[ann_id] = row
                self.skipped.append(
                    {"source": source, "row": row, "reason": "iscrowd: a crowd region"}
                )
            elif selected and (name := _category_name(self.categories, ann)) not in selected | {
                None
            }:
                first_seen[ann_id] = row
                reason = f"category {name!r} not selected (--category)"
                self.skipped.append({"source": source, "row": row, "reason": reason})
            else:
                first_seen[ann_id] = row
                per_image.setdefault(ann["image_id"], []).append((row, ann))
        return per_image

    def write_image(
        self, image_id: str, target: str, path: Path, anns: list[tuple[int, dict]], result: tuple
    ) -> None:
        """One decoded image and its kept instances, or every annotation of it rejected."""
        if result[0] == "rejected":
            return self._reject_all(anns, result[1], target)
        _, h, w, stored, flags, size_reason, decoded = result
        conflict = self.writer.conflict(image_id)
        if conflict or size_reason:
            reason = f"{conflict} [{printable(path)}]" if conflict else size_reason
            return self._reject_all(anns, reason, target)
        kept = []
        for row, ann in anns:  # in row order: unknown categories among the decoded
            cat = ann.get("category_id")
            outcome = decoded.get(row) or (
                f"unknown category id {cat!r}: not in the file's categories list"
            )
            if isinstance(outcome, str):
                self.writer.reject(f"{self.where} annotation id={ann['id']}", outcome, target, row)
                continue
            category = _category_name(self.categories, ann)
            self.used[category] += 1
            kept.append({**outcome, "category": category})
        if kept:
            self.writer.add_image(target, image_id, stored, h, w, printable(path), flags, kept)
        return None

    def _reject_all(self, anns: list[tuple[int, dict]], reason: str, target: str) -> None:
        for row, ann in anns:
            self.writer.reject(f"{self.where} annotation id={ann['id']}", reason, target, row)
