"""How the student SAM is made trainable, and how its weights go back to plain SAM.

Every method takes the same `TuningConfig` and returns the same `TuningReport`, like a peft tuner.
Shared rule (as in the InfoSAM / Conv-LoRA protocol): the prompt encoder is always frozen; the
encoder-side methods (`bitfit`, `lora`, `adapter`) also train the whole mask decoder unless
`train_decoder=False`; `decoder` trains only the mask decoder; `full` trains image encoder and
mask decoder.
"""

from __future__ import annotations

import copy
import dataclasses
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from segment_anything.modeling import Sam
from segment_anything.modeling.image_encoder import (
    Block,
    window_partition,
    window_unpartition,
)
from torch import nn

__all__ = [
    "TUNING_METHODS",
    "Adapter",
    "SeriesAdapterBlock",
    "TuningConfig",
    "TuningReport",
    "apply_tuning",
    "count_parameters",
    "load_trainable_state_dict",
    "merge_for_export",
    "trainable_state_dict",
]


@dataclass
class TuningConfig:
    """One student PEFT recipe. Unused fields are ignored by methods that do not need them."""

    method: str = "adapter"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lora_dropout: float = 0.0
    adapter_ratio: float = 0.25
    # None: blocks 2..depth-1, as the reference (no adapters in blocks 0 and 1).
    adapter_blocks: list[int] | None = None
    train_decoder: bool = True


@dataclass
class TuningReport:
    """What a tuning method made trainable, reported the same way for every method."""

    method: str
    trainable_params: int
    total_params: int
    trainable_names: list[str] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_params / max(self.total_params, 1)


class Adapter(nn.Module):
    """Bottleneck adapter of the InfoSAM reference: x + fc2(GELU(fc1(x))) (skip inside)."""

    def __init__(self, dim: int, ratio: float = 0.25, skip_connect: bool = True) -> None:
        super().__init__()
        hidden = int(dim * ratio)
        self.skip_connect = skip_connect
        self.act = nn.GELU()
        # Attribute names match the reference release (`D_fc1`, `D_fc2`) so its keys map 1:1.
        self.D_fc1 = nn.Linear(dim, hidden)
        self.D_fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self.D_fc2(self.act(self.D_fc1(x)))
        return x + xs if self.skip_connect else xs


class SeriesAdapterBlock(Block):
    """segment-anything's ViT `Block` with series adapters after attention and around the MLP.

    Existing blocks are converted in place (their class is swapped, their weights kept), so no
    segment-anything code is forked and state_dict keys stay `blocks.N.Space_Adapter_Series.*`.
    """

    Space_Adapter_Series: Adapter
    MLP_Adapter_Series: Adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            h, w = x.shape[1], x.shape[2]
            x, pad_hw = window_partition(x, self.window_size)
        x = self.attn(x)
        if self.window_size > 0:
            x = window_unpartition(x, self.window_size, pad_hw, (h, w))
        x = shortcut + self.Space_Adapter_Series(x)
        return x + self.MLP_Adapter_Series(self.mlp(self.norm2(x)))

    @classmethod
    def convert(cls, block: Block, ratio: float) -> SeriesAdapterBlock:
        dim = block.norm1.normalized_shape[0]
        ref = block.norm1.weight
        block.Space_Adapter_Series = Adapter(dim, ratio).to(ref.device, ref.dtype)
        block.MLP_Adapter_Series = Adapter(dim, ratio).to(ref.device, ref.dtype)
        block.__class__ = cls
        return block  # type: ignore[return-value]


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def _enable(params: Iterable[nn.Parameter]) -> None:
    for p in params:
        p.requires_grad_(True)


def mask_decoder(sam: nn.Module) -> nn.Module:
    """The mask decoder of SAM (`mask_decoder`) or SAM 2.1 (`sam_mask_decoder`, its high-res
    feature projections included)."""
    return sam.mask_decoder if hasattr(sam, "mask_decoder") else sam.sam_mask_decoder


def encoder_blocks(sam: nn.Module) -> nn.ModuleList:
    """The image encoder's transformer blocks: SAM's ViT blocks or SAM 2.1's Hiera blocks."""
    encoder = sam.image_encoder
    return encoder.blocks if hasattr(encoder, "blocks") else encoder.trunk.blocks


def _tune_decoder(sam: Sam, cfg: TuningConfig) -> None:
    _enable(mask_decoder(sam).parameters())


def _tune_full(sam: Sam, cfg: TuningConfig) -> None:
    _enable(sam.image_encoder.parameters())
    _enable(mask_decoder(sam).parameters())


def _tune_bitfit(sam: Sam, cfg: TuningConfig) -> None:
    _enable(p for n, p in sam.image_encoder.named_parameters() if n.endswith("bias"))
    if cfg.train_decoder:
        _tune_decoder(sam, cfg)


def _tune_lora(sam: Sam, cfg: TuningConfig) -> None:
    # peft imported here, not at the top: it pulls in transformers, 3 s of every Ray worker's
    # start on 2 cores, and only LoRA students need it
    from peft import LoraConfig, inject_adapter_in_model

    lora = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=["qkv"],
        bias="none",
    )
    inject_adapter_in_model(lora, sam.image_encoder)
    for name, p in sam.image_encoder.named_parameters():
        p.requires_grad_("lora_" in name)
    if cfg.train_decoder:
        _tune_decoder(sam, cfg)


