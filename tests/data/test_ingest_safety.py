"""Ingest never deletes what it did not write, and hostile files are refused one by one."""

from __future__ import annotations

import io
import json
import struct
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main as cli
from orchestrator.data import codec
from orchestrator.data.codec import IngestError
from orchestrator.data.formats.coco import coco_mask, ingest_coco
from orchestrator.data.formats.convlora import ingest_convlora
from orchestrator.data.formats.folders import ingest_folders
from orchestrator.data.manifest import iter_rows, load_manifest
from orchestrator.data.reader import decode_batch

RGB = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
MASK = np.zeros((40, 60), np.uint8)
MASK[10:30, 20:40] = 255


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def _kvasir(root: Path, n: int = 3) -> Path:
    """A user's folder source: images/ + masks/."""
    for k in range(n):
        (root / "images").mkdir(parents=True, exist_ok=True)
        (root / "masks").mkdir(parents=True, exist_ok=True)
        (root / "images" / f"im{k}.png").write_bytes(_png(RGB))
        (root / "masks" / f"im{k}.png").write_bytes(_png(MASK))
    return root


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _ingest(*args: str) -> int:
    return cli(["data", "ingest", "--format", "folders", *args])


def test_ingesting_into_the_sources_parent_keeps_the_source(tmp_path, capsys):
    src = _kvasir(tmp_path / "datasets" / "kvasir")
    before = _files(src)
    assert _ingest(str(src), str(tmp_path / "datasets")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "kvasir" in err and "source" in err
    assert _files(src) == before
    # with SRC "." from inside the source, and OUT its parent: refused too
    assert _ingest(str(src / "."), str(tmp_path / "datasets")) == 2
    assert _files(src) == before


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "/tmp/x"])
def test_a_name_that_is_not_one_folder_is_refused(tmp_path, capsys, name):
    src = _kvasir(tmp_path / "src")
    (tmp_path / "out" / "other").mkdir(parents=True)
    (tmp_path / "out" / "other" / "keep.txt").write_text("mine")
    assert _ingest(str(src), str(tmp_path / "out"), "--name", name) == 2
    assert "dataset name" in capsys.readouterr().err
    assert (tmp_path / "out" / "other" / "keep.txt").read_text() == "mine"
    assert _files(src) and (src / "images").is_dir()


def test_output_inside_the_source_is_refused(tmp_path, capsys):
    src = _kvasir(tmp_path / "src")
    before = _files(src)
    assert _ingest(str(src), str(src / "parquet")) == 2
    assert "lies inside the source" in capsys.readouterr().err
    assert _files(src) == before and not (src / "parquet").exists()


def test_an_existing_folder_is_replaced_only_when_it_is_our_dataset(tmp_path, capsys):
    src = _kvasir(tmp_path / "src")
    out = tmp_path / "out"
    (out / "src").mkdir(parents=True)
    (out / "src" / "notes.txt").write_text("my notes")
    assert _ingest(str(src), str(out)) == 2
    assert "holds no manifest.json written by infosam" in capsys.readouterr().err
    assert (out / "src" / "notes.txt").read_text() == "my notes"
    # our dataset is replaced; a file added to it by the user is not deleted silently
    assert _ingest(str(src), str(out), "--name", "ds") == 0
    first = load_manifest(out / "ds")
    assert _ingest(str(src), str(out), "--name", "ds") == 0
    assert load_manifest(out / "ds")["shards"] == first["shards"]
    (out / "ds" / "labels.csv").write_text("mine")
    capsys.readouterr()
    assert _ingest(str(src), str(out), "--name", "ds") == 2
    assert "labels.csv" in capsys.readouterr().err
    assert (out / "ds" / "labels.csv").read_text() == "mine"
    assert not [p for p in out.iterdir() if ".partial" in p.name]


def test_an_ingest_with_no_usable_sample_fails_and_keeps_the_old_dataset(tmp_path, capsys):
    src = _kvasir(tmp_path / "src")
    out = tmp_path / "out"
    assert _ingest(str(src), str(out)) == 0
    old = _files(out / "src")
    for p in (src / "images").iterdir():
        p.write_bytes(b"not an image")
    capsys.readouterr()
    assert _ingest(str(src), str(out)) == 2
    err = capsys.readouterr().err
    assert "no usable sample" in err and "3 x image is unreadable" in err
    assert _files(out / "src") == old


