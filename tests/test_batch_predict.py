"""`infosam predict --data --ray`: a split on Ray Data with a pool of model actors gives the
single-process masks, one results parquet per shard, and resumes without redoing shards."""

from __future__ import annotations

import json
from pathlib import Path

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
    summary = predict_split(str(ckpt), data, "test", out, cfg=cfg, actors=2, png=True)
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
    # --png: the very files the single-process path writes (masks, overlays, instance labels)
    local = {p.relative_to(tmp_path / "single"): p for p in (tmp_path / "single").rglob("*.png")}
    written = {p.relative_to(out): p for p in out.rglob("*.png")}
    assert len(local) == 12 + 2 * 12 and sorted(written) == sorted(local)
    assert all(written[k].read_bytes() == local[k].read_bytes() for k in local)

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


def _folder(root, names=("a.png", "b.jpg", "c.png", "d.png", "e.jpg")):
    """Image files of several sizes and formats, plus a file that is not an image."""
    root.mkdir(exist_ok=True)
    rng = np.random.default_rng(1)
    for i, name in enumerate(names):
        h, w = 160 + 24 * i, 220 - 16 * i
        img = rng.integers(30, 110, (h, w, 3), dtype=np.uint8)
        img[h // 5 : 4 * h // 5, w // 4 : 3 * w // 4] += 120
        Image.fromarray(img).save(root / name, quality=95)
    (root / "notes.txt").write_text("not an image")
    return root


def _prompts(names):
    """A box for most images, two objects of different kinds for one, points for another."""
    prompts = {n: {"box": [30, 25, 160, 140]} for n in names}
    prompts["b.jpg"] = [{"box": [20, 20, 120, 110]}, {"points": [[90, 80, 1], [10, 10, 0]]}]
    prompts["c.png"] = {"points": [[100, 90, 1]]}
    return prompts


def test_a_folder_of_images_on_ray_gives_the_local_files_and_resumes_by_image(
    ray_local, tmp_path, sharded, capsys
):
    ckpt, _ = _checkpoint(tmp_path, sharded, "lora")
    folder = _folder(tmp_path / "photos")
    names = ["a.png", "b.jpg", "c.png", "d.png", "e.jpg"]
    (tmp_path / "prompts.json").write_text(json.dumps(_prompts(names)))
    base = ["predict", "--checkpoint", str(ckpt), "--data", str(folder)]
    base += ["--prompts", str(tmp_path / "prompts.json"), "--batch-size", "1"]
    assert cli([*base, "--out", str(tmp_path / "local")]) == 0
    ray_args = ["--ray", "--actors", "2", "--png", "--images-per-part", "2"]
    assert cli([*base, "--out", str(tmp_path / "ray"), *ray_args]) == 0
    said = capsys.readouterr().out
    assert "6 masks of 5 images in 3 parts" in said and "[predict] 5/5 images" in said

    local = {p.name: p for p in (tmp_path / "local").glob("*.png")}
    assert sorted(local) == sorted(p.name for p in (tmp_path / "ray").glob("*.png"))
    assert len(local) == 6 + 5  # b.jpg's two objects: b_0_mask.png, b_1_mask.png
    for name, path in local.items():
        assert (tmp_path / "ray" / name).read_bytes() == path.read_bytes(), name
    parts = sorted((tmp_path / "ray").glob(f"part-*{RESULT_SUFFIX}"))
    assert [p.name[:10] for p in parts] == ["part-00000", "part-00001", "part-00002"]
    frame = pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)
    assert len(frame) == 6 and "file_data" not in frame
    for _, row in frame.iterrows():
        stem = Path(row["image"]).stem
        name = f"{stem}_{row['object']}_mask.png" if row["object"] >= 0 else f"{stem}_mask.png"
        assert np.array_equal(_decode(row), np.asarray(Image.open(local[name])) > 0), name
    assert json.loads(frame.set_index("id").loc[f"{folder}/c.png", "prompt"])["points"]

    # A lost part and a new image: only those three images run again
    lost, kept = parts[1], pd.read_parquet(parts[1])
    before = {p: p.stat().st_mtime_ns for p in parts if p != lost}
    lost.unlink()
    _folder(folder, ["f.png"])
    (tmp_path / "prompts.json").write_text(json.dumps(_prompts([*names, "f.png"])))
    assert cli([*base, "--out", str(tmp_path / "ray"), *ray_args]) == 0
    said = capsys.readouterr().out
    assert "3 of 6 images to predict (3 done earlier, skipped)" in said
    assert "7 masks of 6 images in 4 parts" in said
    assert {p: p.stat().st_mtime_ns for p in before} == before
    again = pd.concat(
        [pd.read_parquet(p) for p in (tmp_path / "ray").glob("part-0000[34]*")], ignore_index=True
    )
    assert sorted(again["image"].unique()) == sorted([*kept["image"].unique(), f"{folder}/f.png"])


def test_predict_refuses_a_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    argv = ["predict", "--checkpoint", str(tmp_path / "x.pth"), "--data", str(tmp_path / "empty")]
    assert cli([*argv, "--box", "1,1,5,5", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{tmp_path / 'empty'} holds no image files" in err and "manifest.json" in err


def test_a_folder_in_a_bucket_on_ray(ray_s3, s3, tmp_path, sharded, capsys):
    """Image files in s3://: listed, read by the actors, the same masks as local files."""
    ckpt, _ = _checkpoint(tmp_path, sharded, "bitfit")
    names = ["a.png", "b.jpg", "c.png"]
    folder = _folder(tmp_path / "photos", names)
    for name in names:
        s3.put_object(Bucket="bkt", Key=f"photos/{name}", Body=(folder / name).read_bytes())
    s3.put_object(Bucket="bkt", Key="photos/notes.txt", Body=b"not an image")
    (tmp_path / "prompts.json").write_text(json.dumps(_prompts(names)))
    base = ["predict", "--checkpoint", str(ckpt), "--prompts", str(tmp_path / "prompts.json")]
    assert cli([*base, "--data", str(folder), "--out", str(tmp_path / "local")]) == 0
    remote = ["--data", "s3://bkt/photos", "--out", str(tmp_path / "ray"), "--ray", "--png"]
    assert cli([*base, *remote, "--actors", "1"]) == 0
    assert "4 masks of 3 images in 1 part:" in capsys.readouterr().out
    frame = pd.read_parquet(tmp_path / "ray" / f"part-00000{RESULT_SUFFIX}")
    assert sorted(frame["image"].unique()) == [f"s3://bkt/photos/{n}" for n in names]
    for path in (tmp_path / "local").glob("*.png"):
        assert (tmp_path / "ray" / path.name).read_bytes() == path.read_bytes(), path.name
