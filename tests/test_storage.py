"""Results folders on local disk and on object storage (a real S3-protocol server on loopback)."""

import json

from orchestrator.storage import ResultsDir, is_remote, join, resolve_location
from tests.helpers import bucket_keys


def test_locations_tell_object_storage_from_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert is_remote("s3://bkt/x") and not is_remote("runs/x")
    assert resolve_location("s3://bkt/x/") == "s3://bkt/x"
    assert resolve_location("runs") == str(tmp_path / "runs")
    assert join("s3://bkt/x/", "a", "b.json") == "s3://bkt/x/a/b.json"
    assert join("runs", "a") == "runs/a"


def test_a_remote_results_folder_is_in_the_bucket_for_the_next_driver(s3, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("INFOSAM_STAGING", str(tmp_path / "driver1"))
    first = ResultsDir("s3://bkt/bench/demo")
    first.pull(("cells.json", "scores"))
    (first.local / "scores").mkdir()
    (first.local / "scores" / "a.csv").write_text("x\n1\n")
    (first.local / "cells.json").write_text(json.dumps({"cells": {"a": {"status": "FINISHED"}}}))
    assert first.push(first.local / "scores" / "a.csv") == "s3://bkt/bench/demo/scores/a.csv"
    first.push(first.local / "cells.json")
    assert bucket_keys(s3, "bench/") == ["bench/demo/cells.json", "bench/demo/scores/a.csv"]
    body = s3.get_object(Bucket="bkt", Key="bench/demo/cells.json")["Body"].read()
    assert json.loads(body)["cells"]["a"]["status"] == "FINISHED"

    # A driver elsewhere (another working copy) starts from what the bucket holds, nothing else.
    monkeypatch.setenv("INFOSAM_STAGING", str(tmp_path / "driver2"))
    second = ResultsDir("s3://bkt/bench/demo")
    assert second.local != first.local
    second.local.mkdir(parents=True)
    (second.local / "stale.txt").write_text("from an older run on this machine")
    # a cell's run folder under the same prefix (checkpoints): stays in the bucket
    s3.put_object(Bucket="bkt", Key="bench/demo/adapter-seed0/checkpoint/state.pt", Body=b"x")
    second.pull(("cells.json", "scores"))
    assert sorted(p.name for p in second.local.rglob("*") if p.is_file()) == ["a.csv", "cells.json"]
    assert not any(p.name.startswith("s3:") for p in tmp_path.rglob("*"))  # no ./s3: folder


def test_a_local_results_folder_is_the_folder_itself(tmp_path):
    results = ResultsDir(tmp_path / "out")
    results.pull(("cells.json",))
    (results.local / "r.md").write_text("x")
    assert results.push(results.local / "r.md") == str(tmp_path / "out" / "r.md")
    assert results.lock_path == tmp_path / "out" / ".lock"
