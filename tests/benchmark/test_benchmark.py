"""The main job end to end: in-process, resumed by name, and through `ray job submit`."""

import json
import os
import re
import signal
import socket
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestrator.benchmark.cells import CELL_TAG
from tests.helpers import ROOT, benchmark_args

DEMO_CONFIG = ROOT / "orchestrator" / "benchmark" / "demo.yaml"
sys.path.insert(0, str(ROOT / "experiments"))
import benchmark_all  # noqa: E402

from tests.helpers import signal_driver_when  # noqa: E402

pytestmark = pytest.mark.timeout(420)


def test_reduced_matrix_end_to_end_and_resume(ray_local, tmp_path, synthetic_root, capsys):
    args = benchmark_args(tmp_path, synthetic_root, retention=True)
    assert benchmark_all.main(args) == 0
    out = capsys.readouterr().out
    md = (tmp_path / "runs" / "reduced" / "results.md").read_text()
    assert "SAM zero-shot (teacher)" in md and "Adapter + InfoSAM" in md
    assert "camouflage s_measure" in md and "protocol: clean" in md and "checkpoint_sha256" in md
    assert (tmp_path / "runs" / "reduced" / "results.png").stat().st_size > 5000
    assert (tmp_path / "runs" / "reduced" / "results.csv").read_text().count("\n") == 1 + 2 * 3
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("demo")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    assert len(parents) == 1 and len(children) == 2
    # Per-image scores, paired differences with intervals, the forest plot, verdicts, costs.
    out_dir = tmp_path / "runs" / "reduced"
    assert "## Differences vs base" in md and "2000 resamples, RNG seed 0" in md
    assert "| Adapter + InfoSAM vs SAM zero-shot (teacher) |" in md
    assert re.search(
        r"\*\*Adapter \+ InfoSAM vs SAM zero-shot \(teacher\)\*\*: camouflage "
        r"(better|worse|no detectable difference) \(s_measure [+-]\d",
        md,
    ), md
    assert "trainable params" in md and "train s / cell" in md
    scores = (out_dir / "scores.csv").read_text().splitlines()
    assert (
        scores[0].startswith("cell,method,dataset,seed,image_id,prompt,")
        and len(scores) == 1 + 2 * 8
    )
    diffs = (out_dir / "differences.csv").read_text()
    assert "resamples" in diffs and "verdict" in diffs and diffs.count("\n") == 1 + 3
    assert (out_dir / "differences.png").stat().st_size > 5000
    parent = parents[0].info.run_id
    logged = {a.path for a in client.list_artifacts(parent, "results")}
    assert {"results/differences.png", "results/scores.csv", "results/differences.csv"} <= logged
    for child in children:
        assert [a.path for a in client.list_artifacts(child.info.run_id, "scores")] == [
            "scores/retention_general.csv",
            "scores/test_scores.csv",
        ]
    # Retention: the trained cell and the teacher scored on `general`, on their runs, in
    # cells.json with per-image scores, and in their own results.md section.
    kept = {r.data.tags[CELL_TAG]: r.data.metrics["retention/general/iou"] for r in children}
    assert set(kept) == {"zero_shot/camouflage/seed0", "adapter_infosam/camouflage/seed0"}
    assert all(0 < v <= 1 for v in kept.values())
    assert kept["zero_shot/camouflage/seed0"] > 0.5  # the teacher on its own domain
    assert "## Retention: the pre-trained skill kept" in md and "camouflage → general iou" in md
    assert "| Adapter + InfoSAM vs SAM zero-shot (teacher) | " in md.split("## Retention")[1]
    retained = (out_dir / "retention_scores.csv").read_text().splitlines()
    assert retained[0].startswith("cell,method,dataset,seed,retention,image_id,prompt,")
    assert len(retained) == 1 + 2 * 8
    assert "retention: general" in md and "retention.general: 8 test manifest" in md
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in children)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert {a.path for a in client.list_artifacts(parents[0].info.run_id, "results")} >= {
        "results/results.md",
        "results/results.csv",
        "results/results.png",
    }
    assert all("test/s_measure" in r.data.metrics for r in children)
    assert re.search(r"\[benchmark\] [12]/2 adapter_infosam/camouflage/seed0: s_measure=", out)
    assert "[benchmark] 2/2 done, 0 running, 0 pending, 0 failed" in out
    # The cells ran as concurrent Ray tasks, and the parent run shows how the slots were used.
    timeline = (tmp_path / "runs" / "reduced" / "timeline.csv").read_text().splitlines()
    assert len(timeline) == 3 and all(",FINISHED," in line for line in timeline[1:])
    parent = client.get_run(parents[0].info.run_id)
    # The laptop cap is what the 2 CPUs hold (one per cell); a 1 s zero-shot cell may be done
    # before the training cell's worker process is up, so the peak is 1 or 2, never more.
    assert "2 cells to run, at most 2 at once" in out
    assert parent.data.metrics["peak_concurrency"] in (1, 2)
    assert 0 <= parent.data.metrics["slot_idle_fraction"] < 1
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "timeline")} == {
        "timeline/timeline.csv",
        "timeline/timeline.png",
    }
    cells = json.loads((tmp_path / "runs" / "reduced" / "cells.json").read_text())["cells"]
    trained = cells["adapter_infosam/camouflage/seed0"]
    assert trained["status"] == "FINISHED" and trained["timings"]["train_s"] > 0
    assert trained["retention"]["general"]["metrics"]["retention/general/iou"] == pytest.approx(
        kept["adapter_infosam/camouflage/seed0"]
    )
    # What each cell ran on, as MLflow dataset inputs (the runs table's Dataset column)
    inputs = {
        r.data.tags[CELL_TAG]: sorted(i.dataset.name for i in r.inputs.dataset_inputs)
        for r in children
    }
    assert inputs == {
        "zero_shot/camouflage/seed0": ["camouflage/test"],
        "adapter_infosam/camouflage/seed0": [
            "camouflage/test",
            "camouflage/train",
            "camouflage/val",
        ],
    }
    # The dataset's best trained cell, registered with the `champion` alias and announced.
    champion = client.get_model_version_by_alias("reduced-camouflage", "champion")
    run_of = {r.data.tags[CELL_TAG]: r.info.run_id for r in children}
    logged_model = client.get_logged_model(champion.source.removeprefix("models:/"))
    assert logged_model.source_run_id == run_of["adapter_infosam/camouflage/seed0"]
    assert (
        "[benchmark] champion camouflage: models:/reduced-camouflage@champion (version 1) = "
        "adapter_infosam seed 0, test s_measure " in out
    )
    # Same name: nothing is redone, and the champion is the same version. A new name: fresh.
    assert benchmark_all.main(args) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 2
    assert [v.version for v in client.search_model_versions("name='reduced-camouflage'")] == [1]
    assert len(client.search_runs([exp.experiment_id])) == 3
    # Same name, changed configuration: refused before Ray starts, naming cell and key...
    changed = [*args, "--set", "optim.lr=3e-3"]
    assert benchmark_all.main(changed) == 2
    err = capsys.readouterr().err
    assert "finished cells adapter_infosam/camouflage/seed0)" in err  # zero-shot: no lr
    assert "optim.lr: 0.001 -> 0.003" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    # ...unless asked for: the finished cells are kept.
    assert benchmark_all.main([*changed, "--allow-config-change"]) == 0
    assert capsys.readouterr().out.count("done earlier, skipped") == 2
    # A second driver of the same benchmark while one runs: told who holds it.
    from orchestrator.storage import exclusive

    with exclusive(tmp_path / "runs" / "reduced" / ".lock", "test"):
        assert benchmark_all.main(args) == 2
    err = capsys.readouterr().err
    assert "benchmark 'reduced'" in err and f"pid {os.getpid()}" in err


