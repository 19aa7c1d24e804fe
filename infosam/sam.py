"""Building SAM models and running them on batches of (image, prompt) pairs.

Variants follow segment-anything's own registry (`vit_b`, `vit_l`, `vit_h`) plus `tiny`, a small
configuration built from the very same segment-anything classes so that everything in this project
can run on a CPU. Nothing here forks segment-anything: the single-mask decoder output token that
InfoSAM needs is tapped with a forward hook on `mask_decoder.transformer`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from segment_anything.build_sam import sam_model_registry
from segment_anything.modeling import (
    ImageEncoderViT,
    MaskDecoder,
    PromptEncoder,
    Sam,
    TwoWayTransformer,
)
from torch import nn

from infosam.tuning import TuningConfig, apply_tuning

__all__ = [
    "BUILTIN_CHECKPOINTS",
    "EXPORT_FORMAT",
    "SAM_VARIANTS",
    "CheckpointMismatchError",
    "PromptableSam",
    "SamOutput",
    "SamSpec",
    "build_sam",
    "checkpoint_sha256",
    "decode_masks",
    "load_exported",
    "load_sam_state_dict",
    "read_state_dict",
    "resolve_checkpoint",
    "save_exported",
]


@dataclass(frozen=True)
class SamSpec:
    """Sizes of one SAM variant; the only thing that differs between variants."""

    encoder_embed_dim: int
    encoder_depth: int
    encoder_num_heads: int
    encoder_global_attn_indexes: tuple[int, ...]
    image_size: int = 1024
    patch_size: int = 16
    window_size: int = 14
    prompt_embed_dim: int = 256
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = 8
    iou_head_hidden_dim: int = 256
    official_checkpoint: str | None = None

    @property
    def embedding_size(self) -> int:
        return self.image_size // self.patch_size


SAM_VARIANTS: dict[str, SamSpec] = {
    "vit_b": SamSpec(768, 12, 12, (2, 5, 8, 11), official_checkpoint="sam_vit_b_01ec64.pth"),
    "vit_l": SamSpec(1024, 24, 16, (5, 11, 17, 23), official_checkpoint="sam_vit_l_0b3195.pth"),
    "vit_h": SamSpec(1280, 32, 16, (7, 15, 23, 31), official_checkpoint="sam_vit_h_4b8939.pth"),
    # CPU-sized SAM: same classes, 256 px input, 16x16 embedding grid, ~1.9 M parameters.
    "tiny": SamSpec(
        encoder_embed_dim=128,
        encoder_depth=4,
        encoder_num_heads=4,
        encoder_global_attn_indexes=(1, 3),
        image_size=256,
        window_size=8,
        prompt_embed_dim=128,
        decoder_mlp_dim=512,
        decoder_num_heads=4,
        iou_head_hidden_dim=128,
    ),
}


class CheckpointMismatchError(RuntimeError):
    """A checkpoint's keys do not match the model it is loaded into."""


def _build_from_spec(spec: SamSpec) -> Sam:
    """Mirror of segment_anything.build_sam._build_sam with every size taken from `spec`."""
    e = spec.embedding_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            depth=spec.encoder_depth,
            embed_dim=spec.encoder_embed_dim,
            img_size=spec.image_size,
            mlp_ratio=4,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
            num_heads=spec.encoder_num_heads,
            patch_size=spec.patch_size,
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=spec.encoder_global_attn_indexes,
            window_size=spec.window_size,
            out_chans=spec.prompt_embed_dim,
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=spec.prompt_embed_dim,
            image_embedding_size=(e, e),
            input_image_size=(spec.image_size, spec.image_size),
            mask_in_chans=16,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(
                depth=2,
                embedding_dim=spec.prompt_embed_dim,
                mlp_dim=spec.decoder_mlp_dim,
                num_heads=spec.decoder_num_heads,
            ),
            transformer_dim=spec.prompt_embed_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=spec.iou_head_hidden_dim,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    return sam


BUILTIN_CHECKPOINTS = {
    # name: (family, variant, file under assets/). The tiny SAM and the tiny SAM 2.1 this project
    # pre-trained on the synthetic `general` domain (experiments/pretrain_teacher.py); each
    # model card (.md, and its numbers in .json) lies beside the weights.
    "builtin:tiny_teacher": ("sam", "tiny", "tiny_teacher.pth"),
    "builtin:tiny_sam2_teacher": ("sam2", "tiny", "tiny_sam2_teacher.pt"),
}


