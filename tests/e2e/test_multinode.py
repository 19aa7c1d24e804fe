"""Benchmark cells across a multi-node Ray cluster on one machine (`ray.cluster_utils.Cluster`)."""

import sys
from pathlib import Path

import pytest

from tests.helpers import ROOT

sys.path.insert(0, str(ROOT / "experiments"))
import bench_concurrency

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_cells_fill_every_slot_and_a_new_node_takes_pending_cells(
    _ray_session, tmp_path, synthetic_root
):
    """2 nodes with one accelerator slot each, 8 equal cells; a third node joins after 2 cells."""
    result = bench_concurrency.run(
        2, 4, tmp_path, data_root=synthetic_root, add_node_after=2, epochs=1
    )
    rows = result["timeline"]
    assert len(rows) == 8 and all(r["status"] == "FINISHED" for r in rows)
    assert not result["failed"]
    nodes = {r["node"].split(":")[-1] for r in rows}
    assert len(result["added_node_ids"]) == 1
    added = result["added_node_ids"][0][-6:]
    assert added in nodes, "the node added mid-run took no pending cell"
    assert len(nodes) == 3  # every slot node ran cells; the head (no slot) none
    # Before the third node joined, at most 2 at once (one per slot); at the end up to 3.
    stats = result["stats"]
    assert 2 <= stats["peak_concurrency"] <= 3
    first_on_added = min(r["start"] for r in rows if r["node"].endswith(added))
    before = [r for r in rows if r["start"] < first_on_added]
    assert max(_overlap(before)) == 2  # the timeline shows the overlap
    assert Path(result["files"]["timeline"]).stat().st_size > 5000


def _overlap(rows):
    events = sorted([(r["start"], 1) for r in rows] + [(r["end"], -1) for r in rows])
    level, out = 0, [0]
    for _, d in events:
        level += d
        out.append(level)
    return out


def test_a_cell_on_a_lost_node_reruns_elsewhere_and_resumes(_ray_session, tmp_path, synthetic_root):
    """Issue 14: a node running a cell is reclaimed; Ray re-runs the cell on another node, the
    cell resumes from its checkpoint into the same MLflow run, every step logged once."""
    from mlflow.tracking import MlflowClient

    result = bench_concurrency.run(
        2, 2, tmp_path, data_root=synthetic_root, lose_node_after=0, epochs=3
    )
    lost = result["lost"]
    rows = {r["cell"]: r for r in result["timeline"]}
    assert not result["failed"] and all(r["status"] == "FINISHED" for r in rows.values())
    # The rerun finished on a node that is still alive (not the one removed).
    assert rows[lost["cell"]]["attempts"] == 2
    assert not rows[lost["cell"]]["node"].endswith(lost["node_id"][-6:])
    client = MlflowClient(result["tracking_uri"])
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id], f"tags.`infosam.cell` = '{lost['cell']}'")
    assert len(runs) == 1, [r.info.run_id for r in runs]  # resumed, not a second run
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.tags.get("infosam.resumed_from_epochs"), run.data.tags
    for key in ("train/loss", "train/segmentation", "time/train_s"):
        steps = [p.step for p in client.get_metric_history(run.info.run_id, key)]
        assert sorted(steps) == [0, 1, 2], (key, steps)
    every = client.search_runs([exp.experiment_id])
    assert not [r for r in every if r.info.status == "RUNNING"]
