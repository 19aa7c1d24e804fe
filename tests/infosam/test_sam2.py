"""SAM 2.1 models: built offline, Meta's checkpoint format loaded strictly and written back so
Meta's own `build_sam2` + `SAM2ImagePredictor` use a fine-tuned student, the PEFT menu on Hiera."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from sam2.build_sam import build_sam2
from sam2.sam2_image_predictor import SAM2ImagePredictor

from infosam.sam import CheckpointMismatchError, build_sam
from infosam.sam2 import (
    SAM2_CONFIGS,
    build_sam2_model,
    load_sam2_checkpoint,
    sam2_overrides,
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
    predictor = SAM2ImagePredictor(model)
    predictor.set_image(image)
    logits, scores, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
    return logits, scores


def test_tiny_sam2_builds_offline_with_sam2_shaped_features(tiny):
    assert tiny.image_size == 256 and not tiny.training
    with torch.no_grad():
        out = tiny.forward_image(torch.zeros(1, 3, 256, 256))
    # SAM 2's contract: 256-d image embeddings at stride 16, plus the decoder's high-res maps
    shapes = [tuple(f.shape) for f in out["backbone_fpn"]]
    assert shapes == [(1, 32, 64, 64), (1, 64, 32, 32), (1, 256, 16, 16)]
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


@pytest.mark.parametrize("method", ["decoder", "bitfit", "lora", "full"])
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
    elif method == "lora":
        encoder = [n for n in names if n.startswith("image_encoder.")]
        assert encoder and all("lora_" in n and ".attn.qkv." in n for n in encoder)
        assert len(encoder) == 2 * len(model.image_encoder.trunk.blocks)  # A and B per block
    else:
        assert all(p.requires_grad for p in model.image_encoder.parameters())
    assert not any(n.startswith(("memory_", "sam_prompt_encoder")) for n in names)


def test_adapters_on_hiera_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="lora, bitfit, decoder or full"):
        apply_tuning(build_sam2_model("tiny"), method="adapter")


def test_a_lora_student_exports_to_a_file_meta_build_sam2_predicts_with(tmp_path):
    # Hiera-T at 1024 px: Meta's SAM2ImagePredictor assumes 1024 px feature maps
    student = build_sam2_model("hiera_t")
    image, box = _image(), np.array([70, 40, 210, 160])
    before = _predict(student, image, box)[0]
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
        SAM2_CONFIGS["hiera_t"],
        str(path),
        device="cpu",
        hydra_overrides_extra=sam2_overrides("hiera_t"),
    )
    lora_logits, lora_scores = _predict(student, image, box)
    plain_logits, plain_scores = _predict(plain, image, box)
    assert lora_logits.shape == (1, 200, 260)
    assert ((lora_logits > 0) != (before > 0)).mean() > 0.005  # the LoRA moved the mask
    assert np.abs(lora_logits - plain_logits).max() < 1e-3
    assert np.array_equal(lora_logits > 0, plain_logits > 0)
    assert np.allclose(lora_scores, plain_scores, atol=1e-5)
    # and the file holds the merged LoRA, not the base weights
    merged = torch.load(path, weights_only=True)["model"]
    key = "image_encoder.trunk.blocks.0.attn.qkv.weight"
    base = student.image_encoder.trunk.blocks[0].attn.qkv.base_layer.weight
    assert merged[key].shape == base.shape and not torch.allclose(merged[key], base)
