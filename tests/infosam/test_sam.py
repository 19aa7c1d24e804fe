import pytest
import torch

from infosam.sam import (
    CheckpointMismatchError,
    PromptableSam,
    build_sam,
    decode_masks,
    load_sam_state_dict,
)


def test_tiny_forward_shapes(tiny_sam, batch, box_prompts):
    model = PromptableSam(tiny_sam)
    images = batch["image"].repeat(2, 1, 1, 1)
    boxes = box_prompts.boxes.repeat(2, 1)
    with torch.no_grad():
        out = model(images, boxes=boxes)
    assert out.image_embeddings.shape == (8, 128, 16, 16)
    assert out.low_res_logits.shape == (8, 1, 64, 64)
    assert out.iou_predictions.shape == (8, 1)
    assert out.mask_tokens.shape == (8, 1, 128)


def test_batched_decoder_equals_stock_per_image_decoder(tiny_sam, batch, box_prompts):
    """Our batched decoder must give the stock decoder's logits, IoU and output token."""
    model = PromptableSam(tiny_sam).eval()
    with torch.no_grad():
        out = model(batch["image"], boxes=box_prompts.boxes)
        sam = tiny_sam
        for i in range(batch["image"].shape[0]):
            captured: list[torch.Tensor] = []
            h = sam.mask_decoder.transformer.register_forward_hook(
                lambda m, a, o, sink=captured: sink.append(o[0][:, 1:2])
            )
            sparse, dense = sam.prompt_encoder(
                points=None, boxes=box_prompts.boxes[i : i + 1], masks=None
            )
            logits, iou = sam.mask_decoder(
                image_embeddings=out.image_embeddings[i : i + 1],
                image_pe=sam.prompt_encoder.get_dense_pe(),
                sparse_prompt_embeddings=sparse,
                dense_prompt_embeddings=dense,
                multimask_output=False,
            )
            h.remove()
            torch.testing.assert_close(out.low_res_logits[i : i + 1], logits, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(out.iou_predictions[i : i + 1], iou, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(
                out.mask_tokens[i : i + 1], captured[0], atol=1e-5, rtol=1e-4
            )


def test_decode_masks_is_the_stock_single_mask_slice(tiny_sam):
    sam = tiny_sam
    emb = torch.randn(1, 128, 16, 16)
    sparse, dense = sam.prompt_encoder(
        points=None, boxes=torch.tensor([[5.0, 5, 60, 90]]), masks=None
    )
    with torch.no_grad():
        ours = decode_masks(sam.mask_decoder, emb, sam.prompt_encoder.get_dense_pe(), sparse, dense)
        stock = sam.mask_decoder(emb, sam.prompt_encoder.get_dense_pe(), sparse, dense, False)
    torch.testing.assert_close(ours[0], stock[0])


def test_point_and_box_and_both_prompts(tiny_sam, batch):
    model = PromptableSam(tiny_sam)
    b = batch["image"].shape[0]
    coords = torch.full((b, 2, 2), 100.0)
    labels = torch.tensor([[1, 0]] * b)
    boxes = torch.tensor([[50.0, 50, 150, 150]] * b)
    with torch.no_grad():
        for kwargs in (
            {"boxes": boxes},
            {"point_coords": coords, "point_labels": labels},
            {"boxes": boxes, "point_coords": coords, "point_labels": labels},
        ):
            assert model(batch["image"], **kwargs).low_res_logits.shape == (b, 1, 64, 64)
        with pytest.raises(ValueError, match="needs a prompt"):
            model(batch["image"])


def test_padding_is_zero_after_normalisation(tiny_sam):
    model = PromptableSam(tiny_sam)
    images = torch.full((1, 3, 256, 256), 200, dtype=torch.uint8)
    x = model.preprocess(images, torch.tensor([[100, 180]]))
    assert torch.all(x[:, :, 100:, :] == 0) and torch.all(x[:, :, :, 180:] == 0)
    assert torch.all(x[:, :, :100, :180] != 0)


def test_checkpoint_round_trip_and_strict_errors(tiny_sam, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    loaded = build_sam("tiny", path)
    for k, v in tiny_sam.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)
    # The reference training format {'model': state_dict} is accepted too.
    torch.save({"model": tiny_sam.state_dict(), "epoch": 3}, tmp_path / "wrapped.pth")
    build_sam("tiny", tmp_path / "wrapped.pth")

    broken = dict(tiny_sam.state_dict())
    broken.pop("mask_decoder.iou_token.weight")
    broken["image_encoder.extra.weight"] = torch.zeros(1)
    torch.save(broken, tmp_path / "broken.pth")
    with pytest.raises(CheckpointMismatchError) as err:
        build_sam("tiny", tmp_path / "broken.pth")
    assert "mask_decoder.iou_token.weight" in str(err.value)
    assert "image_encoder.extra.weight" in str(err.value)
    model = build_sam("tiny", tmp_path / "broken.pth", partial=True)
    key = "image_encoder.patch_embed.proj.weight"  # present: loaded from the file
    assert torch.equal(model.state_dict()[key], broken[key])
    missing, unexpected = load_sam_state_dict(build_sam("tiny"), broken, partial=True)
    assert missing == ["mask_decoder.iou_token.weight"] and unexpected == [
        "image_encoder.extra.weight"
    ]


def test_wrong_variant_checkpoint_names_the_shapes(tiny_sam, tmp_path):
    path = tmp_path / "tiny.pth"
    torch.save(tiny_sam.state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match="wrong variant"):
        build_sam("vit_b", path)


def test_missing_checkpoint_says_where_to_get_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sam_vit_b_01ec64\.pth"):
        build_sam("vit_b", tmp_path / "nope.pth")


def test_vit_b_is_segment_anything_official_architecture():
    from segment_anything import sam_model_registry

    ours = build_sam("vit_b")
    official = sam_model_registry["vit_b"]()
    assert {k: v.shape for k, v in ours.state_dict().items()} == {
        k: v.shape for k, v in official.state_dict().items()
    }
