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
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from infosam.sam import (
    CheckpointMismatchError,
    SamOutput,
    build_sam,
    read_exported,
    restore_exported,
)

__all__ = [
    "SAM2_CONFIGS",
    "SAM2_EMBEDDING_DIMS",
    "SAM2_IMAGE_SIZES",
    "SAM2_OFFICIAL_FILES",
    "PromptableSam2",
    "build_sam2_model",
    "infer_sam2_variant",
    "load_exported",
    "load_sam2_checkpoint",
    "meta_build_kwargs",
    "meta_image_predictor",
    "read_sam2_state_dict",
    "sam2_overrides",
    "save_sam2_checkpoint",
    "square_image",
]

SAM2_CONFIGS = {
    "hiera_t": "configs/sam2.1/sam2.1_hiera_t.yaml",
    "hiera_s": "configs/sam2.1/sam2.1_hiera_s.yaml",
    "hiera_b+": "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "hiera_l": "configs/sam2.1/sam2.1_hiera_l.yaml",
    "tiny": "configs/sam2.1/sam2.1_hiera_t.yaml",  # + TINY_OVERRIDES
}

# Input resolution (SAM 2.1 resizes every image to S x S) and image-embedding width
SAM2_IMAGE_SIZES = {
    "tiny": 256,
    "hiera_t": 1024,
    "hiera_s": 1024,
    "hiera_b+": 1024,
    "hiera_l": 1024,
}
# Image-embedding width (the neck's d_model; the decoder, the output token and the relation
# module follow it): Meta's variants 256, the CPU-sized tiny 128
SAM2_EMBEDDING_DIMS = {
    "tiny": 128,
    "hiera_t": 256,
    "hiera_s": 256,
    "hiera_b+": 256,
    "hiera_l": 256,
}

# The files Meta publishes for each variant (what a user passes as the checkpoint)
SAM2_OFFICIAL_FILES = {
    "hiera_t": "sam2.1_hiera_tiny.pt",
    "hiera_s": "sam2.1_hiera_small.pt",
    "hiera_b+": "sam2.1_hiera_base_plus.pt",
    "hiera_l": "sam2.1_hiera_large.pt",
}

# A CPU-sized SAM 2.1 for tests and the offline default: Hiera-T's layout with 5 blocks of
# width 32-256 at 256 px and a 128-d neck (16x16 image embeddings of 128 channels; Meta's are
# 256), so SAM 2's own mask decoder is 128 wide. The memory modules, unused in image mode but
# part of every checkpoint, are narrowed to match (one layer each): 3.55 M parameters, 7.1 MB
# in fp16, small enough to ship.
TINY_OVERRIDES = (
    "++model.image_size=256",
    "++model.image_encoder.trunk.embed_dim=32",
    "++model.image_encoder.trunk.num_heads=1",
    "++model.image_encoder.trunk.stages=[1,1,2,1]",
    "++model.image_encoder.trunk.global_att_blocks=[3]",
    "++model.image_encoder.neck.backbone_channel_list=[256,128,64,32]",
    "++model.image_encoder.neck.d_model=128",
    "++model.image_encoder.neck.position_encoding.num_pos_feats=128",
    "++model.memory_attention.d_model=128",
    "++model.memory_attention.num_layers=1",
    "++model.memory_attention.layer.d_model=128",
    "++model.memory_attention.layer.dim_feedforward=512",
    "++model.memory_attention.layer.self_attention.embedding_dim=128",
    "++model.memory_attention.layer.self_attention.feat_sizes=[16,16]",
    "++model.memory_attention.layer.cross_attention.embedding_dim=128",
    "++model.memory_attention.layer.cross_attention.feat_sizes=[16,16]",
    "++model.memory_encoder.in_dim=128",
    "++model.memory_encoder.mask_downsampler.embed_dim=128",
    "++model.memory_encoder.fuser.layer.dim=128",
    "++model.memory_encoder.fuser.num_layers=1",
)


# (Hiera's first width, its number of blocks) per variant: how a state_dict names its variant
_SIGNATURES = {
    (96, 12): "hiera_t",
    (96, 16): "hiera_s",
    (112, 24): "hiera_b+",
    (144, 48): "hiera_l",
    (32, 5): "tiny",
}


