"""Instance datasets: COCO (polygons, RLE) and 16-bit label images, the benchmarks' raw layouts,
per-instance training, evaluation and prediction."""

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import tifffile
from PIL import Image
from pycocotools import mask as mask_utils

from orchestrator.data.codec import IngestError
from orchestrator.data.formats.coco import coco_mask, ingest_coco
from orchestrator.data.formats.folders import assign_holdout, ingest_folders
from orchestrator.data.formats.labels import ingest_labels
from orchestrator.data.manifest import iter_rows, load_manifest, shard_paths
from orchestrator.data.reader import decode_batch
from tests.helpers import ROOT, SIZES, make_coco, rect_mask, textured_image


def _samples(dataset, split):
    """Decoded samples of a split (through the same decode the training pipeline uses)."""
    rows = list(iter_rows(dataset, split))
    cols = {}
    for k in ("id", "image", "mask", "source", "instance_ids", "instance_masks"):
        cols[k] = np.empty(len(rows), dtype=object)
        for i, r in enumerate(rows):
            cols[k][i] = r[k]
    return decode_batch(cols, 128, keep_original_mask=True)


def test_coco_polygons_and_rle_become_one_sample_per_instance(tmp_path):
    src, images = make_coco(tmp_path / "src")
    m = ingest_coco(src, tmp_path / "out", "cells", images_dir=images)
    assert m["kind"] == "instances" and m["format"] == "coco"
    assert m["counts"] == {"train": 12} and m["images"] == {"train": 3}
    assert m["rejected"] == [] and m["categories"] == {"cell": 6, "nucleus": 6}
    assert [s["source"] for s in m["skipped"]] == ["instances.json annotation id=999"]
    # image bytes once per image: three parquet rows, twelve instance masks
    table = pq.read_table(shard_paths(tmp_path / "out" / "cells", "train"))
    assert table.num_rows == 3
    assert sum(len(v) for v in table.column("instance_masks").to_pylist()) == 12
    assert table.column("mask").null_count == 3
    # every decoded instance is exactly the object it was drawn from
    data = json.loads(src.read_text())
    by_id = {a["id"]: a for a in data["annotations"]}
    sizes = {im["file_name"].split(".")[0]: (im["height"], im["width"]) for im in data["images"]}
    out = _samples(tmp_path / "out" / "cells", "train")
    assert len(out["id"]) == 12
    for sid, image_id, original in zip(out["id"], out["image_id"], out["mask_original"]):
        image, ann = sid.split("#")
        assert image == image_id
        want = coco_mask(by_id[int(ann)]["segmentation"], *sizes[image])
        np.testing.assert_array_equal(original, want)
    # the same input gives the same bytes
    again = ingest_coco(src, tmp_path / "again", "cells", images_dir=images)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]
    assert (tmp_path / "again/cells/manifest.json").read_text().replace("again", "out") == (
        tmp_path / "out/cells/manifest.json"
    ).read_text()


def test_coco_small_instances_are_flagged_and_holdout_moves_whole_images(tmp_path):
    src, images = make_coco(tmp_path / "src")
    m = ingest_coco(
        src,
        tmp_path / "out",
        "cells",
        images_dir=images,
        min_area=700,  # some objects of each image are smaller
        holdout={"val": 1, "test": 1},
    )
    assert m["images"] == {"test": 1, "train": 1, "val": 1}
    assert m["counts"] == {"test": 4, "train": 4, "val": 4}
    flagged = sum(m["flags"][s].get("small_instance", 0) for s in m["flags"])
    areas, flags = [], []
    for split in ("train", "val", "test"):
        for row in iter_rows(tmp_path / "out" / "cells", split):
            for mask, f in zip(row["instance_masks"], row["instance_flags"]):
                areas.append(int((np.asarray(Image.open(io.BytesIO(mask))) > 0).sum()))
                flags.append(f)
    assert flags == [["small_instance"] if a < 700 else [] for a in areas]
    assert 0 < flagged == sum(a < 700 for a in areas) < 12
    for split in ("train", "val", "test"):
        images_of = {r["id"] for r in iter_rows(tmp_path / "out" / "cells", split)}
        assert len(images_of) == 1
    assert assign_holdout(["a", "b", "c", "d"], {"val": 0.5}) == assign_holdout(
        ["d", "c", "b", "a"], {"val": 0.5}
    )
    with pytest.raises(IngestError, match="leaves none for training"):
        assign_holdout(["a", "b"], {"val": 1, "test": 1})


