"""Files written before the house move (tests/fixtures/v1, commit d5ff1f6) still load and give
the numbers that code read from them."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.nn import functional as F

from infosam.engine import predict_logits
from infosam.prompts import PromptBatch
from infosam.sam import PromptableSam, checkpoint_sha256, load_exported, resolve_checkpoint
from orchestrator.config import BUILTIN_TEACHER
from orchestrator.data.codec import decode_image
from orchestrator.data.manifest import iter_rows, load_manifest
from orchestrator.data.teacher_cache import CacheKey, open_teacher_cache
from orchestrator.train.checkpoints import load_trained, read_history
from tests.helpers import ROOT

V1 = ROOT / "tests" / "fixtures" / "v1"
EXPECTED = json.loads((V1 / "expected.json").read_text())


@pytest.fixture(scope="module")
def v1(tmp_path_factory) -> Path:
    """A private copy: nothing a test does may touch the committed files."""
    root = tmp_path_factory.mktemp("v1")
    shutil.copytree(V1, root, dirs_exist_ok=True)
    return root


def _logits(model: torch.nn.Module) -> torch.Tensor:
    """The generator's probe: image s0 of its source, one box, 256 px input."""
    rng = np.random.default_rng(7)
    h, w = 48, 64
    img = rng.integers(30, 110, (h, w, 3), dtype=np.uint8)
    m = np.zeros((h, w), np.uint8)
    m[h // 4 : 3 * h // 4, w // 5 : 3 * w // 5] = 255
    img[m > 0] += 90
    x = torch.from_numpy(np.asarray(Image.fromarray(img))).permute(2, 0, 1).float()
    s = 256 / max(h, w)
    nh, nw = round(h * s), round(w * s)
    im = F.interpolate(x[None], (nh, nw), mode="bilinear", align_corners=False)
    im = F.pad(im, (0, 256 - nw, 0, 256 - nh))
    boxes = torch.tensor([[10.0, 10.0, 150.0, 140.0]])
    prompts = PromptBatch(boxes, None, None, torch.tensor([False]))
    return predict_logits(model, im, prompts, torch.tensor([[nh, nw]]), [(h, w)])[0]


def test_v1_dataset_reads_the_same_rows(v1):
    manifest = load_manifest(v1 / "dataset", verify=True)
    assert manifest["counts"] == EXPECTED["dataset"]["counts"]
    row = next(iter_rows(v1 / "dataset", "train"))
    image, _, _ = decode_image(row["image"])
    assert row["id"] == EXPECTED["dataset"]["first_train_id"]
    assert list(image.shape) == EXPECTED["dataset"]["first_train_shape"]
    assert int(image.astype(np.int64).sum()) == EXPECTED["dataset"]["first_train_sum"]


def test_v1_teacher_cache_is_still_valid(v1):
    teacher = resolve_checkpoint(BUILTIN_TEACHER)
    key = CacheKey("tiny", 256, "rgb", checkpoint_sha256(teacher))
    assert key.dirname == EXPECTED["teacher_cache"]["dir"]
    cache = open_teacher_cache(v1 / "dataset", "train", key)
    assert cache["rows"] == EXPECTED["teacher_cache"]["rows"]
    assert list(cache["embedding_shape"]) == EXPECTED["teacher_cache"]["embedding_shape"]


def test_v1_checkpoint_and_export_predict_what_they_did(v1):
    model, cfg, _ = load_trained(v1 / "checkpoint")
    assert cfg.tuning.method == "adapter"
    assert [h["epoch"] for h in read_history(v1 / "checkpoint")] == [0, 1]
    exported = PromptableSam(load_exported(v1 / "export.pth")).eval()
    for probe, want in ((model, "logits_checkpoint"), (exported, "logits_export")):
        logits = _logits(probe)
        assert float(logits.mean()) == pytest.approx(EXPECTED[want]["mean"], abs=1e-4)
        assert abs(int((logits > 0).sum()) - EXPECTED[want]["pos"]) <= 2
