"""The ingest formats `infosam data ingest --format` takes, one function per source layout.

One module per layout: binary masks from Conv-LoRA CSVs (`convlora`) or folders (`folders`);
instances from COCO JSON (`coco`) or label images (`labels`). To add a format, write a module
with a function `ingest_x(src, out, name=None, **options) -> manifest` that writes through
`orchestrator.data.writer.DatasetWriter`, and add one entry to `FORMATS`; the CLI's `--format`
choices are tested to equal it.
"""

from __future__ import annotations

import os
from collections.abc import Callable

from orchestrator.data.codec import IngestError
from orchestrator.data.formats.coco import ingest_coco
from orchestrator.data.formats.convlora import ingest_convlora
from orchestrator.data.formats.folders import ingest_folders
from orchestrator.data.formats.labels import ingest_labels

__all__ = ["FORMATS", "ingest"]


FORMATS: dict[str, Callable[..., dict]] = {
    "convlora": ingest_convlora,
    "folders": ingest_folders,
    "coco": ingest_coco,
    "labels": ingest_labels,
}


def ingest(fmt: str, src: str | os.PathLike, out: str | os.PathLike, **kwargs: object) -> dict:
    """Ingest `src` in format `fmt` into `out`; returns the manifest."""
    if fmt not in FORMATS:
        raise IngestError(f"unknown format {fmt!r}: use {', '.join(FORMATS)}")
    return FORMATS[fmt](src, out, **kwargs)