def test_a_failing_cell_is_recorded_failed_and_only_it_runs_again(
    ray_local, tmp_path, synthetic_root, capsys
):
    """A cell that raises is retried, then FAILED (MLflow + results); the other cells finish."""
    args = [
        *benchmark_args(tmp_path, synthetic_root, "failing"),
        "--set",
        "benchmark.methods=[zero_shot,adapter]",
        "--set",
        "benchmark.cell_retries=1",
    ]
    # 32 training images give no full batch of 64: the cell raises inside its Ray task.
    assert benchmark_all.main([*args, "--set", "optim.batch_size=64"]) == 1
    out, err = capsys.readouterr()
    assert "adapter/camouflage/seed0: FAILED after 2 attempt(s)" in out
    assert "no full batch of 64" in out and "1 cell(s) FAILED" in err
    md = (tmp_path / "runs" / "failing" / "results.md").read_text()
    assert "1 cell(s) FAILED and are missing from the table" in md
    assert "SAM zero-shot (teacher)" in md and "| Adapter" not in md
    client = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    runs = client.search_runs([client.get_experiment_by_name("demo").experiment_id])
    by_cell = {r.data.tags.get("infosam.cell"): r for r in runs}
    failed = by_cell["adapter/camouflage/seed0"]
    assert failed.info.status == "FAILED" and "no full batch" in failed.data.tags["infosam.error"]
    assert by_cell["zero_shot/camouflage/seed0"].info.status == "FINISHED"
    assert not [r for r in runs if r.info.status == "RUNNING"]
    # Fixed and re-submitted under the same name: only the failed cell runs, in the same run.
    assert benchmark_all.main(args) == 0
    out = capsys.readouterr().out
    assert out.count("done earlier, skipped") == 1 and "1 of 2 cells to run" in out
    rerun = client.get_run(failed.info.run_id)
    assert rerun.info.status == "FINISHED" and "test/s_measure" in rerun.data.metrics
    # no checkpoint to resume, so the fix is taken; the run says its params changed
    assert rerun.data.tags["infosam.config_changes"] == "optim.batch_size: 64 -> 4"
    assert (
        "missing from the table" not in (tmp_path / "runs" / "failing" / "results.md").read_text()
    )


