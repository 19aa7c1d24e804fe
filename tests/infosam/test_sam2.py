"""SAM 2.1 models: built offline, Meta's checkpoint format loaded strictly and written back so
Meta's own `build_sam2` + `SAM2ImagePredictor` use a fine-tuned student, the PEFT menu on Hiera."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor

from infosam.predictor import Prompt, segment_image
from infosam.sam import CheckpointMismatchError, build_sam, resolve_checkpoint
from infosam.sam2 import (
    SAM2_CONFIGS,
    PromptableSam2,
    build_sam2_model,
    infer_sam2_variant,
    load_sam2_checkpoint,
    meta_build_kwargs,
    meta_image_predictor,
    save_sam2_checkpoint,
)
from infosam.tuning import apply_tuning, merge_for_export


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_sam2_model("tiny")


def _image(h=200, w=260):
    rng = np.random.default_rng(0)
    img = rng.integers(30, 110, (h, w, 3), dtype=np.uint8)
    img[50:150, 80:200] += 120
    return img


def _predict(model, image, box):
    """Meta's image predictor, one box, the single-mask output as logits at original size."""
    predictor = meta_image_predictor(model)
    predictor.set_image(image)
    logits, scores, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
    return logits, scores


def test_tiny_sam2_builds_offline_with_sam2_shaped_features(tiny):
    assert tiny.image_size == 256 and not tiny.training
    with torch.no_grad():
        out = tiny.forward_image(torch.zeros(1, 3, 256, 256))
    # SAM 2's contract at the tiny width: 128-d image embeddings at stride 16 (Meta's variants:
    # 256), plus the decoder's high-res maps (C/8 at stride 4, C/4 at stride 8)
    shapes = [tuple(f.shape) for f in out["backbone_fpn"]]
    assert shapes == [(1, 16, 64, 64), (1, 32, 32, 32), (1, 128, 16, 16)]
    assert sum(p.numel() for p in tiny.parameters()) < 5_000_000  # shippable: < 10 MB in fp16
    assert any(n.endswith("attn.qkv") for n, _ in tiny.image_encoder.trunk.named_modules())


def test_meta_format_loads_strictly_and_a_wrong_file_is_named(tiny, tmp_path):
    path = tmp_path / "tiny.pt"
    save_sam2_checkpoint(tiny.state_dict(), path)
    other = build_sam2_model("tiny", path)
    assert all(torch.equal(v, other.state_dict()[k]) for k, v in tiny.state_dict().items())

    state = {k: v for k, v in tiny.state_dict().items() if k != "sam_mask_decoder.iou_token.weight"}
    state["extra.weight"] = torch.zeros(1)
    save_sam2_checkpoint(state, tmp_path / "broken.pt")
    with pytest.raises(CheckpointMismatchError) as err:
        load_sam2_checkpoint(build_sam2_model("tiny"), tmp_path / "broken.pt", "tiny")
    text = str(err.value)
    assert "'tiny'" in text and "sam_mask_decoder.iou_token.weight" in text
    assert "extra.weight" in text and "1 missing" in text and "1 unexpected" in text

    # Hiera-T weights are not the tiny model's: refused on shapes, naming the expected file
    save_sam2_checkpoint(build_sam2_model("hiera_t").state_dict(), tmp_path / "t.pt")
    with pytest.raises(CheckpointMismatchError, match="shape mismatches"):
        build_sam2_model("tiny", tmp_path / "t.pt")
    with pytest.raises(CheckpointMismatchError, match=re.escape("sam2.1_hiera_small.pt")):
        build_sam2_model("hiera_s", tmp_path / "t.pt")

    torch.save(build_sam("tiny").state_dict(), tmp_path / "sam1.pth")
    with pytest.raises(CheckpointMismatchError, match="looks like SAM 1 weights"):
        build_sam2_model("tiny", tmp_path / "sam1.pth")
    with pytest.raises(ValueError, match=re.escape("unknown SAM 2.1 variant 'hiera_x'")):
        build_sam2_model("hiera_x")


