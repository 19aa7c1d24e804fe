"""The ingest formats `infosam data ingest --format` takes, one function per source layout.

A registry in its own module, above both `datasets` (binary masks: Conv-LoRA CSVs, folders) and
`instances` (COCO, label images), so neither imports the other. A new format is a function
`ingest_x(src, out, name=None, **options) -> manifest` that writes through `DatasetWriter`, and
one entry here.
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