def test_sigterm_closes_every_open_run_as_killed(ray_local, tmp_path, synthetic_root):
    """`ray job stop` sends SIGTERM to the driver: no MLflow run may be left RUNNING."""
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    uri = f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    (tmp_path / "runs").mkdir()
    MlflowClient(uri).search_experiments()  # migrate the store once, before two processes open it
    cmd = [
        sys.executable,
        str(ROOT / "experiments" / "benchmark_all.py"),
        *benchmark_args(tmp_path, synthetic_root, "stopped"),
        "--set",
        "benchmark.methods=[adapter]",
        "--set",
        "optim.epochs=50",
    ]

    def cell_running():
        client = MlflowClient(uri)
        exp = client.get_experiment_by_name("demo")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return [r for r in runs if r.data.tags.get("infosam.cell") and r.info.status == "RUNNING"]

    # settle: inside its epochs
    code, out, _ = signal_driver_when(
        cmd, env, cell_running, signal.SIGTERM, wait_s=180, settle_s=2
    )
    assert code == 130, out[-3000:]
    assert "marked KILLED" in out
    runs = MlflowClient(uri).search_runs(
        [MlflowClient(uri).get_experiment_by_name("demo").experiment_id]
    )
    assert len(runs) == 2 and {r.info.status for r in runs} == {"KILLED"}
    # The cancelled cell gave its CPU back to the cluster.
    deadline = time.time() + 60
    while ray_local.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(1)
    assert ray_local.available_resources().get("CPU", 0) == 2


@pytest.mark.parametrize(
    ("config", "weights", "where"),
    [
        ("paper.yaml", "sam_vit_b_01ec64.pth", "segment-anything"),
        ("paper_sam2.yaml", "sam2.1_hiera_base_plus.pt", "facebookresearch/sam2"),
    ],
)
def test_missing_checkpoint_and_data_fail_early_with_instructions(
    tmp_path, capsys, config, weights, where
):
    args = [
        "--config",
        str(ROOT / "experiments" / "configs" / config),
        "--set",
        f"storage.path={tmp_path}",
    ]
    assert benchmark_all.main(args) == 2
    err = capsys.readouterr().err
    assert weights in err and where in err
    fake = tmp_path / "sam.pth"
    fake.write_bytes(b"x")
    assert (
        benchmark_all.main(
            [*args, "--set", f"model.checkpoint={fake}", "--set", f"data.root={tmp_path / 'none'}"]
        )
        == 2
    )
    assert "infosam data ingest --format convlora" in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_comparison_pairs_are_declared_in_the_config_with_defaults():
    from orchestrator.benchmark.config import load_benchmark
    from orchestrator.config import ConfigError

    bench, _ = load_benchmark(DEMO_CONFIG, ["benchmark.methods=[zero_shot,lora,lora_infosam]"])
    assert bench.comparison_pairs() == [
        ("lora_infosam", "lora"),
        ("lora", "zero_shot"),
        ("lora_infosam", "zero_shot"),
    ]
    bench, _ = load_benchmark(DEMO_CONFIG, ["benchmark.pairs=[[bitfit,lora]]"])
    assert bench.comparison_pairs() == [("bitfit", "lora")]
    with pytest.raises(ConfigError, match=r"unknown method\(s\) \['lora_plus'\]"):
        load_benchmark(DEMO_CONFIG, ["benchmark.pairs=[[lora_plus,lora]]"])
    with pytest.raises(ConfigError, match="not a \\[method, base\\] pair"):
        load_benchmark(DEMO_CONFIG, ["benchmark.pairs=[[lora]]"])
