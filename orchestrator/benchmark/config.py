"""A benchmark YAML: a training config (the base every cell starts from) plus a `benchmark:`
section, read into a `BenchmarkConfig` and checked before any cell runs."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

from orchestrator.benchmark.methods import DEFAULT_PAIRS, METHODS
from orchestrator.config import (
    Config,
    ConfigError,
    load_with_section,
)


@dataclass
class BenchmarkConfig:
    name: str = "demo"
    methods: list[str] = field(default_factory=lambda: list(METHODS))
    datasets: list[str] = field(default_factory=lambda: ["camouflage", "roads", "lesions"])
    seeds: list[int] = field(default_factory=lambda: [0, 1])
    # Metrics per dataset (the paper's per benchmark); datasets not listed use `default_metrics`.
    metrics: dict[str, list[str]] = field(default_factory=dict)
    default_metrics: list[str] = field(default_factory=lambda: ["iou", "dice"])
    # Per-dataset overrides of the base config, e.g. {polyp: {data.test_split: test_Kvasir}}.
    overrides: dict[str, dict[str, Any]] = field(default_factory=dict)
    output: str | None = None  # default: <storage.path>/<name>
    # Cells running at once. null: no cap when connected to a cluster (its resources, and the
    # autoscaler's, decide); on a Ray this process started, as many as its CPUs hold.
    max_concurrent_cells: int | None = None
    # Retries of a cell that raised or whose node/worker died, before it is recorded FAILED.
    cell_retries: int = 1
    # Paired comparisons [method, base] on the same test images and seeds; null: DEFAULT_PAIRS
    # (InfoSAM variants vs their PEFT base, the KD baselines vs adapter, all vs zero_shot).
    pairs: list[list[str]] | None = None
    # The two-level (seeds, images) bootstrap of each mean difference (orchestrator.benchmark.stats).
    bootstrap_resamples: int = 2000
    bootstrap_seed: int = 0
    confidence: float = 0.95

    def comparison_pairs(self) -> list[tuple[str, str]]:
        """The declared pairs (or the defaults) whose two methods are both in this benchmark."""
        pairs = DEFAULT_PAIRS if self.pairs is None else [tuple(p) for p in self.pairs]
        return [(a, b) for a, b in pairs if a in self.methods and b in self.methods]


def load_benchmark(
    path: str | os.PathLike | None, overrides: list[str] | None = None
) -> tuple[BenchmarkConfig, Config]:
    """The benchmark section and the base config every cell starts from, checked."""
    bench, base = load_with_section(path, overrides, "benchmark", BenchmarkConfig)
    bad = [m for m in bench.methods if m not in METHODS]
    if bad:
        raise ConfigError(f"unknown benchmark method(s) {bad}; choose from {list(METHODS)}")
    for pair in bench.pairs or []:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise ConfigError(f"benchmark.pairs: {pair!r} is not a [method, base] pair")
        unknown_pair = [m for m in pair if m not in METHODS]
        if unknown_pair:
            raise ConfigError(
                f"benchmark.pairs: unknown method(s) {unknown_pair} in {pair}; "
                f"choose from {list(METHODS)}"
            )
    if bench.bootstrap_resamples < 100 or not 0.5 < bench.confidence < 1:
        raise ConfigError(
            "benchmark.bootstrap_resamples must be >= 100 and benchmark.confidence in (0.5, 1)"
        )
    if bench.max_concurrent_cells is not None and bench.max_concurrent_cells < 1:
        raise ConfigError("benchmark.max_concurrent_cells must be >= 1 (or null: no cap)")
    return bench, base


def cell_config(
    base: Config,
    method: str,
    dataset: str,
    seed: int,
    extra: dict[str, Any] | None = None,
    metrics: list[str] | None = None,
) -> Config:
    """The typed config of one cell: base + dataset overrides + the method's overrides."""
    values: dict[str, Any] = {"data.dataset": dataset, "seed": seed, **(extra or {})}
    values.update(METHODS[method] or METHODS["adapter"])  # zero_shot: adapter row's settings
    if metrics is not None:
        values["optim.metrics"] = list(metrics)
    return base.with_values(values)


def _metrics_for(bench: BenchmarkConfig, dataset: str) -> list[str]:
    return bench.metrics.get(dataset, bench.default_metrics)
