"""Slow end to end (-m slow): from test_instances.py."""

import re
import sys

import pytest

from orchestrator.data.formats.coco import ingest_coco
from tests.helpers import ROOT, make_coco


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_benchmark_on_an_instance_dataset(ray_local, tmp_path, capsys):
    """The benchmark on a COCO dataset: scores per instance, intervals drawn by image, and the
    results say what the values are means over."""
    sys.path.insert(0, str(ROOT / "experiments"))
    import benchmark_all

    src, images = make_coco(tmp_path / "src")
    ingest_coco(src, tmp_path / "data", "cells", images_dir=images, holdout={"val": 1})
    sets = [
        "benchmark.methods=[zero_shot,adapter_infosam]",
        "benchmark.datasets=[cells]",
        "benchmark.seeds=[0]",
        "benchmark.name=inst",
        "benchmark.retention=[]",  # the demo scores the synthetic general set, not here
        "data.test_split=train",  # 2 images, 8 instances: intervals need more than one image
        "optim.epochs=1",
        "optim.batch_size=2",
        f"data.root={tmp_path / 'data'}",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
    ]
    assert benchmark_all.main([a for s in sets for a in ("--set", s)]) == 0
    out_dir = tmp_path / "runs" / "inst"
    md = (out_dir / "results.md").read_text()
    assert "On cells (instance datasets) a value is a mean over instances." in md
    assert "1 seed(s) x 8 instances in 2 images" in md
    assert "(seeds, then images with all their instances;" in md
    # per category: both methods on each class, 4 cells and 4 nuclei
    assert "### Per category: cells, test iou (%)" in md
    for name in ("cell", "nucleus"):
        assert re.search(rf"\| {name}\s+\| 4\s+\|\s+[\d.]+ \|\s+[\d.]+ \|", md), md
    assert re.search(r"\| \*\*mean over categories\*\* \| 2 categories", md)
    import pandas as pd

    scores = pd.read_csv(out_dir / "scores.csv", dtype=str)
    assert len(scores) == 2 * 8 and len(set(scores["image"])) == 2
    assert all(i.split("#")[0] == im for i, im in zip(scores["image_id"], scores["image"]))
