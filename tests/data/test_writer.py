"""Ingest with no silent loss: every bad case has an exact reason, nothing else is lost."""

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main as cli
from orchestrator.data.codec import IngestError
from orchestrator.data.formats.convlora import ingest_convlora
from orchestrator.data.formats.folders import ingest_folders
from orchestrator.data.manifest import iter_rows, load_manifest


def _png(arr, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(arr) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


RNG = np.random.default_rng(0)
RGB = RNG.integers(0, 255, (40, 60, 3), dtype=np.uint8)
MASK01 = np.zeros((40, 60), np.uint8)
MASK01[10:30, 20:40] = 1


def _write(root: Path, rel: str, data: bytes) -> str:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return rel


def build_convlora_fixture(root: Path) -> dict:
    """A Conv-LoRA-layout folder holding every bad case; returns the expected outcome."""
    multi = np.zeros((40, 60), np.uint8)
    multi[:, :15], multi[:, 15:30], multi[:, 30:45] = 1, 2, 3
    jpeg_mask = np.asarray(
        Image.open(io.BytesIO(_jpeg(np.stack([MASK01 * 255] * 3, -1)))).convert("L")
    )
    rows = {
        "train": [
            ("images/ok_rgb.png", _png(RGB), "masks/ok_rgb.png", _png(MASK01 * 255)),
            ("images/ok_jpg.jpg", _jpeg(RGB), "masks/ok_jpg.png", _png(MASK01)),
            ("images/truncated.png", _png(RGB)[:200], "masks/truncated.png", _png(MASK01)),
            ("images/zero.png", b"", "masks/zero.png", _png(MASK01)),
            ("images/missing.png", None, "masks/missing.png", _png(MASK01)),
            ("images/size.png", _png(RGB), "masks/size.png", _png(np.zeros((20, 20), np.uint8))),
            ("images/multiclass.png", _png(RGB), "masks/multiclass.png", _png(multi)),
            ("images/empty.png", _png(RGB), "masks/empty.png", _png(np.zeros((40, 60), np.uint8))),
            ("images/gray.png", _png(RGB[..., 0]), "masks/gray.png", _png(MASK01 * 255)),
            (
                "images/rgba.png",
                _png(np.dstack([RGB, RGB[..., :1]])),
                "masks/rgba.png",
                _png(MASK01),
            ),
            (
                "images/deep16.png",
                _png(RGB[..., 0].astype(np.uint16) * 257),
                "masks/deep16.png",
                _png(MASK01),
            ),
            ("images/jpegmask.png", _png(RGB), "masks/jpegmask.png", _png(jpeg_mask)),
            ("images/label38.png", _png(RGB), "masks/label38.png", _png(MASK01 * 38)),
            ("images/odd name (1) é.png", _png(RGB), "masks/odd name (1) é.png", _png(MASK01)),
        ],
        "val": [("images/val_ok.png", _png(RGB), "masks/val_ok.png", _png(MASK01))],
        "test_Kvasir": [
            ("images/test_ok.png", _png(RGB), "masks/test_ok.png", _png(MASK01)),
            ("images/ok_rgb.png", None, "masks/ok_rgb.png", None),  # duplicate of a train image
        ],
    }
    for split, items in rows.items():
        lines = [",image,label"]
        for k, (img_rel, img, mask_rel, mask) in enumerate(items):
            if img is not None:
                _write(root, img_rel, img)
            if mask is not None:
                _write(root, mask_rel, mask)
            lines.append(f"{k},{img_rel},{mask_rel}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return {
        "counts": {"train": 9, "val": 1, "test_Kvasir": 1},
        "rejected": {
            "images/truncated.png": "unreadable",
            "images/zero.png": "zero-byte",
            "images/missing.png": "image file not found",
            "images/size.png": "mask size 20x20 differs from image size 60x40",
            "images/multiclass.png": "not binary",
            "images/ok_rgb.png": "duplicate id 'images/ok_rgb'",
        },
        "flags": {
            "images/empty": ["empty_mask"],
            "images/gray": ["converted_L"],
            "images/rgba": ["converted_RGBA"],
            "images/deep16": ["converted_16bit"],
            "images/jpegmask": ["mask_thresholded"],
        },
        "inputs": sum(len(v) for v in rows.values()),
    }


def test_convlora_ingest_counts_reasons_and_flags(tmp_path):
    expected = build_convlora_fixture(tmp_path / "bench")
    manifest = ingest_convlora(tmp_path / "bench", tmp_path / "out", "bench")
    assert manifest["counts"] == dict(sorted(expected["counts"].items()))
    reasons = {
        Path(r["source"]).relative_to(tmp_path / "bench").as_posix(): r["reason"]
        for r in manifest["rejected"]
    }
    assert set(reasons) == set(expected["rejected"])
    for source, fragment in expected["rejected"].items():
        assert fragment in reasons[source], (source, reasons[source])
    assert sum(manifest["counts"].values()) + len(manifest["rejected"]) == expected["inputs"]
    rows = {
        r["id"]: r
        for split in manifest["counts"]
        for r in iter_rows(tmp_path / "out" / "bench", split)
    }
    for sample_id, flags in expected["flags"].items():
        assert rows[sample_id]["flags"] == flags
    assert rows["images/ok_rgb"]["flags"] == [] and rows["images/odd name (1) é"]["flags"] == []
    # Every stored image is 8-bit RGB of the original size, every mask 0/1.
    for r in rows.values():
        img = np.asarray(Image.open(io.BytesIO(r["image"])))
        mask = np.asarray(Image.open(io.BytesIO(r["mask"])))
        assert img.shape == (r["height"], r["width"], 3) and img.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 1}
    assert np.array_equal(
        np.asarray(Image.open(io.BytesIO(rows["images/label38"]["mask"]))), MASK01
    )
    # Untouched PNG/JPEG bytes are stored as they came.
    assert rows["images/ok_rgb"]["image"] == (tmp_path / "bench/images/ok_rgb.png").read_bytes()