def resolve_checkpoint(checkpoint: str | os.PathLike | None) -> str | None:
    """Map `builtin:NAME` to the packaged file; other paths are returned as they are."""
    if checkpoint is None:
        return None
    text = os.fspath(checkpoint)
    if text in BUILTIN_CHECKPOINTS:
        path = os.path.join(os.path.dirname(__file__), "assets", BUILTIN_CHECKPOINTS[text][2])
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{text} is missing from this install ({path}); run "
                "`python experiments/pretrain_teacher.py` to make it"
            )
        return path
    if text.startswith("builtin:"):
        raise ValueError(
            f"unknown builtin checkpoint {text!r}; known: {sorted(BUILTIN_CHECKPOINTS)}"
        )
    return text


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint safely (`weights_only=True`).

    Accepts a bare state_dict (official SAM release), `{'model': state_dict}` (InfoSAM reference
    training checkpoints) and this project's exports (`{'state_dict': ..., 'infosam_export': ...}`).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"SAM checkpoint not found: {path}. Official weights (sam_vit_b_01ec64.pth, ...) are "
            "published by facebookresearch/segment-anything; download one and pass its path."
        )
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping) and all(isinstance(k, str) for k in inner):
                return dict(inner)
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
    raise CheckpointMismatchError(
        f"{path} holds no SAM state_dict (expected a dict of tensors, or one under 'model' or "
        "'state_dict')."
    )


def _summarise(keys: list[str], limit: int = 12) -> str:
    shown = ", ".join(keys[:limit])
    return shown + (f", ... ({len(keys) - limit} more)" if len(keys) > limit else "")


def load_sam_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, partial: bool = False
) -> tuple[list[str], list[str]]:
    """Load `state_dict` into `module`; any missing/unexpected key is an error unless `partial`.

    Returns (missing, unexpected) so a caller that opted into partial loading can report them.
    """
    own = module.state_dict()
    bad_shapes = [
        f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state_dict.items()
        if k in own and own[k].shape != v.shape
    ]
    if bad_shapes:
        raise CheckpointMismatchError(
            "checkpoint tensor shapes do not match the model (wrong variant?): "
            + _summarise(bad_shapes, 6)
        )
    result = module.load_state_dict(dict(state_dict), strict=False)
    missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if not partial and (missing or unexpected):
        raise CheckpointMismatchError(
            f"checkpoint does not match the model: {len(missing)} missing key(s) "
            f"[{_summarise(missing)}] and {len(unexpected)} unexpected key(s) "
            f"[{_summarise(unexpected)}]. Check the model variant, or pass partial=True "
            "to load what matches."
        )
    return missing, unexpected


def build_sam(
    variant: str = "tiny",
    checkpoint: str | os.PathLike | None = None,
    *,
    partial: bool = False,
) -> Sam:
    """Build a SAM variant, optionally loading a checkpoint (strict unless `partial`).

    `vit_b`/`vit_l`/`vit_h` go through segment-anything's own registry so the modules are exactly
    the official ones; `tiny` uses the same classes with CPU-sized dimensions.
    """
    if variant not in SAM_VARIANTS:
        raise ValueError(f"unknown SAM variant {variant!r}; choose one of {sorted(SAM_VARIANTS)}")
    sam = (
        _build_from_spec(SAM_VARIANTS[variant])
        if variant == "tiny"
        else sam_model_registry[variant]()
    )
    if checkpoint is not None:
        load_sam_state_dict(sam, read_state_dict(resolve_checkpoint(checkpoint)), partial=partial)
    sam.eval()
    return sam


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """Content hash of a checkpoint file, recorded with results and caches that depend on it."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class SamOutput(NamedTuple):
    """Everything InfoSAM reads from one SAM forward pass (single-mask output)."""

    image_embeddings: torch.Tensor  # (B, C, H, W) neck output
    low_res_logits: torch.Tensor  # (B, 1, 4H, 4W)
    iou_predictions: torch.Tensor  # (B, 1)
    mask_tokens: torch.Tensor  # (B, 1, C): decoder output token of the single-mask prediction


def decode_masks(
    decoder: MaskDecoder,
    image_embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse_prompt_embeddings: torch.Tensor,
    dense_prompt_embeddings: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`MaskDecoder.predict_masks` for B images with one prompt each.

    The stock method repeat-interleaves the image embedding by the number of prompts (it assumes
    one image per call), so B images x B prompts would become B*B. This runs the decoder's own
    transformer and heads on aligned batches instead; a test checks it equals per-image calls.
    Returns the single-mask (`multimask_output=False`) logits and IoU predictions.
    """
    b = image_embeddings.shape[0]
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    output_tokens = output_tokens.unsqueeze(0).expand(b, -1, -1)
    tokens = torch.cat((output_tokens, sparse_prompt_embeddings), dim=1)
    src = image_embeddings + dense_prompt_embeddings
    pos_src = image_pe.expand(b, -1, -1, -1)
    _, c, h, w = src.shape
    hs, src = decoder.transformer(src, pos_src, tokens)
    iou_token_out = hs[:, 0, :]
    mask_tokens_out = hs[:, 1 : 1 + decoder.num_mask_tokens, :]
    src = src.transpose(1, 2).reshape(b, c, h, w)
    upscaled = decoder.output_upscaling(src)
    hyper_in = torch.stack(
        [mlp(mask_tokens_out[:, i, :]) for i, mlp in enumerate(decoder.output_hypernetworks_mlps)],
        dim=1,
    )
    _, c, h, w = upscaled.shape
    masks = (hyper_in @ upscaled.view(b, c, h * w)).view(b, -1, h, w)
    iou_pred = decoder.iou_prediction_head(iou_token_out)
    return masks[:, :1], iou_pred[:, :1]