@pytest.mark.parametrize("method", ["decoder", "bitfit", "lora", "adapter", "full"])
def test_the_peft_menu_trains_the_right_tensors_of_hiera(method):
    model = build_sam2_model("tiny")
    report = apply_tuning(model, method=method, lora_rank=4)
    names = report.trainable_names
    assert 0 < report.trainable_params < report.total_params
    in_decoder = [n for n in names if n.startswith("sam_mask_decoder.")]
    if method == "decoder":
        assert names == in_decoder and len(in_decoder) == len(
            list(model.sam_mask_decoder.parameters())
        )
    elif method == "bitfit":
        assert all(n.endswith("bias") for n in names if n.startswith("image_encoder."))
    elif method == "adapter":  # blocks 2.. as the reference: adapters and their block's norms
        encoder = [n for n in names if n.startswith("image_encoder.")]
        adapters = [n for n in encoder if "Adapter_Series" in n]
        assert len(adapters) == 2 * 4 * (len(model.image_encoder.trunk.blocks) - 2)
        assert all(".norm" in n for n in set(encoder) - set(adapters))
        assert not any(n.startswith("image_encoder.trunk.blocks.1.") for n in encoder)
        with torch.no_grad():
            out = model.forward_image(torch.zeros(1, 3, 256, 256))
        assert out["vision_features"].shape == (1, 128, 16, 16)
    elif method == "lora":
        encoder = [n for n in names if n.startswith("image_encoder.")]
        assert encoder and all("lora_" in n and ".attn.qkv." in n for n in encoder)
        assert len(encoder) == 2 * len(model.image_encoder.trunk.blocks)  # A and B per block
    else:
        assert all(p.requires_grad for p in model.image_encoder.parameters())
    assert not any(n.startswith(("memory_", "sam_prompt_encoder")) for n in names)


def test_a_lora_student_exports_to_a_file_meta_build_sam2_predicts_with(tmp_path):
    # the embedded tiny SAM 2.1 teacher, LoRA-tuned; Meta's predictor via meta_image_predictor
    student = build_sam2_model("tiny", resolve_checkpoint("builtin:tiny_sam2_teacher"))
    image, box = _image(), np.array([70, 40, 210, 160])
    before = _predict(student, image, box)[0]
    assert 0.2 < (before > 0).mean() < 0.5  # the pre-trained teacher segments the square
    apply_tuning(student, method="lora", lora_rank=4)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)  # a visibly trained LoRA
    student.eval()
    path = tmp_path / "student.pt"
    save_sam2_checkpoint(merge_for_export(student), path)
    # Meta's own loader and predictor, given only the file and the variant's overrides
    plain = build_sam2(
        SAM2_CONFIGS["tiny"],
        str(path),
        device="cpu",
        **meta_build_kwargs("tiny"),  # the export message's arguments
    )
    lora_logits, lora_scores = _predict(student, image, box)
    plain_logits, plain_scores = _predict(plain, image, box)
    assert lora_logits.shape == (1, 200, 260)
    assert np.abs(lora_logits - before).mean() > 0.02  # the LoRA moved the logits (noise: 1e-5)
    assert np.abs(lora_logits - plain_logits).max() < 1e-3
    assert np.array_equal(lora_logits > 0, plain_logits > 0)
    assert np.allclose(lora_scores, plain_scores, atol=1e-5)
    # and the file holds the merged LoRA, not the base weights
    merged = torch.load(path, weights_only=True)["model"]
    key = "image_encoder.trunk.blocks.0.attn.qkv.weight"
    base = student.image_encoder.trunk.blocks[0].attn.qkv.base_layer.weight
    assert merged[key].shape == base.shape and not torch.allclose(merged[key], base)


@pytest.fixture(scope="module")
def hiera_t():
    torch.manual_seed(1)
    return build_sam2_model("hiera_t")


def _meta_predict(predictor, prompt):
    kwargs = {}
    if prompt.box is not None:
        kwargs["box"] = np.array(prompt.box)
    if prompt.points:
        kwargs["point_coords"] = np.array([p[:2] for p in prompt.points])
        kwargs["point_labels"] = np.array([p[2] for p in prompt.points])
    logits, scores, _ = predictor.predict(multimask_output=False, return_logits=True, **kwargs)
    return logits[0] > 0, float(scores[0])


@pytest.mark.parametrize("shape", [(200, 260), (300, 180)])
def test_segment_gives_meta_predictors_masks(hiera_t, shape):
    """The project's predictor on SAM 2.1 = Meta's SAM2ImagePredictor: square resize, box as
    two labelled points, high-res features, one bilinear step to the original size."""
    h, w = shape
    image = _image(h, w)
    prompts = [
        Prompt(box=[w * 0.2, h * 0.2, w * 0.8, h * 0.8]),
        Prompt(points=[[w / 2, h / 2, 1], [5, 5, 0]]),
        Prompt(box=[w * 0.1, h * 0.3, w * 0.7, h * 0.9], points=[[w / 2, h / 2, 1]]),
    ]
    ours = segment_image(PromptableSam2(hiera_t).eval(), image, prompts, batch_size=2)
    predictor = SAM2ImagePredictor(hiera_t)
    predictor.set_image(image)
    for prompt, (mask, score) in zip(prompts, ours, strict=True):
        expected, expected_score = _meta_predict(predictor, prompt)
        assert mask.shape == (h, w) and 0.05 < mask.mean() < 0.95
        assert np.array_equal(mask, expected), prompt
        assert score == pytest.approx(expected_score, abs=1e-5)


