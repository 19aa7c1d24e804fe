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
from infosam.sam2 import (
    SAM2_CONFIGS,
    PromptableSam2,
    build_sam2_model,
    sam2_overrides,
    save_sam2_checkpoint,
)
from orchestrator.predict import export_checkpoint
from orchestrator.train.checkpoints import load_trained
from orchestrator.train.driver import fit
from tests.helpers import train_config

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def sam2_teacher(tmp_path):
    """A tiny SAM 2.1 in Meta's format (random weights: the mechanics, not the skill)."""
    torch.manual_seed(0)
    path = tmp_path / "sam2.1_tiny.pt"
    save_sam2_checkpoint(build_sam2_model("tiny").state_dict(), path)
    return path


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_a_sam2_student_trains_with_infosam_and_exports(
    ray_local, tmp_path, synthetic_root, sam2_teacher, method
):
    cfg = train_config(
        tmp_path,
        synthetic_root,
        "model.family=sam2",
        f"model.checkpoint={sam2_teacher}",
        f"tuning.method={method}",
        "scaling.num_workers=0",
        "optim.epochs=1",
        "tracking.log_model=null",
    )
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
    if kind == "sam2":  # LoRA merged: Meta's own builder reads the file
        assert "build_sam2" in why
        meta = build_sam2(
            SAM2_CONFIGS["tiny"],
            str(out),
            device="cpu",
            hydra_overrides_extra=sam2_overrides("tiny"),
        )
        again = segment_image(PromptableSam2(meta).eval(), image, prompts)
    else:  # adapters: the self-contained export
        from infosam.sam2 import load_exported

        module, family = load_exported(out)
        assert kind == "self-contained" and family == "sam2"
        again = segment_image(PromptableSam2(module), image, prompts)
    for (a, sa), (b, sb) in zip(ours, again, strict=True):
        assert np.array_equal(a, b) and sa == pytest.approx(sb, abs=1e-5)

    # the run's MLflow model: the same masks from the logged pyfunc
    import io

    import mlflow
    import pandas as pd
    from PIL import Image
    from pycocotools import mask as coco_mask

    logged = run.outputs.model_outputs[0].model_id
    where = client.get_logged_model(logged).artifact_location
    model = mlflow.pyfunc.load_model(where)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    box = [float(v) for v in prompts[0].box]  # the signature takes doubles
    rows = model.predict(pd.DataFrame({"image": [buf.getvalue()], "box": [box]}))
    row = rows.iloc[0] if hasattr(rows, "iloc") else rows[0]
    rle = {"size": [int(row["height"]), int(row["width"])], "counts": row["mask"].encode()}
    assert np.array_equal(coco_mask.decode(rle).astype(bool), ours[0][0])
