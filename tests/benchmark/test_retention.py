"""The retention report from recorded cells: table, paired differences, trade-off verdicts."""

import json

import numpy as np
import pandas as pd
import pytest

from orchestrator.benchmark.cells import Cell
from orchestrator.benchmark.config import BenchmarkConfig, load_benchmark
from orchestrator.benchmark.report import _write_cell_scores, _write_outputs, results_table
from orchestrator.config import ConfigError
from tests.helpers import ROOT

DEMO = ROOT / "orchestrator" / "benchmark" / "demo.yaml"

# (in-domain iou, retention iou) per method: the InfoSAM variant gains nothing on roads and
# keeps far more of `general`; logit KD loses on both.
LEVELS = {
    "zero_shot": (0.40, 0.90),
    "adapter": (0.70, 0.30),
    "adapter_infosam": (0.70, 0.50),
    "adapter_logit_kd": (0.60, 0.20),
}


def _recorded_benchmark(out_dir):
    """cells.json and per-image score files as a finished benchmark leaves them."""
    rng = np.random.default_rng(0)
    bench = BenchmarkConfig(
        name="kept",
        methods=list(LEVELS),
        datasets=["roads"],
        seeds=[0, 1],
        retention=["general"],
        bootstrap_resamples=500,
    )
    state = {"cells": {}}
    images = [f"img{i:02d}" for i in range(30)]
    for method, (gain, kept) in LEVELS.items():
        for seed in bench.seeds:
            cell = Cell(method, "roads", seed)
            noise = rng.normal(0, 0.01, size=(2, len(images)))
            domain = [
                {"image_id": im, "prompt": f"box{i}", "image": im, "iou": gain + n, "dice": gain}
                for i, (im, n) in enumerate(zip(images, noise[0]))
            ]
            general = [
                {"image_id": im, "prompt": f"pt{i}", "image": im, "iou": kept + n, "dice": kept}
                for i, (im, n) in enumerate(zip(images, noise[1]))
            ]
            state["cells"][cell.key] = {
                "status": "FINISHED",
                "method": method,
                "dataset": "roads",
                "seed": seed,
                "metrics": {"test/iou": gain, "test/dice": gain},
                "scores": _write_cell_scores(out_dir, cell, domain),
                "retention": {
                    "general": {
                        "metrics": {"retention/general/iou": kept, "retention/general/dice": kept},
                        "scores": _write_cell_scores(out_dir, cell, general, retention="general"),
                    }
                },
            }
    (out_dir / "cells.json").write_text(json.dumps(state))
    return bench, state


def test_retention_table_differences_and_tradeoff_verdicts(tmp_path):
    bench, state = _recorded_benchmark(tmp_path)
    table, raw = results_table(state, bench)
    files = _write_outputs(tmp_path, table, raw, {"benchmark": "kept"}, bench, state)
    md = (tmp_path / "results.md").read_text()
    section = md.split("## Retention: the pre-trained skill kept")[1]
    assert "roads → general iou" in section
    assert "| SAM zero-shot (teacher) | 90.0 ± 0.0" in section.replace("  ", " ")
    diffs = pd.read_csv(files["retention_differences"])
    infosam = diffs[(diffs.method == "adapter_infosam") & (diffs.base == "adapter")]
    row = infosam[infosam.metric == "general:iou"].iloc[0]
    assert row.difference == pytest.approx(20.0, abs=1.0) and row.verdict == "better"
    assert (diffs[diffs.base == "zero_shot"].verdict == "worse").all()  # all lose general skill
    # The picture and one verdict line per pair vs a PEFT base (the teacher pairs sit apart)
    assert (tmp_path / "tradeoff.png").stat().st_size > 5000
    assert (
        "**Adapter + InfoSAM vs Adapter** (roads → general): better on retention, in-domain unchanged"
        in section
    )
    assert "**Adapter + logit KD vs Adapter** (roads → general): worse on both" in section
    assert "vs SAM zero-shot (teacher)** (roads" not in section
    scores = pd.read_csv(files["retention_scores"])
    assert len(scores) == 4 * 2 * 30 and set(scores.retention) == {"general"}


def test_custom_methods_extend_a_builtin_and_are_compared_like_it():
    bench, base = load_benchmark(
        DEMO,
        [
            "benchmark.methods=[adapter,adapter_infosam,wd5]",
            "benchmark.custom_methods={wd5: {like: adapter_infosam, label: 'InfoSAM w_d 5', "
            "set: {loss.weight_distillation: 5.0}}}",
        ],
    )
    from orchestrator.benchmark.config import cell_config

    cfg = cell_config(base, "wd5", "roads", 0, methods=bench.method_table())
    assert cfg.loss.weight_distillation == 5.0 and cfg.loss.infosam
    assert cfg.tuning.method == "adapter"
    assert ("wd5", "adapter") in bench.comparison_pairs()
    assert bench.labels()["wd5"] == "InfoSAM w_d 5"
    with pytest.raises(ConfigError, match=r"custom_methods.bad: needs `like:`"):
        load_benchmark(DEMO, ["benchmark.custom_methods={bad: {like: zero_shot}}"])
    with pytest.raises(ConfigError, match=r"custom_methods.wd5.set: .*loss.weight_typo"):
        load_benchmark(
            DEMO,
            ["benchmark.custom_methods={wd5: {like: adapter, set: {loss.weight_typo: 1}}}"],
        )