def infer_sam2_variant(state: Mapping[str, torch.Tensor], where: str = "the checkpoint") -> str:
    """The variant a SAM 2.1 state_dict belongs to, from its Hiera trunk's width and depth."""
    width = state.get("image_encoder.trunk.patch_embed.proj.weight")
    blocks = {k.split(".")[3] for k in state if k.startswith("image_encoder.trunk.blocks.")}
    signature = (int(width.shape[0]) if width is not None else -1, len(blocks))
    if signature not in _SIGNATURES:
        raise CheckpointMismatchError(
            f"{where} is no SAM 2.1 variant this project knows (Hiera width {signature[0]}, "
            f"{signature[1]} blocks); name it with --variant ({', '.join(sorted(SAM2_CONFIGS))})"
        )
    return _SIGNATURES[signature]


def meta_build_kwargs(variant: str) -> dict[str, Any]:
    """What Meta's `build_sam2(config, file, **kwargs)` needs to rebuild `variant` as this
    project builds it. Meta's image predictor falls back from the single-mask output to the best
    multimask output when the single mask is unstable (`apply_postprocessing`); this project
    trains the single-mask output only, so the tiny (pre-trained here, its multimask outputs
    untrained) is built without that fallback. Meta's variants keep Meta's default."""
    return {
        "hydra_overrides_extra": sam2_overrides(variant),
        "apply_postprocessing": variant != "tiny",
    }


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
    variant: str = "tiny",
    checkpoint: str | os.PathLike | None = None,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
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
        **meta_build_kwargs(variant),
    )
    if checkpoint is not None:
        load_sam2_checkpoint(model, checkpoint, variant, state=state)
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


def load_sam2_checkpoint(
    model: nn.Module,
    path: str | os.PathLike,
    variant: str,
    *,
    state: Mapping[str, torch.Tensor] | None = None,
) -> None:
    """Load Meta's format strictly: every tensor present with its shape, nothing extra. The
    error names the variant, the file it expects, and the first missing, unexpected and
    mis-shaped keys (a checkpoint of another variant fails on shapes, not silently). `state`:
    the file's state_dict when the caller has read it already."""
    state = read_sam2_state_dict(path) if state is None else state
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