def test_ingest_is_idempotent_and_verifiable(tmp_path):
    build_convlora_fixture(tmp_path / "bench")
    first = ingest_convlora(tmp_path / "bench", tmp_path / "out", shard_bytes=2000)
    assert len(first["shards"]) > 3  # small target size -> several shards per split
    second = ingest_convlora(tmp_path / "bench", tmp_path / "out", shard_bytes=2000)
    assert first == second
    load_manifest(tmp_path / "out" / "bench", verify=True)
    assert not (tmp_path / "out" / "bench.partial").exists()


def _same_output(a: Path, b: Path) -> None:
    """Two ingests of one source wrote the same manifest and the same shard bytes."""
    ma, mb = (json.loads((d / "manifest.json").read_text()) for d in (a, b))
    assert ma == mb
    for shard in ma["shards"]:
        assert (a / shard["path"]).read_bytes() == (b / shard["path"]).read_bytes()


def test_decoding_threads_change_the_speed_not_the_output(tmp_path, capsys):
    """`--workers N` decodes N images at once; the shards, the manifest and the order of its
    rejects (by CSV row, an empty cell among the unreadable files) are those of one worker."""
    build_convlora_fixture(tmp_path / "bench")
    with (tmp_path / "bench" / "train.csv").open("a") as f:
        f.write("14,,masks/ok_rgb.png\n")  # an empty image cell after every other train row
    outs = {}
    for workers in (1, 3):
        outs[workers] = tmp_path / f"w{workers}"
        args = ["data", "ingest", "--format", "convlora", str(tmp_path / "bench")]
        args += [str(outs[workers]), "--name", "bench", "--workers", str(workers)]
        assert cli([*args, "--shard-mb", "0.002"]) == 0
    _same_output(outs[1] / "bench", outs[3] / "bench")
    m = load_manifest(outs[3] / "bench", verify=True)
    assert len(m["shards"]) > 3
    train = [r for r in m["rejected"] if r["split"] == "train"]
    assert [r["row"] for r in train] == [2, 3, 4, 5, 6, 14]
    assert train[-1] == {
        "source": "train.csv row 14",
        "split": "train",
        "reason": "empty image or label cell",
        "row": 14,
    }
    capsys.readouterr()
    with pytest.raises(SystemExit):
        cli(["data", "ingest", "--format", "folders", "x", "y", "--workers", "0"])
    assert "expected a whole number of at least 1, got '0'" in capsys.readouterr().err


