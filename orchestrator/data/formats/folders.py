"""Image and mask folders matched by stem, per split or with a hold-out, and the presets for
the public benchmarks' raw layouts (`--preset kvasir|isic2017|camo|cod10k`)."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from PIL import (  # the decoders PIL_FORMATS names, registered before the first open
    BmpImagePlugin,  # noqa: F401
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401  (JPEG's factory opens multi-picture files with it)
    PngImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from orchestrator.data.codec import IMAGE_EXTENSIONS, IngestError, printable
from orchestrator.data.writer import DEFAULT_SHARD_BYTES, DatasetWriter, _write_pairs


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
