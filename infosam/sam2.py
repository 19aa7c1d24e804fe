"""SAM 2.1 (Hiera image encoder) models: the variants, Meta's checkpoint format in and out.

The backend is `rf-sam-2` (Roboflow's Apache-2.0 wheel of Meta's `sam2` package: Meta's module
code and the SAM 2.1 Hydra configs, pure Python, no CUDA extension). Meta publishes no wheel;
the PyPI `sam2` is an unofficial source upload that also installs a top-level `training`
package. `transformers`' `Sam2Model` renames every tensor, so Meta's `.pt` files would need a
key mapping both ways; with Meta's own modules the official `sam2.1_hiera_*.pt` files load
as they are and an exported student is a file Meta's `build_sam2` reads.

A checkpoint in Meta's format is `{"model": state_dict}` of the whole `SAM2Base` (image encoder,
prompt encoder, mask decoder and the video memory modules, which image mode never runs).
Models are built on the CPU, offline (no weights are downloaded), in eval mode.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from infosam.sam import CheckpointMismatchError

__all__ = [
    "SAM2_CONFIGS",
    "SAM2_OFFICIAL_FILES",
    "build_sam2_model",
    "load_sam2_checkpoint",
    "read_sam2_state_dict",
    "sam2_overrides",
    "save_sam2_checkpoint",
]

SAM2_CONFIGS = {
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",  # + TINY_OVERRIDES
}

# The files Meta publishes for each variant (what a user passes as the checkpoint)
SAM2_OFFICIAL_FILES = {
    "hiera_t": "sam2.1_hiera_tiny.pt",
    "hiera_s": "sam2.1_hiera_small.pt",
    "hiera_b+": "sam2.1_hiera_base_plus.pt",
    "hiera_l": "sam2.1_hiera_large.pt",
}

# A CPU-sized SAM 2.1 for tests and the offline default: Hiera-T's layout with 5 blocks of
# width 32-256 at 256 px (16x16 image embeddings of 256 channels, as SAM 2's), one memory
# attention layer. The mask decoder is SAM 2's own (its width follows the 256-d neck).
TINY_OVERRIDES = (
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
    "++model.memory_encoder.fuser.num_layers=1",
)


def sam2_overrides(variant: str) -> list[str]:
    """The Hydra overrides that make `variant` from its config: what Meta's `build_sam2` needs
    (`hydra_overrides_extra=`) to rebuild an exported tiny student."""
    _check_variant(variant)
    return list(TINY_OVERRIDES) if variant == "tiny" else []


def _check_variant(variant: str) -> None:
    if variant not in SAM2_CONFIGS:
        raise ValueError(
            f"unknown SAM 2.1 variant {variant!r}; choose one of {sorted(SAM2_CONFIGS)}"
        )


def build_sam2_model(
    variant: str = "tiny", checkpoint: str | os.PathLike | None = None
) -> nn.Module:
    """A SAM 2.1 `SAM2Base` on the CPU in eval mode, random-initialised or loaded strictly from
    a checkpoint in Meta's format. Built as Meta's `build_sam2` builds it for the image
    predictor (its dynamic multimask fallback included), so masks match `SAM2ImagePredictor`."""
    _check_variant(variant)
    try:
        from sam2.build_sam import build_sam2
    except ImportError as exc:  # pragma: no cover - a dependency of the package
        raise ImportError(
            f"SAM 2.1 needs the `rf-sam-2` package (pip install rf-sam-2): {exc}"
        ) from None
    model = build_sam2(
        SAM2_CONFIGS[variant],
        None,
        device="cpu",
        mode="eval",
        hydra_overrides_extra=sam2_overrides(variant),
    )
    if checkpoint is not None:
        load_sam2_checkpoint(model, checkpoint, variant)
    return model


def read_sam2_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The state_dict of a checkpoint in Meta's format (`{"model": state_dict}`), read with
    `weights_only=True`; anything else is a CheckpointMismatchError that says what it is."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SAM 2.1 checkpoint not found: {path}")
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(obj, Mapping) or not isinstance(obj.get("model"), Mapping):
        keys = sorted(obj)[:5] if isinstance(obj, Mapping) else type(obj).__name__
        hint = (
            " (it looks like SAM 1 weights: load them with model.family=sam)"
            if isinstance(obj, Mapping)
            and any(str(k).startswith("image_encoder.blocks") for k in obj)
            else ""
        )
        raise CheckpointMismatchError(
            f"{path} is not a SAM 2.1 checkpoint in Meta's format {{'model': state_dict}}: it "
            f"holds {keys}{hint}"
        )
    return dict(obj["model"])


def load_sam2_checkpoint(model: nn.Module, path: str | os.PathLike, variant: str) -> None:
    """Load Meta's format strictly: every tensor present with its shape, nothing extra. The
    error names the variant, the file it expects, and the first missing, unexpected and
    mis-shaped keys (a checkpoint of another variant fails on shapes, not silently)."""
    state = read_sam2_state_dict(path)
    own = model.state_dict()
    missing = sorted(own.keys() - state.keys())
    unexpected = sorted(state.keys() - own.keys())
    shapes = [
        f"{k}: {tuple(state[k].shape)} in the file, {tuple(own[k].shape)} in {variant}"
        for k in sorted(own.keys() & state.keys())
        if tuple(state[k].shape) != tuple(own[k].shape)
    ]
    if missing or unexpected or shapes:
        expected = SAM2_OFFICIAL_FILES.get(variant, "an `infosam export` of a tiny SAM 2.1 student")
        raise CheckpointMismatchError(
            f"{path} does not fit SAM 2.1 variant {variant!r} (expected {expected}): "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys "
            f"{unexpected[:5]}, {len(shapes)} shape mismatches {shapes[:3]}"
        )
    model.load_state_dict(state, strict=True)


def save_sam2_checkpoint(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Write `{"model": state_dict}` (Meta's format, what `build_sam2(config, path)` loads);
    through a temporary file and a rename, so a crash never leaves a truncated file."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save({"model": {k: v.detach().cpu() for k, v in state_dict.items()}}, tmp)
    os.replace(tmp, path)