def test_decoding_threads_share_the_pixel_limit(tmp_path, monkeypatch):
    """Large tiles pass PIL's decompression-bomb check under ingest's own limit in every thread,
    and the limit the caller had set is there again afterwards."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # the caller's: 60x40 is over 2x it
    for k in range(48):
        _write(tmp_path / "src", f"images/{k:02d}.png", _png(np.roll(RGB, k, axis=1)))
        _write(tmp_path / "src", f"masks/{k:02d}.png", _png(MASK01))
    m = ingest_folders(tmp_path / "src", tmp_path / "out", "tiles", workers=3)
    assert m["rejected"] == [] and m["counts"] == {"train": 48}
    assert Image.MAX_IMAGE_PIXELS == 1000


def test_folders_layout_with_odd_and_non_utf8_names(tmp_path):
    src = tmp_path / "src"
    for split in ("train", "test"):
        (src / split / "images").mkdir(parents=True)
        (src / split / "masks").mkdir(parents=True)
    bad = os.fsdecode(b"caf\xe9_\xff")  # latin-1 bytes: not valid UTF-8
    files = {
        ("train", "images", "a.jpg"): _jpeg(RGB),
        ("train", "masks", "a.png"): _png(MASK01 * 255),
        ("train", "images", "b [x] ü.png"): _png(RGB),
        ("train", "masks", "b [x] ü_mask.png"): _png(MASK01),
        ("train", "images", f"{bad}.png"): _png(RGB),
        ("train", "masks", f"{bad}.png"): _png(MASK01),
        ("train", "images", "nomask.png"): _png(RGB),
        ("train", "masks", "orphan.png"): _png(MASK01),
        ("train", "images", "a.png"): _png(RGB),  # same stem as a.jpg
        ("test", "images", "t.png"): _png(RGB),
        ("test", "masks", "t.png"): _png(MASK01),
    }
    for (split, kind, name), data in files.items():
        (src / split / kind / name).write_bytes(data)
    manifest = ingest_folders(src, tmp_path / "out", "mine")
    assert manifest["counts"] == {"test": 1, "train": 3}
    reasons = {Path(r["source"]).name: r["reason"] for r in manifest["rejected"]}
    assert set(reasons) == {"a.png", "nomask.png", "orphan.png"}
    assert reasons["a.png"].startswith("duplicate id 'a'")
    assert reasons["nomask.png"].startswith("no mask with stem 'nomask'")
    assert reasons["orphan.png"] == "mask without an image of the same stem"
    ids = {r["id"] for r in iter_rows(tmp_path / "out" / "mine", "train")}
    assert ids == {"a", "b [x] ü", "caf\\xe9_\\xff"}
    json.dumps(manifest)  # valid UTF-8 text throughout


def _ingest(*argv) -> int:
    """`infosam data ingest --format convlora ARGV...`"""
    return cli(["data", "ingest", "--format", "convlora", *map(str, argv)])


def test_cli_exit_codes_and_messages(tmp_path, capsys):
    build_convlora_fixture(tmp_path / "bench")
    assert _ingest(str(tmp_path / "bench"), str(tmp_path / "out")) == 0
    assert "rejected: 6" in capsys.readouterr().out
    # Unusable input fails with the fix, and the previous ingest is left intact.
    assert _ingest(str(tmp_path / "nope"), str(tmp_path / "out"), "--name", "bench") == 2
    assert "source folder not found" in capsys.readouterr().err
    (tmp_path / "nocols").mkdir()
    (tmp_path / "nocols" / "train.csv").write_text("img,mask\na.png,b.png\n")
    assert _ingest(str(tmp_path / "nocols"), str(tmp_path / "out")) == 2
    err = capsys.readouterr().err
    assert "train.csv" in err and "['image', 'label']" in err
    assert cli(["data", "inspect", str(tmp_path / "out" / "bench"), "--verify"]) == 0
    assert "checksums verified" in capsys.readouterr().out


def test_changed_shard_is_detected_by_verify(tmp_path, capsys):
    build_convlora_fixture(tmp_path / "bench")
    manifest = ingest_convlora(tmp_path / "bench", tmp_path / "out")
    dataset = str(tmp_path / "out" / "bench")
    shard = tmp_path / "out" / "bench" / manifest["shards"][0]["path"]
    original = shard.read_bytes()
    # a same-size edit: only the checksum can see it
    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0xFF
    shard.write_bytes(bytes(flipped))
    assert cli(["data", "inspect", dataset]) == 0
    capsys.readouterr()
    assert cli(["data", "inspect", dataset, "--verify"]) == 2
    assert "sha256 mismatch" in capsys.readouterr().err
    # a truncated copy is found whenever the manifest is loaded, without --verify
    shard.write_bytes(original[: len(original) // 2])
    assert cli(["data", "inspect", dataset]) == 2
    err = capsys.readouterr().err
    assert manifest["shards"][0]["path"] in err and "truncated or changed" in err
    with pytest.raises(IngestError, match="truncated"):
        load_manifest(dataset)
