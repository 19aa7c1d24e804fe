"""InfoSAM on SAM 2.1: a Hiera student trains against a SAM 2.1 teacher through the same
driver, its run logs an MLflow model, and its export is a file Meta's `build_sam2` loads with
the same masks as the trained student."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from mlflow import MlflowClient
from sam2.build_sam import build_sam2

from infosam.predictor import Prompt, segment_image
from infosam.sam import resolve_checkpoint
from infosam.sam2 import (
    SAM2_CONFIGS,
    PromptableSam2,
    build_sam2_model,
    meta_build_kwargs,
)
from orchestrator.predict import export_checkpoint, predict_dataset
from orchestrator.train.checkpoints import load_trained
from orchestrator.train.driver import fit
from tests.helpers import train_config

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def sam2_teacher():
    """The embedded tiny SAM 2.1 teacher (pre-trained on `general`), a file in Meta's format."""
    return resolve_checkpoint("builtin:tiny_sam2_teacher")


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_sam2_student_trains_with_infosam_and_exports(
    ray_local, tmp_path, synthetic_root, method
):
    cfg = train_config(
        tmp_path,
        synthetic_root,
        "model.family=sam2",  # alone: the embedded SAM 2.1 teacher, offline
        f"tuning.method={method}",
        "scaling.num_workers=0",
        "optim.epochs=1",
        "tracking.log_model=null",
    )
    assert cfg.model.checkpoint == "builtin:tiny_sam2_teacher"
    result = fit(cfg, quiet=True)
    m = result.metrics
    for key in ("train/loss", "train/compression", "train/distillation", "val/iou", "test/iou"):
        assert math.isfinite(m[key]), (key, m)
    assert m["train/compression"] != 0 and m["train/distillation"] != 0
    client = MlflowClient(result.tracking_uri)
    run = client.get_run(result.run_id)
    assert run.data.params["model.family"] == "sam2" and run.outputs.model_outputs

    checkpoint = sorted((tmp_path / "runs").rglob("checkpoint_epoch_*"))[-1]
    student, loaded_cfg, _ = load_trained(checkpoint)
    assert isinstance(student, PromptableSam2) and loaded_cfg.model.family == "sam2"
    out = tmp_path / "student.pt"
    kind, why = export_checkpoint(checkpoint, out)
    rng = np.random.default_rng(5)
    image = rng.integers(20, 120, (210, 300, 3), dtype=np.uint8)
    image[60:170, 90:240] += 110
    prompts = [Prompt(box=[80, 50, 250, 180]), Prompt(points=[[160, 110, 1]])]
    ours = segment_image(student, image, prompts)
    again = _exported_masks(kind, why, out, image, prompts)
    for (a, sa), (b, sb) in zip(ours, again, strict=True):
        assert np.array_equal(a, b) and sa == pytest.approx(sb, abs=1e-5)

    # a dataset split, each sample prompted from its own mask at SAM 2.1's square resolution
    split = predict_dataset(
        student, synthetic_root / "camouflage", "test", tmp_path / "pred", cfg=loaded_cfg
    )
    assert len(split) == 8 and all(0.0 <= e["iou"] <= 1.0 for e in split)

    # the run's MLflow model: the same masks from the logged pyfunc
    assert np.array_equal(_pyfunc_mask(client, run, image, prompts[0].box), ours[0][0])


def _exported_masks(kind, why, out, image, prompts):
    """The masks the exported file gives, loaded the way the export message says."""
    if kind == "sam2":  # LoRA merged: Meta's own builder reads the file
        assert "build_sam2" in why and "apply_postprocessing=False" in why
        meta = build_sam2(
            SAM2_CONFIGS["tiny"],
            str(out),
            device="cpu",
            **meta_build_kwargs("tiny"),  # the export message's arguments
        )
        return segment_image(PromptableSam2(meta).eval(), image, prompts)
    from infosam.sam2 import load_exported  # adapters: the self-contained export

    module, family = load_exported(out)
    assert kind == "self-contained" and family == "sam2"
    return segment_image(PromptableSam2(module), image, prompts)