def meta_image_predictor(model: nn.Module, **kwargs: Any) -> Any:
    """Meta's own `SAM2ImagePredictor` for a model of any input size. The predictor hard-codes
    the feature-map sizes of a 1024 px input (`_bb_feat_sizes`); setting them from the model's
    resolution is all the 256 px `tiny` needs to run there too (its masks equal ours, tested)."""
    from sam2.sam2_image_predictor import SAM2ImagePredictor

    predictor = SAM2ImagePredictor(model, **kwargs)
    s = int(model.image_size)
    predictor._bb_feat_sizes = [(s // 4, s // 4), (s // 8, s // 8), (s // 16, s // 16)]
    return predictor


class PromptableSam2(nn.Module):
    """SAM 2.1 in image mode (as `SAM2ImagePredictor` runs it: no memory, the high-resolution
    features into the decoder) behind `PromptableSam`'s contract, so the InfoSAM losses, the
    baselines, evaluation and prediction run on either family.

    Differences the callers see through attributes, not code paths: `square_inputs` (SAM 2.1
    resizes an image to S x S, aspect ratio not kept, where SAM pads the longest side to S; the
    data reader and the predictor prepare images so), ImageNet normalisation of 0..255 pixels,
    and `postprocess` (low-res logits straight to the original size, as Meta's predictor).
    `encode` returns the image embedding and the two high-resolution maps packed into one
    (B, 4C, H, W) tensor (the maps pixel-unshuffled onto the embedding grid, losslessly), so an
    encoder output can be indexed, cached and passed back as `image_embeddings` like SAM's;
    `SamOutput.image_embeddings` is the (B, C, H, W) embedding alone.
    """

    square_inputs = True

    def __init__(self, sam: nn.Module) -> None:
        super().__init__()
        self.sam = sam
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean, persistent=False)
        self.register_buffer("pixel_std", std, persistent=False)

    @property
    def image_size(self) -> int:
        return int(self.sam.image_size)

    @property
    def embedding_dim(self) -> int:
        return int(self.sam.hidden_dim)

    def preprocess(
        self, images: torch.Tensor, input_sizes: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, 3, S, S) pixels in 0..255 -> Meta's normalisation (to 0..1, then ImageNet's mean
        and std). Square inputs have no padding, so `input_sizes` is not needed."""
        x = images.to(self.pixel_mean.dtype) / 255.0
        return (x - self.pixel_mean) / self.pixel_std

    def encode(self, images: torch.Tensor, input_sizes: torch.Tensor | None = None) -> torch.Tensor:
        backbone = self.sam.forward_image(self.preprocess(images, input_sizes))
        _, feats, _, sizes = self.sam._prepare_backbone_features(backbone)
        if self.sam.directly_add_no_mem_embed:  # image mode: "no memory" added, as Meta's
            feats[-1] = feats[-1] + self.sam.no_mem_embed
        b = images.shape[0]
        s0, s1, embed = (f.permute(1, 2, 0).reshape(b, -1, h, w) for f, (h, w) in zip(feats, sizes))
        return torch.cat([embed, F.pixel_unshuffle(s1, 2), F.pixel_unshuffle(s0, 4)], dim=1)

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(image embedding, [the 4x map, the 2x map]) from `encode`'s packed tensor."""
        c = self.embedding_dim
        if packed.shape[1] != 4 * c:
            raise ValueError(
                f"SAM 2.1 image embeddings have {4 * c} channels (the embedding and the packed "
                f"high-resolution maps), got {packed.shape[1]}: were they made by another model?"
            )
        s1 = F.pixel_shuffle(packed[:, c : 2 * c], 2)
        s0 = F.pixel_shuffle(packed[:, 2 * c :], 4)
        return packed[:, :c], [s0, s1]

    def forward(
        self,
        images: torch.Tensor | None = None,
        *,
        boxes: torch.Tensor | None = None,
        point_coords: torch.Tensor | None = None,
        point_labels: torch.Tensor | None = None,
        input_sizes: torch.Tensor | None = None,
        image_embeddings: torch.Tensor | None = None,
    ) -> SamOutput:
        if image_embeddings is None:
            if images is None:
                raise ValueError("pass images or precomputed image_embeddings")
            image_embeddings = self.encode(images, input_sizes)
        if boxes is None and point_coords is None:
            raise ValueError("SAM needs a prompt: pass boxes and/or point_coords/point_labels")
        if point_coords is not None and point_labels is None:
            raise ValueError("point_coords given without point_labels")
        embed, high_res = self.unpack(image_embeddings)
        coords, labels = [], []
        if boxes is not None:  # a box is two points labelled 2 and 3, before the clicks
            coords.append(boxes.float().reshape(-1, 2, 2))
            labels.append(torch.tensor([[2, 3]], device=boxes.device).expand(boxes.shape[0], 2))
        if point_coords is not None:
            coords.append(point_coords.float())
            labels.append(point_labels)
        points = (torch.cat(coords, dim=1), torch.cat(labels, dim=1).int())
        sparse, dense = self.sam.sam_prompt_encoder(points=points, boxes=None, masks=None)
        logits, iou, tokens, _ = self.sam.sam_mask_decoder(
            image_embeddings=embed,
            image_pe=self.sam.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
            repeat_image=False,
            high_res_features=high_res,
        )
        return SamOutput(embed, logits, iou, tokens)

    def postprocess(
        self, low_res: torch.Tensor, input_size: tuple[int, int], original_size: tuple[int, int]
    ) -> torch.Tensor:
        """Low-res logits (B, 1, h, w) -> the original size, one bilinear step, as Meta's."""
        return F.interpolate(low_res.float(), original_size, mode="bilinear", align_corners=False)


def load_exported(path: str | os.PathLike) -> tuple[nn.Module, str]:
    """(model, family) of a self-contained `infosam export` of either family: SAM's `Sam` or
    SAM 2.1's `SAM2Base`, with its adapters (or LoRA) and tensors."""
    meta, obj = read_exported(path)
    family = meta.get("family", "sam")
    base = build_sam2_model(meta["variant"]) if family == "sam2" else build_sam(meta["variant"])
    return restore_exported(base, meta, obj), family


def square_image(image: np.ndarray, size: int) -> torch.Tensor:
    """An (H, W, 3) uint8 image as SAM 2.1's predictor resizes it: to 0..1, bilinear with
    antialiasing to size x size, back to the 0..255 scale the models take: (3, S, S) float."""
    from torchvision.transforms.functional import resize

    x = torch.as_tensor(np.array(image, dtype=np.uint8)).permute(2, 0, 1).float() / 255.0
    return resize(x, [size, size], antialias=True) * 255.0
