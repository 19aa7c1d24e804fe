"""One table of tuning methods run through shared checks (as peft's tests do)."""

import copy

import pytest
import torch
from segment_anything.modeling import Sam

from infosam.engine import LossConfig, compute_losses
from infosam.sam import SAM_VARIANTS, PromptableSam, _build_from_spec, build_sam
from infosam.tuning import (
    TUNING_METHODS,
    TuningConfig,
    apply_tuning,
    load_trainable_state_dict,
    merge_for_export,
    trainable_state_dict,
)


def _intended(method):
    """Which parameter names each method may change."""
    decoder = lambda n: n.startswith("mask_decoder.")  # noqa: E731
    return {
        "decoder": decoder,
        "bitfit": lambda n: decoder(n) or (n.startswith("image_encoder.") and n.endswith("bias")),
        "lora": lambda n: decoder(n) or "lora_" in n,
        "adapter": lambda n: (
            decoder(n)
            or "Adapter_Series" in n
            or any(n.startswith(f"image_encoder.blocks.{i}.norm") for i in (2, 3))
        ),
        "full": lambda n: not n.startswith("prompt_encoder."),
    }[method]


# What each method must change in the image encoder (the decoder alone is not enough).
ENCODER_MARK = {
    "bitfit": "bias",
    "lora": "lora_B",
    "adapter": "Adapter_Series",
    "full": "qkv.weight",
}
METHODS = sorted(TUNING_METHODS)  # the registry, so a new method cannot skip the checks


def test_every_registered_method_has_a_row_in_the_table():
    for method in METHODS:
        assert callable(_intended(method)), method


# (method, options, check on the tuned model): options of each method, one table.
OPTION_CASES = [
    (
        "lora",
        {"lora_rank": 8},
        lambda sam: sam.image_encoder.blocks[0].attn.qkv.lora_A["default"].weight.shape[0] == 8,
    ),
    (
        "lora",
        {"train_decoder": False},
        lambda sam: not any(p.requires_grad for p in sam.mask_decoder.parameters()),
    ),
    (
        "bitfit",
        {"train_decoder": False},
        lambda sam: not any(p.requires_grad for p in sam.mask_decoder.parameters()),
    ),
    (
        "adapter",
        {"train_decoder": False},
        lambda sam: not any(p.requires_grad for p in sam.mask_decoder.parameters()),
    ),
    (
        "adapter",
        {"adapter_blocks": [3]},
        lambda sam: (
            [
                i
                for i, b in enumerate(sam.image_encoder.blocks)
                if hasattr(b, "Space_Adapter_Series")
            ]
            == [3]
        ),
    ),
    (
        "adapter",
        {"adapter_ratio": 0.5},
        lambda sam: (
            sam.image_encoder.blocks[2].Space_Adapter_Series.D_fc1.weight.shape == (64, 128)
        ),
    ),
    ("decoder", {}, lambda sam: not any(p.requires_grad for p in sam.image_encoder.parameters())),
]


@pytest.mark.parametrize(("method", "options", "check"), OPTION_CASES)
def test_method_options(method, options, check):
    sam = build_sam("tiny")
    apply_tuning(sam, TuningConfig(method=method, **options))
    assert check(sam)
    assert not any(p.requires_grad for p in sam.prompt_encoder.parameters())


def test_speed_switches_before_tuning_are_refused():
    from infosam.speed import checkpoint_blocks

    sam = checkpoint_blocks(build_sam("tiny"))
    with pytest.raises(ValueError, match="apply tuning first"):
        apply_tuning(sam, TuningConfig(method="adapter"))


def _trained(method, batch, prompts, steps=6, **kw):
    torch.manual_seed(0)
    sam = build_sam("tiny")
    report = apply_tuning(sam, TuningConfig(method=method, lora_rank=4, **kw))
    model = PromptableSam(sam)
    before = {n: p.detach().clone() for n, p in sam.named_parameters()}
    opt = torch.optim.Adam([p for p in sam.parameters() if p.requires_grad], lr=1e-3)
    cfg = LossConfig(infosam=False)
    losses = []
    for _ in range(steps):
        loss, _, _ = compute_losses(model, batch["image"], batch["mask"], prompts, cfg)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    changed = {n for n, p in sam.named_parameters() if not torch.equal(before[n], p)}
    return sam, report, losses, changed


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_changes_only_its_parameters(method, batch, box_prompts):
    sam, report, losses, changed = _trained(method, batch, box_prompts)
    assert losses[-1] < losses[0], losses
    intended = _intended(method)
    assert changed, "nothing changed"
    assert all(intended(n) for n in changed), sorted(n for n in changed if not intended(n))
    trainable = {n for n, p in sam.named_parameters() if p.requires_grad}
    assert changed <= trainable and set(report.trainable_names) == trainable
    assert report.trainable_params == sum(p.numel() for p in sam.parameters() if p.requires_grad)
    assert not any(n.startswith("prompt_encoder.") for n in trainable)
    if method in ENCODER_MARK:
        assert any(n.startswith("image_encoder.") and ENCODER_MARK[method] in n for n in changed)
    if method == "lora":
        assert not any("base_layer" in n for n in changed)