def _tune_adapter(sam: Sam, cfg: TuningConfig) -> None:
    blocks = encoder_blocks(sam)
    chosen = cfg.adapter_blocks if cfg.adapter_blocks is not None else range(2, len(blocks))
    for i in chosen:
        if not 0 <= i < len(blocks):
            raise ValueError(
                f"adapter block {i} out of range: the encoder has {len(blocks)} blocks"
            )
        if isinstance(blocks[i], Block):
            block = SeriesAdapterBlock.convert(blocks[i], cfg.adapter_ratio)
            adapters = (block.Space_Adapter_Series, block.MLP_Adapter_Series)
        else:
            adapters = _adapt_hiera_block(blocks[i], cfg.adapter_ratio)
        for module in (*adapters, blocks[i].norm1, blocks[i].norm2):
            _enable(module.parameters())
    if cfg.train_decoder:
        _tune_decoder(sam, cfg)


_ADAPTED: dict[tuple[type, str], type] = {}


def _adapted_class(cls: type, name: str) -> type:
    """A subclass of `cls` whose output passes through the Adapter in its attribute `name`
    (one class per base class, as `speed._checkpointed_class`)."""
    if (cls, name) not in _ADAPTED:
        base_forward = cls.forward

        def forward(self: nn.Module, *args: object, **kwargs: object) -> torch.Tensor:
            return getattr(self, name)(base_forward(self, *args, **kwargs))

        _ADAPTED[(cls, name)] = type(
            f"Adapted{cls.__name__}", (cls,), {"forward": forward, "__module__": __name__}
        )
    return _ADAPTED[(cls, name)]


def _adapt_hiera_block(block: nn.Module, ratio: float) -> tuple[Adapter, Adapter]:
    """Series adapters in a SAM 2.1 Hiera block, where SAM's sit: on the attention output
    before the residual add, and on the MLP output. An adapter acts per token, so applying it
    to the attention's windowed (and pooled) output before Hiera un-partitions the windows is
    the same; the attention and MLP get the adapter as a child (keys
    `blocks.N.attn.Space_Adapter_Series.*`, `blocks.N.mlp.MLP_Adapter_Series.*`) and their
    class swapped, so no Hiera code is forked and `qkv` keeps its name for LoRA and export."""
    ref = block.norm2.weight
    dim = int(block.dim_out)
    block.attn.Space_Adapter_Series = Adapter(dim, ratio).to(ref.device, ref.dtype)
    block.attn.__class__ = _adapted_class(type(block.attn), "Space_Adapter_Series")
    block.mlp.MLP_Adapter_Series = Adapter(dim, ratio).to(ref.device, ref.dtype)
    block.mlp.__class__ = _adapted_class(type(block.mlp), "MLP_Adapter_Series")
    return block.attn.Space_Adapter_Series, block.mlp.MLP_Adapter_Series


TUNING_METHODS: dict[str, Callable[[Sam, TuningConfig], None]] = {
    "decoder": _tune_decoder,
    "bitfit": _tune_bitfit,
    "lora": _tune_lora,
    "adapter": _tune_adapter,
    "full": _tune_full,
}


def apply_tuning(sam: Sam, cfg: TuningConfig | None = None, **overrides: object) -> TuningReport:
    """Freeze `sam`, then make the parts named by the method trainable (mutates `sam` in place)."""
    cfg = dataclasses.replace(cfg or TuningConfig(), **overrides)
    if cfg.method not in TUNING_METHODS:
        raise ValueError(
            f"unknown tuning method {cfg.method!r}; choose one of {sorted(TUNING_METHODS)}"
        )
    checkpointed = [
        i
        for i, b in enumerate(encoder_blocks(sam))
        if getattr(type(b), "_infosam_checkpointed", False)
    ]
    if checkpointed:  # adapters swap the block class, which would silently drop checkpointing
        raise ValueError(
            f"encoder blocks {checkpointed} are already checkpointed: apply tuning first, then "
            "the speed switches (orchestrator.train.models.build_models does both in that order)"
        )
    sam.requires_grad_(False)
    TUNING_METHODS[cfg.method](sam, cfg)
    names = [n for n, p in sam.named_parameters() if p.requires_grad]
    return TuningReport(
        method=cfg.method,
        trainable_params=count_parameters(sam, trainable_only=True),
        total_params=count_parameters(sam),
        trainable_names=names,
    )


def trainable_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Only the tensors that training changes: what a fine-tuning checkpoint needs to hold."""
    return {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}


def load_trainable_state_dict(module: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a `trainable_state_dict` back; every trainable tensor must be present, nothing else."""
    expected = {n for n, p in module.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise KeyError(
            f"trainable-state mismatch: missing {missing[:10]} unexpected {unexpected[:10]} "
            "(was the checkpoint made with another tuning method or rank?)"
        )
    params = dict(module.named_parameters())
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor)


def has_adapters(sam: Sam) -> bool:
    return any(isinstance(m, Adapter) for m in sam.modules())


def merge_for_export(sam: Sam) -> dict[str, torch.Tensor]:
    """A plain segment-anything SAM state_dict with LoRA folded into `qkv`.

    Methods that only change SAM's own tensors (decoder, bitfit, lora, full) export to exactly the
    official key set, loadable by `sam_model_registry[variant](checkpoint=...)` with strict=True.
    Adapters add modules SAM does not have: that raises, use a self-contained export instead.
    """
    if has_adapters(sam):
        raise ValueError(
            "this student has series adapters, which are extra modules plain SAM cannot load; "
            "export a self-contained checkpoint instead (infosam.sam.build_sam + adapter config)"
        )
    merged = copy.deepcopy(sam)
    lora = sys.modules.get("peft.tuners.lora")  # no LoRA layer exists unless peft made one
    for name, module in list(merged.named_modules()):
        if lora is not None and isinstance(module, lora.LoraLayer):
            module.merge()
            parent_name, _, child = name.rpartition(".")
            setattr(merged.get_submodule(parent_name), child, module.get_base_layer())
    return {k: v.detach().clone() for k, v in merged.state_dict().items()}
