"""What a run was trained and scored on, as MLflow dataset inputs (the runs table's Dataset
column, the run page's Datasets used): one per split, named `<dataset>/<split>`, its digest
taken from the manifest's shard checksums, its source the dataset folder (local or s3://), and
its profile the counts (samples, images, and the unit its metrics average over)."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from mlflow import MlflowClient
from mlflow.data.dataset_source_registry import resolve_dataset_source
from mlflow.data.meta_dataset import MetaDataset
from mlflow.entities import DatasetInput, InputTag

__all__ = ["log_split_inputs", "split_digest"]

CONTEXT_TAG = "mlflow.data.context"  # MLflow's own key: the UI shows it beside the dataset


class _SplitDataset(MetaDataset):
    """A manifest split: metadata only (the shards stay where they are), with its counts."""

    def __init__(self, source: Any, name: str, digest: str, profile: dict[str, Any]) -> None:
        self._profile = profile
        super().__init__(source, name=name, digest=digest)

    @property
    def profile(self) -> dict[str, Any]:
        return self._profile

    def to_dict(self) -> dict[str, str]:
        return {**super().to_dict(), "profile": json.dumps(self._profile)}


def split_digest(manifest: dict[str, Any], split: str) -> str:
    """16 hex characters of sha256 over the split's shard checksums: the same rows, the same
    digest, wherever the folder lives."""
    sums = sorted(s.get("sha256", s["path"]) for s in manifest["shards"] if s["split"] == split)
    return hashlib.sha256(json.dumps([manifest.get("dataset"), split, sums]).encode()).hexdigest()[
        :16
    ]


def log_split_inputs(
    uri: str, run_id: str, data_dir: str, manifest: dict[str, Any], splits: dict[str, str]
) -> None:
    """Log `splits` ({"train": "train", "val": "val", "test": "test_Kvasir"}: role -> manifest
    split) as the run's dataset inputs, the role as MLflow's context tag."""
    source = resolve_dataset_source(str(data_dir))
    instances = manifest.get("kind") == "instances"
    inputs = []
    for role, split in splits.items():
        profile = {
            "unit": "instance" if instances else "image",
            "samples": int(manifest["counts"].get(split, 0)),
            "source_format": manifest.get("format"),
        }
        if instances:
            profile["images"] = int(manifest.get("images", {}).get(split, 0))
        dataset = _SplitDataset(
            source,
            name=f"{manifest.get('dataset', 'data')}/{split}",
            digest=split_digest(manifest, split),
            profile=profile,
        )
        inputs.append(DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag(CONTEXT_TAG, role)]))
    MlflowClient(uri).log_inputs(run_id, datasets=inputs)