@pytest.mark.parametrize("method", METHODS)
def test_trainable_state_saves_and_loads(method, batch, box_prompts, tmp_path):
    sam, _, _, _ = _trained(method, batch, box_prompts, steps=2)
    torch.save(trainable_state_dict(sam), tmp_path / "t.pt")
    fresh = build_sam("tiny")
    apply_tuning(fresh, TuningConfig(method=method))
    load_trainable_state_dict(fresh, torch.load(tmp_path / "t.pt", weights_only=True))
    # Frozen tensors come from the same seed, so the two models must now agree everywhere
    # (apart from freshly initialised adapter/lora tensors, which were overwritten).
    torch.manual_seed(0)
    x = batch["image"][:2]
    boxes = torch.tensor([[30.0, 30, 200, 200]] * 2)
    with torch.no_grad():
        a = PromptableSam(sam)(x, boxes=boxes).low_res_logits
        torch.manual_seed(0)
        fresh_all = build_sam("tiny")
        apply_tuning(fresh_all, TuningConfig(method=method))
        fresh_all.load_state_dict(sam.state_dict())
        load_trainable_state_dict(fresh_all, torch.load(tmp_path / "t.pt", weights_only=True))
        b = PromptableSam(fresh_all)(x, boxes=boxes).low_res_logits
    torch.testing.assert_close(a, b)
    with pytest.raises(KeyError, match="trainable-state mismatch"):
        other = build_sam("tiny")
        apply_tuning(other, TuningConfig(method="decoder" if method != "decoder" else "full"))
        load_trainable_state_dict(other, torch.load(tmp_path / "t.pt", weights_only=True))


@pytest.mark.parametrize("method", ["decoder", "bitfit", "lora", "full"])
def test_export_is_plain_sam_with_identical_outputs(method, batch, box_prompts):
    sam, _, _, _ = _trained(method, batch, box_prompts, steps=3)
    exported = merge_for_export(sam)
    plain: Sam = _build_from_spec(SAM_VARIANTS["tiny"])
    plain.load_state_dict(exported, strict=True)  # segment-anything's own classes, strict
    with torch.no_grad():
        ours = PromptableSam(sam.eval())(batch["image"], boxes=box_prompts.boxes).low_res_logits
        theirs = PromptableSam(plain.eval())(batch["image"], boxes=box_prompts.boxes).low_res_logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)
    # Export leaves the training model untouched (LoRA still unmerged).
    assert method != "lora" or any("lora_A" in n for n, _ in sam.named_parameters())


def test_lora_export_loads_in_segment_anything_registry_vit_b(tmp_path):
    from segment_anything import sam_model_registry

    sam = build_sam("vit_b")
    apply_tuning(sam, TuningConfig(method="lora", lora_rank=4))
    with torch.no_grad():
        for n, p in sam.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    blk = sam.image_encoder.blocks[0].attn.qkv
    delta = blk.lora_B["default"].weight @ blk.lora_A["default"].weight * blk.scaling["default"]
    expected = blk.base_layer.weight + delta
    torch.save(merge_for_export(sam), tmp_path / "sam_lora_merged.pth")
    official = sam_model_registry["vit_b"](checkpoint=str(tmp_path / "sam_lora_merged.pth"))
    torch.testing.assert_close(official.image_encoder.blocks[0].attn.qkv.weight, expected)


def test_adapter_layout_and_export_refusal():
    sam = build_sam("tiny")
    report = apply_tuning(sam, TuningConfig(method="adapter", adapter_ratio=0.25))
    keys = [k for k in sam.state_dict() if "Adapter_Series" in k]
    assert not any(
        k.startswith(("image_encoder.blocks.0.", "image_encoder.blocks.1.")) for k in keys
    )
    assert "image_encoder.blocks.2.Space_Adapter_Series.D_fc1.weight" in keys
    assert sam.state_dict()["image_encoder.blocks.3.MLP_Adapter_Series.D_fc1.weight"].shape == (
        32,
        128,
    )
    assert report.trainable_params > 0
    with pytest.raises(ValueError, match="self-contained"):
        merge_for_export(sam)


def test_adapter_block_equals_reference_formula():
    """x + Space(attn(norm1 x)); then x + MLP_Adapter(mlp(norm2 x)), as the reference computes."""
    torch.manual_seed(0)
    sam = build_sam("tiny")
    apply_tuning(sam, TuningConfig(method="adapter", adapter_blocks=[1]))
    blk = sam.image_encoder.blocks[1]  # a global-attention block (window_size 0)
    x = torch.randn(2, 16, 16, 128)
    h = x + blk.Space_Adapter_Series(blk.attn(blk.norm1(x)))
    expected = h + blk.MLP_Adapter_Series(blk.mlp(blk.norm2(h)))
    torch.testing.assert_close(blk(x), expected)
    copied = copy.deepcopy(sam)  # survives deepcopy (class swap, not hooks)
    torch.testing.assert_close(copied.image_encoder.blocks[1](x), expected)