class PromptableSam(nn.Module):
    """A SAM model that takes a batch of padded images and one prompt per image.

    Images arrive as (B, 3, S, S) uint8 (or float in 0..255) resized-longest-side and zero padded;
    normalisation happens here, on the device, as segment-anything does it (normalise, then zero
    the padding). Prompts are in the S x S input frame. Pass `image_embeddings` to skip the image
    encoder (cached frozen-teacher embeddings).
    """

    def __init__(self, sam: Sam) -> None:
        super().__init__()
        self.sam = sam

    @property
    def image_size(self) -> int:
        return int(self.sam.image_encoder.img_size)

    def preprocess(self, images: torch.Tensor, input_sizes: torch.Tensor | None) -> torch.Tensor:
        x = images.to(self.sam.pixel_mean.dtype)
        x = (x - self.sam.pixel_mean) / self.sam.pixel_std
        if input_sizes is not None:
            s = x.shape[-1]
            idx = torch.arange(s, device=x.device)
            sizes = input_sizes.to(x.device)
            keep = (idx[None, :, None] < sizes[:, 0, None, None]) & (
                idx[None, None, :] < sizes[:, 1, None, None]
            )
            x = x * keep[:, None].to(x.dtype)
        return x

    def encode(self, images: torch.Tensor, input_sizes: torch.Tensor | None = None) -> torch.Tensor:
        return self.sam.image_encoder(self.preprocess(images, input_sizes))

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
        points = None
        if point_coords is not None:
            if point_labels is None:
                raise ValueError("point_coords given without point_labels")
            points = (point_coords.float(), point_labels.int())
        sparse, dense = self.sam.prompt_encoder(
            points=points, boxes=None if boxes is None else boxes.float(), masks=None
        )
        captured: list[torch.Tensor] = []

        def tap(_module: nn.Module, _inputs: object, outputs: tuple[torch.Tensor, ...]) -> None:
            captured.append(outputs[0][:, 1:2, :])  # hs[:, 1]: the single-mask output token

        handle = self.sam.mask_decoder.transformer.register_forward_hook(tap)
        try:
            logits, iou = decode_masks(
                self.sam.mask_decoder,
                image_embeddings,
                self.sam.prompt_encoder.get_dense_pe(),
                sparse,
                dense.expand(image_embeddings.shape[0], -1, -1, -1),
            )
        finally:
            handle.remove()
        return SamOutput(image_embeddings, logits, iou, captured[-1])


# Self-contained exports (`infosam export` of a student with modules plain SAM lacks): the
# full state_dict plus what rebuilds those modules.
EXPORT_FORMAT = 1


def save_exported(
    sam: nn.Module,
    path: str | os.PathLike,
    variant: str,
    tuning: TuningConfig,
    family: str = "sam",
) -> None:
    """A self-contained student: the full state_dict plus what is needed to rebuild its modules
    (`family`: sam, or sam2 for SAM 2.1). Written to a temporary file and renamed: a crash
    never leaves a truncated export."""
    import dataclasses

    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    torch.save(
        {
            "infosam_export": {
                "format": EXPORT_FORMAT,
                "family": family,
                "variant": variant,
                "tuning": dataclasses.asdict(tuning),
            },
            "state_dict": {k: v.detach().cpu() for k, v in sam.state_dict().items()},
        },
        tmp,
    )
    os.replace(tmp, path)


def read_exported(path: str | os.PathLike) -> tuple[Mapping, dict]:
    """(its `infosam_export` description, the whole file) of a self-contained export."""
    obj = torch.load(os.fspath(path), map_location="cpu", weights_only=True)
    meta = obj.get("infosam_export") if isinstance(obj, Mapping) else None
    if not isinstance(meta, Mapping):
        raise CheckpointMismatchError(
            f"{path} is not a self-contained infosam export; plain SAM weights load with "
            "segment_anything.sam_model_registry[variant](checkpoint=path)"
        )
    return meta, obj


def restore_exported(module: nn.Module, meta: Mapping, obj: Mapping) -> nn.Module:
    """A freshly built base model given the export's tuning modules and tensors, frozen."""
    tuning = TuningConfig(**meta["tuning"])
    if tuning.method in ("adapter", "lora"):
        apply_tuning(module, tuning)
    load_sam_state_dict(module, obj["state_dict"])
    module.requires_grad_(False)
    return module.eval()


def load_exported(path: str | os.PathLike) -> Sam:
    """One-line loader for a self-contained `infosam export` (e.g. an adapter student); SAM 2.1
    exports load with `infosam.sam2.load_exported`."""
    meta, obj = read_exported(path)
    if meta.get("family", "sam") != "sam":
        raise CheckpointMismatchError(
            f"{path} is a SAM 2.1 export: load it with infosam.sam2.load_exported(path)"
        )
    return restore_exported(build_sam(meta["variant"]), meta, obj)