def _pyfunc_mask(client, run, image, box):
    """The mask the run's logged MLflow model (pyfunc) predicts for one PNG and one box."""
    import io

    import mlflow
    import pandas as pd
    from PIL import Image
    from pycocotools import mask as coco_mask

    logged = run.outputs.model_outputs[0].model_id
    model = mlflow.pyfunc.load_model(client.get_logged_model(logged).artifact_location)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    box = [float(v) for v in box]  # the signature takes doubles
    rows = model.predict(pd.DataFrame({"image": [buf.getvalue()], "box": [box]}))
    row = rows.iloc[0] if hasattr(rows, "iloc") else rows[0]
    rle = {"size": [int(row["height"]), int(row["width"])], "counts": row["mask"].encode()}
    return coco_mask.decode(rle).astype(bool)


def test_a_sam2_teacher_cache_holds_the_packed_features_and_trains(
    ray_local, tmp_path, dataset, sam2_teacher
):
    """The cache pre-pass encodes SAM 2.1 at its square resolution and stores the embedding
    with the packed high-res maps; a run streams it (no teacher encoder per step)."""
    from orchestrator.data.reader import read_split, to_torch
    from orchestrator.data.teacher_cache import CacheKey, build_teacher_cache, open_teacher_cache
    from orchestrator.train.models import teacher_hash

    cfg = train_config(
        tmp_path,
        dataset,
        "model.family=sam2",
        f"model.checkpoint={sam2_teacher}",
        "tuning.method=lora",
        "scaling.num_workers=0",
        "optim.epochs=1",
        "speed.teacher_cache=true",
        "speed.checkpointing=true",
        "tracking.overlays=0",
    )
    key = CacheKey.for_config(cfg, teacher_hash(cfg))
    assert key.dirname.startswith("sam2-tiny-256-")
    meta = build_teacher_cache(
        dataset / "camouflage", ["train"], key, checkpoint=str(sam2_teacher), quiet=True
    )
    assert meta["embedding_shape"] == [512, 16, 16] and meta["family"] == "sam2"
    cache = open_teacher_cache(dataset / "camouflage", "train", key)
    ds = read_split(
        dataset / "camouflage", "train", image_size=256, teacher_cache=cache, square=True
    )
    batch = to_torch(ds.take_batch(4, batch_format="numpy"))
    teacher = PromptableSam2(build_sam2_model("tiny", sam2_teacher)).requires_grad_(False)
    with torch.no_grad():
        direct = teacher.encode(batch["image"])
    assert (batch["input_size"] == 256).all()  # square inputs: no padding
    torch.testing.assert_close(batch["teacher_embedding"].float(), direct, rtol=2**-8, atol=1e-3)

    result = fit(cfg, quiet=True)
    run = MlflowClient(result.tracking_uri).get_run(result.run_id)
    assert run.data.tags["infosam.teacher_cache"].endswith(key.dirname)
    assert result.history[0]["train/distillation"] != 0.0


def test_the_square_frame_round_trips_to_original_resolution(synthetic_root):
    """Images and masks resized to S x S (aspect ratio not kept), prompts drawn there, logits
    straight back to each image's size: a SAM 2.1 student that fits a few samples in that
    frame scores them at original resolution (a misplaced or flipped frame scores ~0)."""
    from infosam.engine import LossConfig, compute_losses, predict_scored
    from infosam.prompts import sample_prompts
    from orchestrator.data.manifest import iter_rows
    from orchestrator.data.reader import decode_batch

    rows = list(iter_rows(synthetic_root / "camouflage", "train"))[:4]
    cols = {k: np.array([r[k] for r in rows], dtype=object) for k in ("id", "image", "mask")}
    batch = decode_batch(cols, 256, "rgb", keep_original_mask=True, square=True)
    assert (batch["input_size"] == 256).all() and batch["image"].shape == (4, 3, 256, 256)
    images, masks = torch.from_numpy(batch["image"]), torch.from_numpy(batch["mask"])
    prompts = sample_prompts(masks, "box", generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    model = PromptableSam2(build_sam2_model("tiny")).train()
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    for _ in range(40):
        loss, _, _ = compute_losses(model, images, masks, prompts, LossConfig(infosam=False))
        opt.zero_grad()
        loss.backward()
        opt.step()
    sizes = [m.shape for m in batch["mask_original"]]
    logits, _ = predict_scored(
        model, prompts, torch.from_numpy(batch["input_size"]), sizes, images=images
    )
    ious = []
    for lg, gt in zip(logits, batch["mask_original"], strict=True):
        pred, gt = (lg > 0).numpy(), gt.astype(bool)
        assert pred.shape == gt.shape
        ious.append((pred & gt).sum() / max((pred | gt).sum(), 1))
    assert np.mean(ious) > 0.5, ious
