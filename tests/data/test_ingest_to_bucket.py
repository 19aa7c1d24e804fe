"""Ingest whose OUT is a bucket (a real S3-protocol server on loopback): the dataset lands there
whole, a re-ingest replaces it without a moment in which readers see half of one, and objects
the project did not write are never deleted. The bucket is read with boto3."""

import json

import pytest
from PIL import Image

from orchestrator.cli import main as cli
from orchestrator.data.manifest import iter_rows, load_manifest
from tests.helpers import bucket_keys, rect_mask, textured_image

pytestmark = pytest.mark.timeout(120)


def _folder(root, n, seed=0):
    """images/ + masks/, as a user's folder source."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    for k in range(n):
        mask = rect_mask(48, 64, 8 + k, 10, 30, 40 + seed)
        Image.fromarray(textured_image(48, 64, seed + k, [mask])).save(root / "images" / f"{k}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"{k}.png")
    return root


def _objects(s3, prefix):
    """Keys but the zero-byte folder marker (`data/polyp/`) pyarrow leaves after a delete."""
    return {k for k in bucket_keys(s3, prefix) if not k.endswith("/")}


def _manifest(s3):
    return json.loads(s3.get_object(Bucket="bkt", Key="data/polyp/manifest.json")["Body"].read())


def test_an_ingest_into_a_bucket_lands_whole_and_is_replaced_whole(s3, tmp_path, monkeypatch):
    monkeypatch.setenv("INFOSAM_STAGING", str(tmp_path / "staging"))
    src = _folder(tmp_path / "src", 4)
    argv = ["data", "ingest", "--format", "folders", "--name", "polyp", str(src)]
    assert cli([*argv, "s3://bkt/data", "--workers", "1"]) == 0

    first = _manifest(s3)
    shards = {f"data/polyp/{s['path']}" for s in first["shards"]}
    assert _objects(s3, "data/polyp/") == {"data/polyp/manifest.json", *shards}
    assert first["counts"] == {"train": 4}
    manifest = load_manifest("s3://bkt/data/polyp", verify=True)  # sizes and sha256 match
    rows = list(iter_rows("s3://bkt/data/polyp", "train"))
    assert sorted(r["id"] for r in rows) == ["0", "1", "2", "3"]
    assert manifest["root"] == "s3://bkt/data/polyp"
    assert not any((tmp_path / "staging").rglob("*.parquet")), "the staged copy outlived it"

    # A publish killed after uploading its shards left a stray generation; the old manifest
    # still names a complete dataset, and the next ingest removes the stray.
    stray = "data/polyp/train-g0123abcd-00000.parquet"
    s3.put_object(Bucket="bkt", Key=stray, Body=b"half")
    assert len(list(iter_rows("s3://bkt/data/polyp", "train"))) == 4

    _folder(tmp_path / "src2", 6, seed=7)
    assert cli([*argv[:-1], str(tmp_path / "src2"), "s3://bkt/data", "--workers", "1"]) == 0
    second = _manifest(s3)
    assert second["counts"] == {"train": 6}
    new = {f"data/polyp/{s['path']}" for s in second["shards"]}
    assert not new & shards, "a re-ingest must not overwrite shards the old manifest names"
    assert _objects(s3, "data/polyp/") == {"data/polyp/manifest.json", *new}
    assert len(list(iter_rows("s3://bkt/data/polyp", "train"))) == 6


def test_a_bucket_folder_holding_other_objects_is_never_replaced(s3, tmp_path, capsys):
    src = _folder(tmp_path / "src", 2)
    s3.put_object(Bucket="bkt", Key="data/polyp/README.txt", Body=b"the lab's notes")
    argv = ["data", "ingest", "--format", "folders", "--name", "polyp", str(src), "s3://bkt/data"]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert "s3://bkt/data/polyp holds objects and no manifest.json written by infosam" in err
    assert bucket_keys(s3, "data/") == ["data/polyp/README.txt"]

    # Ours, with a foreign object added later: refused too, the dataset left as it was.
    s3.delete_object(Bucket="bkt", Key="data/polyp/README.txt")
    assert cli(argv) == 0
    before = bucket_keys(s3, "data/")
    s3.put_object(Bucket="bkt", Key="data/polyp/labels/extra.png", Body=b"x")
    assert cli(argv) == 2
    assert "also holds objects it did not write (labels/extra.png)" in capsys.readouterr().err
    assert bucket_keys(s3, "data/") == sorted([*before, "data/polyp/labels/extra.png"])
    assert len(list(iter_rows("s3://bkt/data/polyp", "train"))) == 2
