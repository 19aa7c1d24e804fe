"""The Conv-LoRA benchmark layout: per-split CSVs of image/mask paths (polyp, camo, isic2017,
leaf, road zips unzipped as they come)."""

from __future__ import annotations

import os
from pathlib import Path

from PIL import (  # the decoders PIL_FORMATS names, registered before the first open
    BmpImagePlugin,  # noqa: F401
    JpegImagePlugin,  # noqa: F401
    MpoImagePlugin,  # noqa: F401  (JPEG's factory opens multi-picture files with it)
    PngImagePlugin,  # noqa: F401
    WebPImagePlugin,  # noqa: F401
)

from orchestrator.data.codec import IngestError, Rejected, printable
from orchestrator.data.writer import DEFAULT_SHARD_BYTES, DatasetWriter, _write_pairs, inside


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
