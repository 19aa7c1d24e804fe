"""The benchmark's cell machinery without Ray: typed cell configs, timeline statistics, the chart."""

import io

import pytest

from orchestrator.benchmark.cells import Progress, timeline_stats, write_timeline
from orchestrator.benchmark.config import BenchmarkConfig, cell_config, load_benchmark
from orchestrator.benchmark.methods import METHODS
from orchestrator.config import Config, ConfigError


def test_cell_config_is_typed_and_layers_base_dataset_and_method():
    base = Config()
    base.optim.epochs = 7
    cfg = cell_config(
        base,
        "adapter_logit_kd",
        "polyp",
        3,
        {"data.test_split": "test_Kvasir", "tuning.adapter_blocks": [0, 2]},
        ["s_measure"],
    )
    assert (cfg.data.dataset, cfg.seed, cfg.optim.epochs) == ("polyp", 3, 7)
    assert cfg.data.test_split == "test_Kvasir" and cfg.tuning.adapter_blocks == [0, 2]
    assert (cfg.tuning.method, cfg.loss.distillation, cfg.loss.infosam) == (
        "adapter",
        "logit",
        False,
    )
    assert cfg.optim.metrics == ["s_measure"]
    assert base.data.dataset == "camouflage" and base.seed == 42  # the base is not touched
    # zero_shot evaluates the teacher with the adapter row's data/eval settings
    assert cell_config(base, "zero_shot", "roads", 0).tuning.method == "adapter"
    with pytest.raises(ConfigError, match=r"optim\.lr"):
        cell_config(base, "lora", "roads", 0, {"optim.lr": "fast"})


def test_every_method_gives_a_valid_cell_config():
    for method in METHODS:
        cell_config(Config(), method, "roads", 0)


def test_benchmark_keys_are_checked(tmp_path):
    path = tmp_path / "b.yaml"
    path.write_text("benchmark: {max_concurrent_cells: 0}\n")
    with pytest.raises(ConfigError, match="max_concurrent_cells"):
        load_benchmark(path)
    path.write_text("benchmark: {max_cells: 2}\n")
    with pytest.raises(ConfigError, match="max_cells"):
        load_benchmark(path)
    bench, _ = load_benchmark(None, ["benchmark.cell_retries=3"])
    assert isinstance(bench, BenchmarkConfig) and bench.cell_retries == 3


def _row(i, start, end, node="n1", status="FINISHED"):
    return {
        "cell": f"adapter/d/seed{i}",
        "method": "adapter",
        "dataset": "d",
        "seed": i,
        "status": status,
        "node": node,
        "start": start,
        "end": end,
    }


def test_timeline_stats_peak_mean_and_idle():
    # Two slots: [0,10] and [0,10] then [10,20] alone: busy 30 s over a 20 s makespan.
    rows = [_row(0, 100, 110), _row(1, 100, 110, "n2"), _row(2, 110, 120)]
    s = timeline_stats(rows)
    assert s["makespan_s"] == 20 and s["busy_s"] == 30 and s["peak_concurrency"] == 2
    assert s["mean_concurrency"] == pytest.approx(1.5)
    assert s["slot_idle_fraction"] == pytest.approx(0.25)
    assert s["makespan_vs_ideal"] == pytest.approx(20 / 15)
    assert timeline_stats([]) == {}


def test_timeline_files(tmp_path):
    rows = [_row(0, 0, 5), _row(1, 0, 4, "n2"), _row(2, 5, 9), _row(3, 4, 6, "n2", "FAILED")]
    files = write_timeline(rows, tmp_path)
    csv = (tmp_path / "timeline.csv").read_text().splitlines()
    assert len(csv) == 5 and "duration_s" in csv[0] and "node" in csv[0]
    assert (tmp_path / "timeline.png").stat().st_size > 5000
    assert set(files) == {"timeline_csv", "timeline"}


def test_progress_line_counts_and_eta():
    out = io.StringIO()
    p = Progress(10, 2, stream=out)
    assert "ETA" not in p.line(0, 2, 6, 0)  # nothing finished yet: no estimate
    p.durations = [10.0, 30.0]
    line = p.line(2, 2, 4, 0)
    # 6 cells left at 20 s each over 2 at a time: 60 s
    assert line.startswith("[benchmark] 4/10 done, 2 running, 4 pending, 0 failed")
    assert line.endswith("ETA 1m00s")
    p.show(2, 2, 4, 0, force=True)
    assert "4/10 done" in out.getvalue()