def test_concurrent_ingests_of_one_name_queue(tmp_path):
    src = _kvasir(tmp_path / "src", n=6)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            ingest_folders(src, tmp_path / "out", workers=1)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert load_manifest(tmp_path / "out" / "src", verify=True)["counts"] == {"train": 6}
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [".src.lock", "src"]


# ----------------------------------------------------------------------------- hostile files


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring `width` x `height` grey pixels, a tiny IDAT."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1000)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def test_bombs_and_unsupported_formats_are_rejected_and_the_rest_ingested(tmp_path, monkeypatch):
    import tifffile

    src = _kvasir(tmp_path / "src", n=2)
    # a 7 MB deflate TIFF declaring 40960 x 40960 px (1.6 GB decoded)
    tile = np.zeros((1024, 1024), np.uint8)
    tifffile.imwrite(
        src / "images" / "bomb_tiff.tif",
        (tile for _ in range(40 * 40)),
        shape=(40960, 40960),
        dtype=np.uint8,
        tile=(1024, 1024),
        compression="zlib",
        compressionargs={"level": 1},
    )
    (src / "masks" / "bomb_tiff.png").write_bytes(_png(MASK))
    (src / "images" / "bomb_png.png").write_bytes(_png_header_only(30000, 30000))
    (src / "masks" / "bomb_png.png").write_bytes(_png(MASK))
    (src / "images" / "eps.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 60 40\n")
    (src / "masks" / "eps.png").write_bytes(_png(MASK))
    # 16-bit RGBA is counted at 2 bytes a channel: within the pixel limit, over the bytes
    tifffile.imwrite(src / "images" / "deep.tif", np.zeros((40, 60, 4), np.uint16))
    (src / "masks" / "deep.png").write_bytes(_png(MASK))
    monkeypatch.setattr(codec, "MAX_DECODED_BYTES", 40 * 60 * 4 * 2 - 1)
    manifest = ingest_folders(src, tmp_path / "out")
    assert manifest["counts"] == {"train": 2}
    reasons = {Path(r["source"]).stem: r["reason"] for r in manifest["rejected"]}
    assert "40960x40960" in reasons["bomb_tiff"] and "over the limit" in reasons["bomb_tiff"]
    assert "30000x30000" in reasons["bomb_png"] and "over the limit" in reasons["bomb_png"]
    assert "unreadable" in reasons["eps"] and "supported: PNG, JPEG" in reasons["eps"]
    assert "60x40" in reasons["deep"] and "2 byte(s)" in reasons["deep"]


def test_the_reader_decodes_whatever_ingest_accepted(tmp_path, monkeypatch):
    """One pixel budget: an image within ingest's limit never fails later in training, whatever
    PIL's own global says (its default stops at 89 M px, ingest's at 268 M)."""
    monkeypatch.setattr(codec, "MAX_PIXELS", 5000)
    src = _kvasir(tmp_path / "src", n=1)
    manifest = ingest_folders(src, tmp_path / "out")
    assert manifest["counts"] == {"train": 1}  # 2400 px, within the budget
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # a caller's stricter PIL limit
    row = next(iter_rows(tmp_path / "out" / "src", "train"))
    batch = {k: np.array([row[k]], dtype=object) for k in ("id", "image", "mask", "source")}
    out = decode_batch(batch, 64)
    assert out["image"].shape == (1, 3, 64, 64) and out["mask"].any()
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_csv_cells_leading_outside_the_folder_are_rejected(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(RGB))
    src = _kvasir(tmp_path / "bench", n=1)
    (tmp_path / "outside_link").symlink_to(tmp_path)
    (src / "link").symlink_to(tmp_path)
    rows = [
        "image,label",
        "images/im0.png,masks/im0.png",
        f"{secret},masks/im0.png",
        "../secret.png,masks/im0.png",
        "link/secret.png,masks/im0.png",
    ]
    (src / "train.csv").write_text("\n".join(rows) + "\n")
    manifest = ingest_convlora(src, tmp_path / "out")
    assert manifest["counts"] == {"train": 1}
    rejected = sorted(r["row"] for r in manifest["rejected"])
    assert rejected == [1, 2, 3]
    assert all("leads outside" in r["reason"] for r in manifest["rejected"])


