"""`infosam predict --data --ray`: a split on Ray Data with a pool of model actors gives the
single-process masks, one results parquet per shard, and resumes without redoing shards."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from pycocotools import mask as coco_mask

from orchestrator.batch_predict import RESULT_SUFFIX, predict_split
from orchestrator.cli import main as cli
from orchestrator.data.synthetic import synthesize
from orchestrator.predict import load_model, predict_dataset
from tests.helpers import train_config
from tests.test_predict import _checkpoint

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """12 test images in 3 shards."""
    root = tmp_path_factory.mktemp("sharded")
    manifest = synthesize(
        root,
        ["camouflage"],
        seed=0,
        counts={"train": 2, "val": 2, "test": 12},
        sheets=False,
        shard_bytes=120_000,
    )["camouflage"]
    assert len([s for s in manifest["shards"] if s["split"] == "test"]) >= 3
    return root


def _decode(row: pd.Series) -> np.ndarray:
    rle = {"size": [int(row["height"]), int(row["width"])], "counts": row["mask"].encode()}
    return coco_mask.decode(rle).astype(bool)


def test_actor_pool_predicts_the_single_process_masks_and_resumes(
    ray_local, tmp_path, sharded, capsys
):
    ckpt, _ = _checkpoint(tmp_path, sharded, "lora")
    cfg = train_config(
        tmp_path, sharded, "data.eval_prompt=point"
    )  # random points: seeded per image
    data = sharded / "camouflage"
    out = tmp_path / "batch"
    summary = predict_split(str(ckpt), data, "test", out, cfg=cfg, actors=2)
    results = sorted(out.glob(f"*{RESULT_SUFFIX}"))
    assert len(results) == summary["shards"] >= 3 and summary["samples"] == 12
    frame = pd.concat([pd.read_parquet(p) for p in results], ignore_index=True)
    assert sorted(frame["shard"].unique()) == sorted(
        p.name.replace(RESULT_SUFFIX, ".parquet") for p in results
    )
    # the single-process path: the same prompts (drawn per image), the same masks
    model, _ = load_model(ckpt)
    single = predict_dataset(model, data, "test", tmp_path / "single", cfg=cfg)
    assert len(single) == len(frame) == 12
    by_id = frame.set_index("id")
    for entry in single:
        got = by_id.loc[entry["id"]]
        expected = np.asarray(Image.open(entry["mask"])) > 0
        assert np.array_equal(_decode(got), expected), entry["id"]
        assert got["prompt"] == entry["prompt"] and got["iou"] == pytest.approx(entry["iou"])
        assert got["score"] == pytest.approx(entry["score"], abs=1e-5)
    assert summary["mean_iou"] == pytest.approx(np.mean([e["iou"] for e in single]))

    # Interrupted after all but one shard: only that one runs again
    lost = results[1]
    before = {p: p.stat().st_mtime_ns for p in results if p != lost}
    kept = pd.read_parquet(lost)
    lost.unlink()
    capsys.readouterr()
    again = predict_split(str(ckpt), data, "test", out, cfg=cfg, actors=2)
    said = capsys.readouterr().out
    assert f"1 of {len(results)} shards to predict ({len(results) - 1} done earlier" in said
    assert f"[predict] {len(kept)}/{len(kept)} images" in said
    assert {p: p.stat().st_mtime_ns for p in before} == before
    pd.testing.assert_frame_equal(pd.read_parquet(lost), kept)
    assert again["images_this_run"] == len(kept) and again["samples"] == 12


def test_cli_predicts_a_dataset_on_ray(ray_local, tmp_path, sharded, capsys):
    ckpt, _ = _checkpoint(tmp_path, sharded, "adapter")
    data = sharded / "camouflage"
    argv = ["predict", "--checkpoint", str(ckpt), "--data", str(data), "--out", str(tmp_path / "o")]
    assert cli([*argv, "--ray", "--actors", "2"]) == 0
    said = capsys.readouterr().out
    assert "12 samples of split 'test'" in said and "[predict] 12/12 images" in said
    summary = json.loads((tmp_path / "o" / "summary.json").read_text())
    assert summary["samples"] == 12 and 0 <= summary["mean_iou"] <= 1
    first = pd.read_parquet(sorted((tmp_path / "o").glob(f"*{RESULT_SUFFIX}"))[0])
    assert set(first.columns) >= {"id", "image_id", "prompt", "iou", "score", "mask", "area"}