def test_coco_every_rejection_reason_is_recorded(tmp_path):
    h, w = SIZES[0]
    good_rle = mask_utils.encode(np.asfortranarray(rect_mask(h, w, 10, 10, 30, 30)))
    good_rle["counts"] = good_rle["counts"].decode()
    wrong_size = mask_utils.encode(np.asfortranarray(rect_mask(h + 1, w, 10, 10, 30, 30)))
    wrong_size["counts"] = wrong_size["counts"].decode()
    poly = [[10.0, 10.0, 30.0, 10.0, 30.0, 30.0]]

    def ann(i, image_id, seg):
        return {"id": i, "image_id": image_id, "category_id": 1, "segmentation": seg, "iscrowd": 0}

    extra = [
        ann(500, 77, poly),  # unknown image id
        ann(501, 1, [[1.0, 2.0, 3.0, 4.0]]),  # 2 points: degenerate
        ann(502, 1, [[5.0, 5.0, 20.0, 20.0, 40.0, 40.0]]),  # collinear: no area
        ann(503, 1, wrong_size),  # RLE of another size
        ann(100, 2, poly),  # duplicate annotation id (100 is the first of image 1)
        ann(504, 10, poly),  # image file missing
        ann(505, 11, poly),  # image file unreadable
        ann(506, 11, good_rle),
        ann(507, 1, {"counts": [1, 2]}),  # not a segmentation
        ann(508, 1, poly) | {"category_id": 42},  # a category the file does not list
        ann(509, 1, {"size": [h, w], "counts": [h * w]}),  # an RLE without foreground
    ]
    extra_images = [
        {"id": 10, "file_name": "gone.png", "height": h, "width": w},
        {"id": 11, "file_name": "broken.png", "height": h, "width": w},
    ]
    src, images = make_coco(tmp_path / "src", extra_annotations=extra, extra_images=extra_images)
    (images / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    m = ingest_coco(src, tmp_path / "out", "cells", images_dir=images)
    reasons = {r["source"].split("id=")[1]: r["reason"] for r in m["rejected"]}
    assert reasons["500"].startswith("unknown image id 77")
    assert reasons["501"].startswith("degenerate polygon: part 0 has 4 coordinates")
    assert reasons["502"].startswith("degenerate polygon: it encloses no pixel")
    assert reasons["503"].startswith(f"RLE size {w}x{h + 1} differs from image size {w}x{h}")
    assert reasons["100"].startswith("duplicate annotation id 100 (first at annotations[0])")
    assert reasons["504"].startswith("image file not found") and "gone.png" in reasons["504"]
    assert "unreadable" in reasons["505"] and "broken.png" in reasons["505"]
    assert "unreadable" in reasons["506"]
    assert reasons["507"].startswith("segmentation is neither")
    assert reasons["508"].startswith("unknown category id 42")
    assert reasons["509"].startswith("empty RLE")
    assert [r["row"] for r in m["rejected"]] == list(range(13, 24))  # in file order
    # three decoding threads: the same rejects in the same order, the same shard bytes
    m3 = ingest_coco(src, tmp_path / "w3", "cells", images_dir=images, workers=3)
    assert m3 == m
    # nothing lost: every annotation is a sample, a reject or a skipped crowd region
    total = len(json.loads(src.read_text())["annotations"])
    assert sum(m["counts"].values()) + len(m["rejected"]) + len(m["skipped"]) == total
    assert m["counts"] == {"train": 12}


def test_coco_one_file_per_split(tmp_path, capsys):
    """COCO ships a file per split: `--also SPLIT FILE IMAGES` adds them to one dataset; ids may
    restart per file, and an image listed in two splits is caught."""
    from orchestrator.cli import main as cli

    train, images = make_coco(tmp_path / "train")
    val, val_images = make_coco(tmp_path / "val", seed=10)  # the same annotation ids
    data = json.loads(val.read_text())
    for entry in data["images"]:
        (val_images / entry["file_name"]).rename(val_images / f"v_{entry['file_name']}")
        entry["file_name"] = f"v_{entry['file_name']}"
    shutil.copy(images / "img2.png", val_images / "copy_of_train.png")
    data["images"][2]["file_name"] = "copy_of_train.png"  # a training image, renamed
    val.write_text(json.dumps(data))
    args = ["data", "ingest", "--format", "coco", str(train), str(images), str(tmp_path / "d")]
    assert cli([*args, "--name", "c", "--also", "val", str(val), str(val_images)]) == 0
    m = load_manifest(tmp_path / "d" / "c")
    assert m["counts"] == {"train": 12, "val": 12} and m["images"] == {"train": 3, "val": 3}
    assert [s["split"] for s in m["sources"]] == ["train", "val"] and m["rejected"] == []
    assert m["duplicates_across_splits"] == [
        {"id": "copy_of_train", "split": "val", "same_bytes_as": "img2", "in_split": "train"}
    ]
    assert "warning: 1 image(s) have identical bytes in two splits" in capsys.readouterr().out
    # a file listed twice is one id: the second listing's annotations are rejected
    again = json.loads(val.read_text())
    again["images"][1]["file_name"] = again["images"][0]["file_name"]
    val.write_text(json.dumps(again))
    assert cli([*args, "--name", "c", "--also", "val", str(val), str(val_images)]) == 0
    m = load_manifest(tmp_path / "d" / "c")
    assert [r["reason"].split(" [")[0] for r in m["rejected"]] == [
        "duplicate id 'v_img0' (first seen in split 'val')"
    ] * 4
    assert [r["source"] for r in m["rejected"]] == [
        f"instances.json annotation id={i}" for i in (104, 105, 106, 107)
    ]
    capsys.readouterr()
    assert cli([*args, "--also", "train", str(val), str(val_images)]) == 2
    assert "needs its own split" in capsys.readouterr().err


def test_coco_input_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(IngestError, match=r"bad\.json is not JSON"):
        ingest_coco(bad, tmp_path / "out", images_dir=tmp_path)
    bad.write_text(json.dumps({"annotations": []}))
    with pytest.raises(IngestError, match="no 'images' list"):
        ingest_coco(bad, tmp_path / "out", images_dir=tmp_path)
    assert not (tmp_path / "out" / "bad").exists()


def _labels(h, w, ids, seed):
    lab = np.zeros((h, w), np.uint16)
    for k, v in enumerate(ids):
        y, x = 8 + (k // 2) * 40, 8 + (k % 2) * 50
        lab[y : y + 30, x : x + 36] = v
    return lab


def make_label_folder(root):
    """images/ + labels/: 16-bit PNG, 16-bit TIFF and palette PNG label images with
    non-contiguous ids; one image is a 16-bit grey TIFF (microscopy)."""
    (root / "images").mkdir(parents=True)
    (root / "labels").mkdir()
    ids = {"a": [1, 7, 300, 1000], "b": [2, 65535, 9], "c": [5, 6, 40000, 41000], "d": [3, 4, 8]}
    for i, (stem, values) in enumerate(ids.items()):
        lab = _labels(128, 112, values, i)
        image = textured_image(128, 112, i, [lab == v for v in values])
        if stem == "c":
            tifffile.imwrite(root / "images" / "c.tif", image[..., 0].astype(np.uint16) * 257)
        else:
            Image.fromarray(image).save(root / "images" / f"{stem}.png")
        if stem == "b":
            tifffile.imwrite(root / "labels" / f"{stem}.tif", lab)
        elif stem == "d":  # 8-bit palette PNG: the ids are the palette indices
            pal = Image.fromarray(lab.astype(np.uint8), mode="P")
            pal.putpalette([c for k in range(256) for c in (k * 7 % 256, k * 13 % 256, 90)])
            pal.save(root / "labels" / "d.png")
        else:
            Image.fromarray(lab).save(root / "labels" / f"{stem}.png")
    return ids


def test_label_images_16bit_png_and_tiff(tmp_path):
    ids = make_label_folder(tmp_path / "src")
    assert Image.open(tmp_path / "src/labels/a.png").mode.startswith("I")  # really 16-bit
    assert Image.open(tmp_path / "src/labels/d.png").mode == "P"
    m = ingest_labels(tmp_path / "src", tmp_path / "out", "nuclei", min_area=0)
    assert m["kind"] == "instances" and m["rejected"] == []
    assert m["flags"]["train"] == {"converted_uint16": 1, "reencoded_TIFF": 1}
    assert m["counts"] == {"train": 14} and m["images"] == {"train": 4}
    out = _samples(tmp_path / "out" / "nuclei", "train")
    got = sorted(out["id"])
    assert got == sorted(f"{s}#{v}" for s, vs in ids.items() for v in vs)
    for sid, original in zip(out["id"], out["mask_original"]):
        stem, value = sid.split("#")
        k = ids[stem].index(int(value))
        np.testing.assert_array_equal(original, _labels(128, 112, ids[stem], 0) == ids[stem][k])
    again = ingest_labels(tmp_path / "src", tmp_path / "again", "nuclei", min_area=0)
    assert [s["sha256"] for s in again["shards"]] == [s["sha256"] for s in m["shards"]]


def test_label_image_rejections(tmp_path):
    make_label_folder(tmp_path / "src")
    labels = tmp_path / "src" / "labels"
    Image.fromarray(np.zeros((128, 112), np.uint16)).save(labels / "a.png")  # empty
    Image.fromarray(np.ones((64, 112), np.uint16)).save(labels / "c.png")  # wrong size
    (labels / "d.png").unlink()
    tifffile.imwrite(labels / "d.tif", np.ones((5, 128, 112), np.uint16) * 2)  # a stack
    Image.fromarray(np.ones((128, 112), np.uint8)).save(tmp_path / "src/images/e.png")  # no label
    for stem in ("f", "g"):
        Image.fromarray(textured_image(128, 112, 0)).save(tmp_path / f"src/images/{stem}.png")
    Image.fromarray(textured_image(128, 112, 1)).save(labels / "f.png")  # an RGB picture, not ids
    tifffile.imwrite(labels / "g.tif", np.full((128, 112), 1.5, np.float32))
    m = ingest_labels(tmp_path / "src", tmp_path / "out", "nuclei")
    reasons = {r["source"].rsplit("/", 1)[1]: r["reason"] for r in m["rejected"]}
    assert reasons["a.png"].startswith("empty label image")
    assert reasons["c.tif"].startswith("label image size 112x64 differs from image size 112x128")
    assert "stack or volume" in reasons["d.png"]
    assert reasons["e.png"].startswith("no mask with stem 'e'")
    assert reasons["f.png"].startswith("label image is a colour image whose channels differ")
    assert reasons["g.png"].startswith("label image has non-integer values")
    assert m["counts"] == {"train": 3}  # b's three labels
    assert ingest_labels(tmp_path / "src", tmp_path / "w3", "nuclei", workers=3) == m


def _tree(root, files):
    for rel in files:
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if any(k in rel.lower() for k in ("mask", "gt", "segmentation")):
            arr = np.zeros((40, 48), np.uint8)
            arr[10:30, 10:30] = 255
            Image.fromarray(arr).save(p, quality=95)  # JPEG masks (Kvasir) come out near-binary
        else:
            Image.fromarray(textured_image(40, 48, len(rel))).save(p)


@pytest.mark.parametrize(
    ("preset", "files", "counts"),
    [
        (
            "kvasir",
            ["images/cju0qkwl35piu0993l0dewei2.jpg", "masks/cju0qkwl35piu0993l0dewei2.jpg"],
            {"train": 1},
        ),
        (
            "isic2017",
            [
                "ISIC-2017_Training_Data/ISIC_0000000.jpg",
                "ISIC-2017_Training_Data/ISIC_0000000_superpixels.png",
                "ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png",
                "ISIC-2017_Validation_Data/ISIC_0001769.jpg",
                "ISIC-2017_Validation_Part1_GroundTruth/ISIC_0001769_segmentation.png",
                "ISIC-2017_Test_v2_Data/ISIC_0012086.jpg",
                "ISIC-2017_Test_v2_Part1_GroundTruth/ISIC_0012086_segmentation.png",
            ],
            {"train": 1, "val": 1, "test": 1},
        ),
        (
            "camo",
            [
                "Images/Train/camourflage_00001.jpg",
                "Images/Test/camourflage_00002.jpg",
                "GT/camourflage_00001.png",
                "GT/camourflage_00002.png",
            ],
            {"train": 1, "test": 1},
        ),
        (
            "cod10k",
            [
                "Train/Image/COD10K-CAM-1-Aquatic-1-BatFish-1.jpg",
                "Train/Image/COD10K-NonCAM-5-Background-1-Barrier-1.jpg",
                "Train/GT_Object/COD10K-CAM-1-Aquatic-1-BatFish-1.png",
                "Test/Image/COD10K-CAM-1-Aquatic-3-Crab-32.jpg",
                "Test/GT_Object/COD10K-CAM-1-Aquatic-3-Crab-32.png",
            ],
            {"train": 1, "test": 1},
        ),
    ],
)
def test_benchmark_presets_on_their_raw_naming(tmp_path, preset, files, counts):
    _tree(tmp_path / "src", files)
    m = ingest_folders(tmp_path / "src", tmp_path / "out", preset, preset=preset)
    assert m["rejected"] == []
    assert m["counts"] == counts


def test_mask_name_pattern_and_missing_folders(tmp_path):
    _tree(tmp_path / "src", ["pics/x1.jpg", "pics/x2.jpg", "gt/x1_gt.png", "gt/x3_gt.png"])
    m = ingest_folders(
        tmp_path / "src",
        tmp_path / "out",
        "p",
        images="pics",
        masks="gt",
        mask_name="{stem}_gt.png",
    )
    assert m["counts"] == {"train": 1}
    reasons = sorted(r["reason"] for r in m["rejected"])
    assert reasons[0].startswith("mask without an image (masks are named {stem}_gt.png")
    assert reasons[1].startswith("no mask named 'x2_gt.png'")
    with pytest.raises(IngestError, match="does not match the layout"):
        ingest_folders(tmp_path / "src", tmp_path / "out", preset="isic2017")
    with pytest.raises(IngestError, match="unknown preset"):
        ingest_folders(tmp_path / "src", tmp_path / "out", preset="nope")


def test_cli_ingests_coco_and_labels(tmp_path):
    src, images = make_coco(tmp_path / "coco")
    make_label_folder(tmp_path / "lab")
    run = [sys.executable, "-m", "orchestrator.cli", "data", "ingest"]
    out = subprocess.run(
        [*run, "--format", "coco", str(src), str(images), str(tmp_path / "data"), "--name", "c"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "dataset c (instances): train=12 instances in 3 images" in out
    assert "skipped: 1 (iscrowd=1)" in out
    # --category keeps one class; the others' annotations are skipped and listed, a typo fails
    picked = [*run, "--format", "coco", str(src), str(images), str(tmp_path / "data")]
    out = subprocess.run(
        [*picked, "--name", "n", "--category", "nucleus"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert "train=6 instances in 3 images" in out.stdout
    assert "skipped: 7 (category not selected=6, iscrowd=1)" in out.stdout
    m = load_manifest(tmp_path / "data" / "n")
    assert m["categories"] == {"nucleus": 6} and m["selected_categories"] == ["nucleus"]
    assert "category 'cell' not selected" in m["skipped"][0]["reason"]
    assert not [s for s in _samples(tmp_path / "data" / "n", "train")["id"] if s.endswith("#100")]
    typo = subprocess.run(
        [*picked, "--name", "t", "--category", "Nucleus"], capture_output=True, text=True
    )
    assert typo.returncode == 2 and not (tmp_path / "data" / "t").exists()
    assert "--category 'Nucleus': not a category of" in typo.stderr
    assert "(its categories: cell, nucleus)" in typo.stderr
    out = subprocess.run(
        [
            *run,
            "--format",
            "labels",
            str(tmp_path / "lab"),
            str(tmp_path / "data"),
            "--holdout",
            "test=1",
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "in 3 images" in out and "test=" in out
    assert load_manifest(tmp_path / "data" / "lab")["holdout"] == {"test": 1.0}
    bad = subprocess.run(
        [*run, "--format", "coco", str(src), str(tmp_path / "data")], capture_output=True, text=True
    )
    assert bad.returncode == 2 and "takes SRC.json IMAGES_DIR OUT" in bad.stderr


@pytest.mark.timeout(420)
@pytest.mark.parametrize(
    "fmt",
    ["coco", pytest.param("labels", marks=pytest.mark.slow)],  # labels: + teacher cache
)
def test_train_evaluate_predict_per_instance(ray_local, tmp_path, fmt, capsys):
    """`infosam data ingest` -> `infosam train` -> `infosam evaluate` -> `infosam predict`, every
    number a mean over instances, each instance prompted from its own mask."""
    from mlflow.tracking import MlflowClient

    from orchestrator.cli import main as cli
    from orchestrator.tracking.runs import default_tracking_uri

    data = tmp_path / "data"
    if fmt == "coco":
        src, images = make_coco(tmp_path / "src")
        args = [str(src), str(images), str(data)]
        extra = ["scaling.num_workers=0"]  # Train's local mode: the quick default-suite run
    else:  # two DDP workers (the Grams span both workers' instances) and the teacher cache
        make_label_folder(tmp_path / "src")
        args = [str(tmp_path / "src"), str(data)]
        extra = ["speed.teacher_cache=true", "data.augment=none"]
    holdout = ["--holdout", "val=1", "--holdout", "test=1"]
    assert cli(["data", "ingest", "--format", fmt, *args, "--name", "inst", *holdout]) == 0
    manifest = load_manifest(data / "inst")
    smoke = ROOT / "experiments" / "configs" / "smoke.yaml"
    sets = [
        f"data.root={data}",
        "data.dataset=inst",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
        "tracking.experiment=instances",
        "optim.epochs=2",
        "optim.batch_size=2",
        *extra,
    ]
    capsys.readouterr()
    assert cli(["train", "--config", str(smoke), *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    checkpoint = out.split("[infosam] checkpoint: ")[1].split()[0]
    logged = json.loads(out.split("[infosam] finished: ")[1].splitlines()[0])
    # MLflow says what the numbers are means over
    client = MlflowClient(default_tracking_uri(str(tmp_path / "runs")))
    exp = client.get_experiment_by_name("instances")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.data.tags["infosam.eval_unit"] == "instance"
    test_split = manifest["counts"]["test"]
    assert run.data.params["data.test_instances"] == str(test_split)
    assert run.data.params["data.test_images"] == "1"
    # evaluate: the checkpoint gives the logged test numbers, over the test instances
    assert cli(["evaluate", "--checkpoint", checkpoint, "--data", str(data / "inst")]) == 0
    ev = json.loads(capsys.readouterr().out)
    assert ev["unit"] == "instance" and ev["count"] == test_split
    assert ev["iou"] == pytest.approx(logged["test/iou"], abs=1e-4)
    # per category: the instances split by class, the overall mean their weighted mean
    per = ev["per_category"]
    names = {"coco": {"cell", "nucleus"}, "labels": {"object"}}[fmt]
    assert set(per) == names and sum(c["instances"] for c in per.values()) == test_split
    weighted = sum(c["iou"] * c["instances"] for c in per.values()) / test_split
    assert weighted == pytest.approx(ev["iou"], abs=1e-6)
    macro = run.data.metrics["test/macro_iou"]
    assert macro == pytest.approx(np.mean([c["iou"] for c in per.values()]), abs=1e-4)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "scores")}
    artifacts |= {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"scores/per_category.csv", "scores/per_category.md"} <= artifacts
    assert "plots/per_category.png" in artifacts
    table = client.download_artifacts(run.info.run_id, "scores/per_category.md", str(tmp_path))
    text = Path(table).read_text()
    assert "| **mean over categories** |" in text
    assert all(f"| {name} | {per[name]['instances']} | 1 |" in text for name in names)
    # predict: one mask per instance, prompted from that instance, and a per-image overlay
    pred = tmp_path / "pred"
    assert (
        cli(
            [
                "predict",
                "--checkpoint",
                checkpoint,
                "--data",
                str(data / "inst"),
                "--out",
                str(pred),
            ]
        )
        == 0
    )
    assert f"{test_split} samples in 1 images" in capsys.readouterr().out
    rows = json.loads((pred / "predictions.json").read_text())
    (image_id,) = {r["image_id"] for r in rows}
    assert sorted(r["id"] for r in rows) == sorted(
        f"{image_id}#{i}" for r in iter_rows(data / "inst", "test") for i in r["instance_ids"]
    )
    assert all(Path(r["mask"]).is_file() and r["prompt"].startswith("box") for r in rows)
    assert {r["category"] for r in rows} == names
    assert np.mean([r["iou"] for r in rows]) == pytest.approx(ev["iou"], abs=1e-4)
    labels = np.asarray(Image.open(pred / f"{image_id}_instances.png"))
    assert set(np.unique(labels)) - {0} <= {r["label"] for r in rows}
    assert (pred / f"{image_id}_overlay.png").is_file()


def test_label_image_without_background_keeps_every_label(tmp_path):
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/labels").mkdir()
    lab = np.full((40, 48), 4, np.uint16)
    lab[:, 30:] = 2  # two labels tile the whole image: no 0 pixel
    Image.fromarray(textured_image(40, 48, 0)).save(tmp_path / "src/images/t.png")
    Image.fromarray(lab).save(tmp_path / "src/labels/t.png")
    m = ingest_labels(tmp_path / "src", tmp_path / "out", "tiles")
    assert m["counts"] == {"train": 2}
    out = _samples(tmp_path / "out" / "tiles", "train")
    for sid, original in zip(out["id"], out["mask_original"]):
        np.testing.assert_array_equal(original, lab == int(sid.split("#")[1]))


def test_32bit_label_ids_beyond_a_histogram(tmp_path):
    """Label ids up to 2**32 (32-bit TIFFs from segmentation tools) keep their values; without
    background, one label id of 0 is never invented."""
    (tmp_path / "src/images").mkdir(parents=True)
    (tmp_path / "src/labels").mkdir()
    ids = [3, 2_000_000, 4_000_000_000]
    lab = np.full((40, 48), ids[0], np.uint32)
    lab[:, 16:32], lab[:, 32:] = ids[1], ids[2]
    Image.fromarray(textured_image(40, 48, 0)).save(tmp_path / "src/images/t.png")
    tifffile.imwrite(tmp_path / "src/labels/t.tif", lab)
    m = ingest_labels(tmp_path / "src", tmp_path / "out", "big")
    assert m["rejected"] == [] and m["counts"] == {"train": 3}
    out = _samples(tmp_path / "out" / "big", "train")
    assert sorted(out["id"]) == sorted(f"t#{v}" for v in ids)
    for sid, original in zip(out["id"], out["mask_original"]):
        np.testing.assert_array_equal(original, lab == int(sid.split("#")[1]))