def test_the_embedded_teacher_is_small_and_as_skilled_as_its_card_says():
    """`builtin:tiny_sam2_teacher`: shipped in the package (<= 10 MB), loaded strictly from
    Meta's format, and its zero-shot box mIoU on `general` (16 of the card's 80 test images,
    the card's protocol) near the card's."""
    import json
    import os
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "experiments"))
    from pretrain_teacher import zero_shot

    path = resolve_checkpoint("builtin:tiny_sam2_teacher")
    assert os.path.getsize(path) <= 10 * 10**6
    card = json.loads(Path(path).with_suffix(".json").read_text())
    assert card["family"] == "sam2" and card["parameters"] == 3_549_794
    model = PromptableSam2(build_sam2_model("tiny", path)).eval()
    measured = zero_shot(model, "general", 16, "box", torch.device("cpu"))
    stated = card["zero_shot_miou_clean_protocol"]["general"]["box"]
    assert measured == pytest.approx(stated, abs=0.06) and measured > 0.7


def test_meta_predictor_runs_the_256_px_tiny_and_gives_our_masks(tiny):
    """Meta's SAM2ImagePredictor assumes 1024 px feature maps; `meta_image_predictor` sets them
    from the model, so the tiny variant (the embedded default's family) runs there too."""
    image = _image(180, 240)
    prompts = [Prompt(box=[50, 40, 190, 150]), Prompt(points=[[120, 90, 1], [5, 5, 0]])]
    ours = segment_image(PromptableSam2(tiny).eval(), image, prompts)
    predictor = meta_image_predictor(tiny)
    predictor.set_image(image)
    for prompt, (mask, score) in zip(prompts, ours, strict=True):
        expected, expected_score = _meta_predict(predictor, prompt)
        assert np.array_equal(mask, expected), prompt
        assert score == pytest.approx(expected_score, abs=1e-5)
    with pytest.raises(RuntimeError):  # what the fix is for: the stock predictor fails
        stock = SAM2ImagePredictor(tiny)
        stock.set_image(image)
        _meta_predict(stock, prompts[0])


def test_the_contract_the_losses_read():
    """Packed encoder output round-trips, the shapes InfoSAM reads, gradients reach LoRA."""
    model = PromptableSam2(build_sam2_model("tiny"))
    apply_tuning(model.sam, method="lora", lora_rank=4)
    images = torch.rand(2, 3, 256, 256) * 255
    boxes = torch.tensor([[40.0, 40, 200, 180], [10, 20, 120, 240]])
    packed = model.encode(images)
    assert packed.shape == (2, 4 * 128, 16, 16)
    model.train()
    out = model(images, boxes=boxes)
    assert out.image_embeddings.shape == (2, 128, 16, 16)
    assert out.low_res_logits.shape == (2, 1, 64, 64)
    assert out.iou_predictions.shape == (2, 1) and out.mask_tokens.shape == (2, 1, 128)
    again = model(image_embeddings=packed, boxes=boxes)
    assert torch.allclose(again.low_res_logits, out.low_res_logits, atol=1e-5)
    out.low_res_logits.mean().backward()
    grads = [p.grad for n, p in model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None for g in grads)
    with pytest.raises(ValueError, match="512 channels"):
        model(image_embeddings=packed[:, :256], boxes=boxes)


def test_the_variant_is_read_from_the_weights(tiny, hiera_t):
    assert infer_sam2_variant(tiny.state_dict()) == "tiny"
    assert infer_sam2_variant(hiera_t.state_dict()) == "hiera_t"
    with pytest.raises(CheckpointMismatchError, match="--variant"):
        infer_sam2_variant({"image_encoder.trunk.patch_embed.proj.weight": torch.zeros(8, 3)})


def test_checkpointed_hiera_blocks_give_identical_gradients():
    from infosam.speed import checkpoint_blocks

    def grads(checkpointed: bool):
        torch.manual_seed(0)
        sam = build_sam2_model("tiny")
        apply_tuning(sam, method="adapter")
        if checkpointed:
            checkpoint_blocks(sam)
            assert "Checkpointed" in type(sam.image_encoder.trunk.blocks[3]).__name__
        model = PromptableSam2(sam).train()
        torch.manual_seed(1)
        images = torch.rand(2, 3, 256, 256) * 255
        out = model(images, boxes=torch.tensor([[40.0, 40, 200, 180], [10, 20, 120, 240]]))
        out.low_res_logits.square().mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}

    plain, ckpt = grads(False), grads(True)
    assert plain.keys() == ckpt.keys() and any("Adapter_Series" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(ckpt[name], plain[name], msg=name)
