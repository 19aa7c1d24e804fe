"""Using a fine-tuned model: predict, export to plain SAM, import the reference release."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from segment_anything import SamPredictor

from infosam.engine import predict_logits
from infosam.prompts import PromptBatch
from infosam.reference import load_reference_relation, load_reference_student
from infosam.relation import RelationModule
from infosam.sam import (
    SAM_VARIANTS,
    CheckpointMismatchError,
    PromptableSam,
    _build_from_spec,
    build_sam,
    load_exported,
)
from infosam.transforms import prepare_pair
from infosam.tuning import TuningConfig, apply_tuning
from orchestrator.cli import main as cli
from orchestrator.train.checkpoints import save_checkpoint
from orchestrator.train.models import build_models
from orchestrator.train.worker import make_optimizer
from tests.helpers import train_config


def _checkpoint(tmp_path, data_root, method):
    """A training checkpoint directory whose trained tensors are visibly non-trivial."""
    cfg = train_config(tmp_path, data_root, f"tuning.method={method}")
    _, student, relation, _ = build_models(cfg)
    torch.manual_seed(3)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if p.requires_grad and ("lora_B" in name or "Adapter" in name):
                p.normal_(0, 0.02)
    opt, sched = make_optimizer(cfg, [p for p in student.parameters() if p.requires_grad], 10)
    d = tmp_path / f"ckpt_{method}"
    d.mkdir()
    save_checkpoint(
        str(d),
        student=student,
        relation=relation,
        opt=opt,
        sched=sched,
        epoch=0,
        history=[{"epoch": 0}],
        cfg=cfg,
        teacher_sha=None,
    )
    return d, student.eval()


def _images(tmp_path, sizes=((180, 240), (256, 200), (300, 300))):
    paths = []
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        img = rng.integers(40, 120, (h, w, 3), dtype=np.uint8)
        img[h // 4 : 3 * h // 4, w // 4 : 3 * w // 4] += 100
        p = tmp_path / f"img{i}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths


def _predict_with_box(ckpt, paths, out):
    """`infosam predict` on image files with the box every test here prompts with."""
    argv = ["predict", "--checkpoint", str(ckpt), "--images", *map(str, paths)]
    assert cli([*argv, "--box", "40,30,150,130", "--out", str(out)]) == 0


def test_predict_cli_equals_engine_predictions(tmp_path, synthetic_root):
    ckpt, student = _checkpoint(tmp_path, synthetic_root, "lora")
    paths = _images(tmp_path)
    _predict_with_box(ckpt, paths, tmp_path / "pred")
    for p in paths:
        arr = np.asarray(Image.open(p))
        h, w = arr.shape[:2]
        img, _, input_size = prepare_pair(arr, np.zeros((h, w), np.uint8), 256)
        s = 256 / max(h, w)
        prompts = PromptBatch(
            torch.tensor([[40 * s, 30 * s, 150 * s, 130 * s]]),
            None,
            None,
            torch.zeros(1, dtype=torch.bool),
        )
        logits = predict_logits(
            student, torch.from_numpy(img)[None], prompts, torch.tensor([input_size]), [(h, w)]
        )[0]
        expected = (logits > 0).numpy()
        got = np.asarray(Image.open(tmp_path / "pred" / f"{p.stem}_mask.png")) > 0
        assert got.shape == (h, w) and np.array_equal(got, expected)
        assert (tmp_path / "pred" / f"{p.stem}_overlay.png").is_file()


def test_several_objects_per_image_from_a_prompts_file(tmp_path, synthetic_root):
    """A list of prompts for one image: one mask per object, the same as prompting each alone,
    and one overlay with every object."""
    ckpt, _ = _checkpoint(tmp_path, synthetic_root, "lora")
    paths = _images(tmp_path)
    boxes = [[10, 10, 90, 80], [100, 60, 170, 170], [40, 30, 150, 130]]
    spec = {paths[0].name: [{"box": b} for b in boxes], paths[1].name: {"box": boxes[2]}}
    (tmp_path / "prompts.json").write_text(json.dumps(spec))
    base = ["predict", "--checkpoint", str(ckpt), "--batch-size", "2"]
    images = ["--images", str(paths[0]), str(paths[1])]
    args = [*base, *images, "--prompts", str(tmp_path / "prompts.json"), "--out"]
    assert cli([*args, str(tmp_path / "multi")]) == 0
    for k, b in enumerate(boxes):
        box = ",".join(map(str, b))
        one = tmp_path / f"one{k}"
        assert cli([*base, "--images", str(paths[0]), "--box", box, "--out", str(one)]) == 0
        alone = np.asarray(Image.open(one / f"{paths[0].stem}_mask.png"))
        together = np.asarray(Image.open(tmp_path / "multi" / f"{paths[0].stem}_{k}_mask.png"))
        assert np.array_equal(alone, together)
    names = sorted(p.name for p in (tmp_path / "multi").iterdir())
    assert names == sorted(
        [f"{paths[0].stem}_{k}_mask.png" for k in range(3)]
        + [
            f"{paths[0].stem}_overlay.png",
            f"{paths[1].stem}_mask.png",
            f"{paths[1].stem}_overlay.png",
        ]
    )


def test_prompts_file_and_points(tmp_path, synthetic_root):
    ckpt, _ = _checkpoint(tmp_path, synthetic_root, "decoder")
    paths = _images(tmp_path)
    spec = {p.name: {"points": [[100, 90, 1], [5, 5, 0]]} for p in paths}
    (tmp_path / "prompts.json").write_text(json.dumps(spec))
    assert (
        cli(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "--images",
                *map(str, paths),
                "--prompts",
                str(tmp_path / "prompts.json"),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert (
        cli(
            [
                "predict",
                "--checkpoint",
                str(ckpt),
                "--images",
                str(paths[0]),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )


def test_exported_lora_model_works_in_segment_anything_predictor(tmp_path, synthetic_root, capsys):
    ckpt, _ = _checkpoint(tmp_path, synthetic_root, "lora")
    out = tmp_path / "sam_finetuned.pth"
    assert cli(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "plain-sam" in capsys.readouterr().out
    plain = _build_from_spec(SAM_VARIANTS["tiny"])
    plain.load_state_dict(
        torch.load(out, weights_only=True), strict=True
    )  # segment-anything's classes
    predictor = SamPredictor(plain.eval())
    paths = _images(tmp_path)
    _predict_with_box(ckpt, paths, tmp_path / "ours")
    for p in paths:
        arr = np.asarray(Image.open(p))
        predictor.set_image(arr)
        masks, _, _ = predictor.predict(box=np.array([40, 30, 150, 130]), multimask_output=False)
        ours = np.asarray(Image.open(tmp_path / "ours" / f"{p.stem}_mask.png")) > 0
        inter, union = (masks[0] & ours).sum(), (masks[0] | ours).sum()
        assert union == 0 or inter / union > 0.97, (p.name, inter / union)


def test_adapter_export_is_self_contained(tmp_path, synthetic_root, capsys):
    ckpt, student = _checkpoint(tmp_path, synthetic_root, "adapter")
    out = tmp_path / "adapter.pth"
    assert cli(["export", "--checkpoint", str(ckpt), "--out", str(out)]) == 0
    assert "self-contained" in capsys.readouterr().out
    loaded = PromptableSam(load_exported(out))
    x = torch.randint(0, 255, (2, 3, 256, 256), dtype=torch.uint8)
    boxes = torch.tensor([[20.0, 20, 200, 180]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(
            loaded(x, boxes=boxes).low_res_logits, student(x, boxes=boxes).low_res_logits
        )


def _reference_student(prefix=""):
    torch.manual_seed(0)
    sam = build_sam("tiny")
    apply_tuning(sam, TuningConfig(method="adapter"))
    with torch.no_grad():
        for n, p in sam.named_parameters():
            if "Adapter" in n:
                p.normal_(0, 0.05)
    return sam, {prefix + k: v for k, v in sam.state_dict().items()}


@pytest.mark.parametrize("prefix,wrapped", [("", True), ("module.", False)])
def test_reference_release_maps_onto_our_adapter_student(tmp_path, prefix, wrapped):
    sam, state = _reference_student(prefix)
    assert any("Space_Adapter_Series.D_fc1.weight" in k for k in state)
    path = tmp_path / "reference.pth"
    torch.save({"model": state, "optimizer": {}, "epoch": 9} if wrapped else state, path)
    ours, tuning = load_reference_student(path, "tiny")  # strict: no missing/unexpected keys
    assert (
        tuning.method == "adapter"
        and tuning.adapter_blocks == [2, 3]
        and tuning.adapter_ratio == 0.25
    )
    x = torch.randint(0, 255, (2, 3, 256, 256), dtype=torch.uint8)
    boxes = torch.tensor([[20.0, 20, 200, 180]] * 2)
    with torch.no_grad():
        torch.testing.assert_close(
            PromptableSam(ours)(x, boxes=boxes).low_res_logits,
            PromptableSam(sam.eval())(x, boxes=boxes).low_res_logits,
        )


def test_unknown_reference_keys_fail_loudly(tmp_path):
    _, state = _reference_student()
    state["image_encoder.blocks.2.Space_Adapter_Parallel.D_fc1.weight"] = torch.zeros(32, 128)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(CheckpointMismatchError, match="Space_Adapter_Parallel"):
        load_reference_student(tmp_path / "bad.pth", "tiny")


def test_reference_relation_module(tmp_path):
    rm = RelationModule(256)
    torch.save(
        {"relation_model": rm.state_dict(), "relation_optimizer": {}, "relation_epoch": 3},
        tmp_path / "rel.pth",
    )
    loaded = load_reference_relation(tmp_path / "rel.pth")
    for k, v in rm.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v)


def test_evaluate_reference_checkpoint_cli(tmp_path, synthetic_root, capsys):
    _, state = _reference_student()
    torch.save({"model": state}, tmp_path / "reference.pth")
    code = cli(
        [
            "evaluate",
            "--reference",
            str(tmp_path / "reference.pth"),
            "--variant",
            "tiny",
            "--data",
            str(synthetic_root / "camouflage"),
            "--protocol",
            "paper",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    assert (
        out["count"] == 8
        and out["protocol"] == "paper"
        and out["tuning"] == "adapter"
        and 0 <= out["iou"] <= 1
    )


def test_predict_with_a_sam2_checkpoint_gives_meta_predictors_masks(tmp_path, capsys):
    """A SAM 2.1 file in Meta's format (the embedded tiny teacher's; the variant read from its
    shapes) predicts image files as Meta's predictor does."""
    from infosam.sam import resolve_checkpoint
    from infosam.sam2 import build_sam2_model, meta_image_predictor

    path = resolve_checkpoint("builtin:tiny_sam2_teacher")
    sam2 = build_sam2_model("tiny", path)
    paths = _images(tmp_path, sizes=((180, 240), (256, 200)))
    _predict_with_box(path, paths, tmp_path / "pred")
    predictor = meta_image_predictor(sam2)
    for path in paths:
        predictor.set_image(np.asarray(Image.open(path).convert("RGB")))
        masks, _, _ = predictor.predict(box=np.array([40, 30, 150, 130]), multimask_output=False)
        ours = np.asarray(Image.open(tmp_path / "pred" / f"{path.stem}_mask.png")) > 0
        assert 0.01 < ours.mean() < 0.99 and np.array_equal(ours, masks[0] > 0), path.name