def test_coco_file_names_and_ids_are_checked(tmp_path):
    secret = tmp_path / "secret.png"
    secret.write_bytes(_png(RGB))
    images = tmp_path / "coco" / "images"
    images.mkdir(parents=True)
    (images / "ok.png").write_bytes(_png(RGB))
    poly = [[20, 10, 40, 10, 40, 30, 20, 30]]
    entries = [
        {"id": 1, "file_name": "ok.png", "height": 40, "width": 60},
        {"id": 2, "file_name": str(secret)},
        {"id": 3, "file_name": "../../secret.png"},
        {"id": 4, "file_name": 12},
        {"id": [5], "file_name": "ok.png"},
        {"id": 6, "file_name": "ok.png", "height": "40"},
    ]
    anns = [
        {"id": k, "image_id": e["id"], "segmentation": poly, "category_id": 1}
        for k, e in enumerate(entries)
    ]
    anns.append({"id": [99], "image_id": 1, "segmentation": poly, "category_id": 1})
    anns.append({"id": 100, "image_id": 1, "segmentation": poly, "category_id": {"x": 1}})
    spec = {"images": entries, "annotations": anns, "categories": [{"id": 1, "name": "a"}]}
    path = tmp_path / "coco" / "ann.json"
    path.write_text(json.dumps(spec))
    manifest = ingest_coco(path, tmp_path / "out", images_dir=images)
    assert manifest["counts"] == {"train": 1}
    by_source = {r["source"]: r["reason"] for r in manifest["rejected"]}
    assert "leads outside" in by_source["ann.json images[1]"]
    assert "leads outside" in by_source["ann.json images[2]"]
    assert "path string" in by_source["ann.json images[3]"]
    assert "not an integer or a string" in by_source["ann.json images[4]"]
    assert "height '40' is not an integer" in by_source["ann.json images[5]"]
    assert "integer or string id" in by_source["ann.json annotations[6]"]
    assert "unknown category" in by_source["ann.json annotation id=100"]


def test_an_rle_whose_runs_overflow_the_image_is_rejected_before_decoding():
    from pycocotools import mask as mask_utils

    good = mask_utils.encode(np.asfortranarray(np.ones((4, 4), np.uint8)))
    assert coco_mask({"size": [4, 4], "counts": good["counts"].decode()}, 4, 4).all()
    # the runs of a 40x40 mask declared as 4x4: pycocotools would write 1600 bytes into 16
    big = mask_utils.encode(np.asfortranarray(np.ones((40, 40), np.uint8)))
    hostile = {"size": [4, 4], "counts": big["counts"].decode()}
    with pytest.raises(codec.Rejected, match="sum to 1600, not 16"):
        coco_mask(hostile, 4, 4)
    with pytest.raises(codec.Rejected, match=r"outside .0.\.\..o."):
        coco_mask({"size": [4, 4], "counts": "~~~"}, 4, 4)
    with pytest.raises(codec.Rejected, match="negative"):
        coco_mask({"size": [4, 4], "counts": [20, -4]}, 4, 4)


def test_a_damaged_manifest_is_an_error_naming_the_file(tmp_path):
    src = _kvasir(tmp_path / "src", n=1)
    ingest_folders(src, tmp_path / "out")
    manifest = tmp_path / "out" / "src" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(IngestError, match=r"manifest\.json is damaged"):
        load_manifest(tmp_path / "out" / "src")


def test_a_split_without_a_usable_sample_fails_naming_it(tmp_path, capsys):
    """train is fine but every test row is broken: a benchmark would silently lose its test
    split, so the ingest fails and says which split and why."""
    src = _kvasir(tmp_path / "bench", n=2)
    (src / "train.csv").write_text("image,label\nimages/im0.png,masks/im0.png\n")
    (src / "test.csv").write_text("image,label\nimages/none.png,masks/im1.png\n,\n")
    assert cli(["data", "ingest", "--format", "convlora", str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "split 'test': all 2 input(s) rejected" in err and "image file not found" in err
    assert "the other splits were fine" in err
    assert not (tmp_path / "out" / "bench").exists()
