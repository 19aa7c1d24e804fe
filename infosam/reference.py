"""Import the InfoSAM reference release (github MuyaoYuan/InfoSAM) and export self-contained students.

Key mapping from the reference adapter student (a state_dict, possibly under `'model'`) to ours:

| reference key                                         | ours                                  |
|-------------------------------------------------------|---------------------------------------|
| `module.<key>` (saved from a DDP-wrapped model)       | `<key>`                               |
| `image_encoder.blocks.N.Space_Adapter_Series.D_fc{1,2}.*` | same: `SeriesAdapterBlock` keeps the names |
| `image_encoder.blocks.N.MLP_Adapter_Series.D_fc{1,2}.*`   | same                              |
| every other key                                       | the standard segment-anything SAM key |

The adapter blocks and ratio are read from the keys and shapes (hidden = D_fc1 rows). Any key that
is neither SAM's nor a series adapter's (parallel adapters, prompt adapters, ...) fails loudly.
Relation modules are `{'relation_model': state_dict}` with `RelationModule`'s own attribute names.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

import torch
from segment_anything.modeling import Sam

from infosam.relation import RelationModule
from infosam.sam import (  # the exports live with SAM's other loaders; re-exported here
    EXPORT_FORMAT,
    CheckpointMismatchError,
    build_sam,
    load_exported,
    load_sam_state_dict,
    save_exported,
)
from infosam.tuning import TuningConfig, apply_tuning

__all__ = [
    "EXPORT_FORMAT",
    "load_exported",
    "load_reference_relation",
    "load_reference_student",
    "map_reference_keys",
    "save_exported",
]

_ADAPTER = re.compile(
    r"^image_encoder\.blocks\.(\d+)\.(Space|MLP)_Adapter_Series\.D_fc[12]\.(weight|bias)$"
)


def _load(path: str | os.PathLike) -> dict:
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping):
        raise CheckpointMismatchError(f"{path}: expected a dict, got {type(obj).__name__}")
    return dict(obj)


def map_reference_keys(
    state: Mapping[str, torch.Tensor], sam_keys: set[str]
) -> tuple[dict[str, torch.Tensor], TuningConfig]:
    """Reference adapter-student keys -> our keys, plus the adapter layout they describe."""
    mapped = {k.removeprefix("module."): v for k, v in state.items()}
    blocks: dict[int, int] = {}
    unknown = []
    for key, value in mapped.items():
        match = _ADAPTER.match(key)
        if match:
            if key.endswith("D_fc1.weight"):
                blocks[int(match.group(1))] = value.shape[0]
        elif key not in sam_keys:
            unknown.append(key)
    if unknown:
        raise CheckpointMismatchError(
            f"{len(unknown)} key(s) are neither segment-anything SAM keys nor series adapters: "
            f"{sorted(unknown)[:12]}. Only the reference's series adapters (Space_Adapter_Series, "
            "MLP_Adapter_Series) are mapped; other adapter kinds are not supported."
        )
    if not blocks:
        return mapped, TuningConfig(method="full")
    hidden = set(blocks.values())
    dim = next(
        v for k, v in mapped.items() if k.endswith("Space_Adapter_Series.D_fc1.weight")
    ).shape[1]
    if len(hidden) != 1:
        raise CheckpointMismatchError(
            f"adapters of different sizes {sorted(hidden)} are not supported"
        )
    return mapped, TuningConfig(
        method="adapter", adapter_blocks=sorted(blocks), adapter_ratio=hidden.pop() / dim
    )


def load_reference_student(
    path: str | os.PathLike, variant: str = "vit_b"
) -> tuple[Sam, TuningConfig]:
    """An adapter student from the reference release (bare state_dict or `{'model': ...}`)."""
    obj = _load(path)
    state = obj.get("model", obj)
    if not isinstance(state, Mapping):
        raise CheckpointMismatchError(f"{path}: no state_dict found (keys {list(obj)[:5]})")
    sam = build_sam(variant)
    mapped, tuning = map_reference_keys(state, set(sam.state_dict()))
    if tuning.method == "adapter":
        apply_tuning(sam, tuning)
    load_sam_state_dict(sam, mapped)
    sam.eval()
    return sam, tuning


def load_reference_relation(path: str | os.PathLike) -> RelationModule:
    """A relation module saved by the reference as `{'relation_model': state_dict, ...}`."""
    obj = _load(path)
    state = obj.get("relation_model", obj)
    dim = state["query_proj.weight"].shape[0]
    module = RelationModule(dim)
    module.load_state_dict({k.removeprefix("module."): v for k, v in state.items()}, strict=True)
    return module
