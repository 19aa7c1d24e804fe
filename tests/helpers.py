"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from orchestrator.data.formats.coco import coco_mask

ROOT = Path(__file__).resolve().parents[1]  # the repository: tests live one level below
SMOKE = ROOT / "experiments" / "configs" / "smoke.yaml"
TUNE_SMOKE = ROOT / "experiments" / "configs" / "tune_smoke.yaml"


def train_config(tmp_path, data_root, *overrides: str):
    """The shipped smoke config pointed at test-local data, storage and MLflow store."""
    from orchestrator.config import load_config

    smoke = SMOKE
    base = [
        f"data.root={data_root}",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
        "tracking.experiment=test",
        "tracking.overlays=2",
        "optim.eval_batch_size=8",
        "tracking.log_model=false",  # 3-5 s a run; tests/train/test_training.py checks it
    ]
    return load_config(smoke, [*base, *overrides])


def signal_driver_when(cmd, env, ready, sig, *, wait_s: float = 240, settle_s: float = 0.0):
    """Run a driver process, poll `ready()` (truthy once it is mid-run) every second, then send
    `sig` and return (returncode, output, what `ready` returned). The process never outlives
    the call."""
    import subprocess
    import time

    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline, seen = time.time() + wait_s, None
        while time.time() < deadline and proc.poll() is None and not seen:
            time.sleep(1)
            seen = ready()
        if not seen:
            proc.kill()
            out, _ = proc.communicate(timeout=60)
            raise AssertionError(f"the driver never reached the point to signal:\n{out[-3000:]}")
        time.sleep(settle_s)
        proc.send_signal(sig)
        out, _ = proc.communicate(timeout=180)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(30)
    return proc.returncode, out, seen


def sweep_config(tmp_path, data_root, *extra: str, space: dict | None = None):
    """The shipped tune_smoke sweep (plus `space` axes) on test-local data, storage and MLflow."""
    import yaml

    from orchestrator.sweep import load_sweep

    data = yaml.safe_load(TUNE_SMOKE.read_text())
    data["tune"]["space"].update(space or {})
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(data))
    base = [
        f"data.root={data_root}",
        "data.dataset=camouflage",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
        "tracking.experiment=tune_test",
    ]
    return load_sweep(path, [*base, *extra])


def benchmark_args(tmp_path, data_root, name="reduced", *, retention=False) -> list[str]:
    """--set overrides of the demo for a one-dataset, one-seed, one-epoch benchmark (scored
    on the `general` retention set only when asked)."""
    values = [
        "benchmark.methods=[zero_shot,adapter_infosam]",
        "benchmark.datasets=[camouflage]",
        f"benchmark.retention=[{'general' if retention else ''}]",
        "benchmark.seeds=[0]",
        f"benchmark.name={name}",
        "optim.epochs=1",
        f"data.root={data_root}",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
    ]
    return [arg for value in values for arg in ("--set", value)]


def cache_key(**extra):
    """The teacher-cache key of the builtin tiny teacher at 256 px, RGB (fields overridable)."""
    from infosam.sam import checkpoint_sha256, resolve_checkpoint
    from orchestrator.config import BUILTIN_TEACHER
    from orchestrator.data.teacher_cache import CacheKey

    teacher = resolve_checkpoint(BUILTIN_TEACHER)
    fields = {"variant": "tiny", "image_size": 256, "channel_order": "rgb"}
    return CacheKey(**{**fields, "teacher_sha256": checkpoint_sha256(teacher), **extra})


# COCO instance datasets, written from scratch (tests/data and tests/e2e)
SIZES = [(96, 128), (112, 112), (128, 96)]  # (h, w) of the three COCO images


def textured_image(h, w, seed, masks=()):
    """Textured background with each object drawn brighter, so a model has something to learn."""
    rng = np.random.default_rng(seed)
    img = rng.integers(30, 90, (h, w, 3), dtype=np.uint8)
    for k, m in enumerate(masks):
        img[m.astype(bool)] = (200, 120 + 30 * (k % 4), 60)
    return img


def rect_mask(h, w, y0, x0, y1, x1):
    m = np.zeros((h, w), np.uint8)
    m[y0:y1, x0:x1] = 1
    return m


def coco_objects(h, w, i):
    """Four objects per image: two polygons (a rectangle, a triangle) and two RLE masks."""
    tri = [[8.0 + i, 8.0, 40.0, 8.0, 8.0, 40.0]]
    rect = [[50.0, 10.0, 80.0, 10.0, 80.0, 30.0, 50.0, 30.0]]
    r1 = rect_mask(h, w, h - 40, 10, h - 10, 40)
    r2 = rect_mask(h, w, h - 30, w - 30, h - 6, w - 6)
    compressed = mask_utils.encode(np.asfortranarray(r1))
    compressed["counts"] = compressed["counts"].decode()
    flat = r2.flatten(order="F")
    change = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    uncompressed = {"size": [h, w], "counts": ([0] if flat[0] else []) + runs}
    return [tri, rect, compressed, uncompressed]


def make_coco(root, *, extra_annotations=(), extra_images=(), seed=0):
    """3 images, 12 instances (6 polygon cells, 6 RLE nuclei), one crowd region; returns
    (json, images)."""
    images_dir = root / "images"
    images_dir.mkdir(parents=True)
    categories = [{"id": 1, "name": "cell"}, {"id": 2, "name": "nucleus"}]
    data = {"images": [], "annotations": [], "categories": categories}
    ann_id = 100
    for i, (h, w) in enumerate(SIZES):
        segs = coco_objects(h, w, i)
        masks = [coco_mask(s, h, w) for s in segs]
        Image.fromarray(textured_image(h, w, seed + i, masks)).save(images_dir / f"img{i}.png")
        data["images"].append({"id": i + 1, "file_name": f"img{i}.png", "height": h, "width": w})
        for k, s in enumerate(segs):  # polygons are cells, RLE masks nuclei
            ann = {"id": ann_id, "image_id": i + 1, "segmentation": s, "iscrowd": 0}
            data["annotations"].append(ann | {"category_id": 1 + k // 2})
            ann_id += 1
    crowd = mask_utils.encode(np.asfortranarray(rect_mask(*SIZES[0], 0, 0, 5, 5)))
    crowd["counts"] = crowd["counts"].decode()
    data["annotations"].append(
        {"id": 999, "image_id": 1, "category_id": 1, "segmentation": crowd, "iscrowd": 1}
    )
    data["images"] += list(extra_images)
    data["annotations"] += list(extra_annotations)
    path = root / "instances.json"
    path.write_text(json.dumps(data))
    return path, images_dir


def bucket_keys(client, prefix: str = "") -> list[str]:
    """Every object key under `prefix`, read with boto3 (not with the project's code)."""
    pages = client.get_paginator("list_objects_v2").paginate(Bucket="bkt", Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", []))
