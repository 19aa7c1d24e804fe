"""A benchmark YAML: a training config (the base every cell starts from) plus a `benchmark:`
section, read into a `BenchmarkConfig` and checked before any cell runs."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any

from orchestrator.benchmark.methods import DEFAULT_PAIRS, LABELS, METHODS
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
    # Retention: datasets every trained cell (and the teacher, in the zero_shot row) is also
    # scored on, test split, after training: how much of the pre-trained skill a method keeps
    # beside what it gains. Embedded demo: the teacher's own `general` domain; with a real SAM,
    # any ingested dataset (e.g. a COCO or SA-1B subset).
    retention: list[str] = field(default_factory=list)
    # Methods of this benchmark only, each a built-in method plus overrides:
    # {adapter_infosam_wd5: {like: adapter_infosam, set: {loss.weight_distillation: 5.0},
    #  label: "Adapter + InfoSAM, w_d 5"}}; compared with what `like` is compared with.
    custom_methods: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Register each dataset's best cell as MLflow model `<name>-<dataset>` with alias
    # `champion` (orchestrator.benchmark.champions); cells log models only with
    # tracking.log_model=true.
    register_models: bool = True

    def method_table(self) -> dict[str, dict[str, Any] | None]:
        """Every method this benchmark can run: the built-ins and its custom ones."""
        table = dict(METHODS)
        for name, spec in self.custom_methods.items():
            table[name] = {**(METHODS[spec["like"]] or {}), **dict(spec.get("set") or {})}
        return table

    def labels(self) -> dict[str, str]:
        custom = {n: s.get("label") or n for n, s in self.custom_methods.items()}
        return {**LABELS, **custom}

    def comparison_pairs(self) -> list[tuple[str, str]]:
        """The declared pairs (or the defaults) whose two methods are both in this benchmark."""
        if self.pairs is None:
            pairs = list(DEFAULT_PAIRS)
            for name, spec in self.custom_methods.items():  # compared as the method it extends
                pairs += [(name, b) for a, b in DEFAULT_PAIRS if a == spec["like"]]
        else:
            pairs = [tuple(p) for p in self.pairs]
        return [(a, b) for a, b in pairs if a in self.methods and b in self.methods]


def load_benchmark(
    path: str | os.PathLike | None, overrides: list[str] | None = None
) -> tuple[BenchmarkConfig, Config]:
    """The benchmark section and the base config every cell starts from, checked."""
    bench, base = load_with_section(path, overrides, "benchmark", BenchmarkConfig)
    _check_custom_methods(bench, base)
    known = list(bench.method_table())
    bad = [m for m in bench.methods if m not in known]
    if bad:
        raise ConfigError(
            f"unknown benchmark method(s) {bad}; choose from {known} or declare them under "
            "benchmark.custom_methods"
        )
    for pair in bench.pairs or []:
        if not (isinstance(pair, list | tuple) and len(pair) == 2):
            raise ConfigError(f"benchmark.pairs: {pair!r} is not a [method, base] pair")
        unknown_pair = [m for m in pair if m not in known]
        if unknown_pair:
            raise ConfigError(
                f"benchmark.pairs: unknown method(s) {unknown_pair} in {pair}; choose from {known}"
            )
    if bench.bootstrap_resamples < 100 or not 0.5 < bench.confidence < 1:
        raise ConfigError(
            "benchmark.bootstrap_resamples must be >= 100 and benchmark.confidence in (0.5, 1)"
        )
    if bench.max_concurrent_cells is not None and bench.max_concurrent_cells < 1:
        raise ConfigError("benchmark.max_concurrent_cells must be >= 1 (or null: no cap)")
    dup = [d for d in bench.retention if bench.retention.count(d) > 1]
    if dup:
        raise ConfigError(f"benchmark.retention lists {sorted(set(dup))} more than once")
    return bench, base


def _check_custom_methods(bench: BenchmarkConfig, base: Config) -> None:
    """Each custom method extends a built-in one with overrides a training config accepts."""
    for name, spec in bench.custom_methods.items():
        where = f"benchmark.custom_methods.{name}"
        if name in METHODS:
            raise ConfigError(f"{where}: {name!r} is a built-in method; give it another name")
        if not isinstance(spec, dict) or not METHODS.get(spec.get("like") or ""):
            raise ConfigError(
                f"{where}: needs `like:` naming the trained built-in method it extends, one of "
                f"{[m for m in METHODS if METHODS[m]]}"
            )
        extra = set(spec) - {"like", "set", "label"}
        if extra:
            raise ConfigError(f"{where}: unknown key(s) {sorted(extra)}; use like, set, label")
        try:
            base.with_values(bench.method_table()[name])
        except ConfigError as exc:
            raise ConfigError(f"{where}.set: {exc}") from None


def cell_config(
    base: Config,
    method: str,
    dataset: str,
    seed: int,
    extra: dict[str, Any] | None = None,
    metrics: list[str] | None = None,
    methods: dict[str, dict[str, Any] | None] | None = None,
) -> Config:
    """The typed config of one cell: base + dataset overrides + the method's overrides
    (`methods`: a benchmark's `method_table()`, default the built-ins)."""
    table = METHODS if methods is None else methods
    values: dict[str, Any] = {"data.dataset": dataset, "seed": seed, **(extra or {})}
    values.update(table[method] or METHODS["adapter"])  # zero_shot: adapter row's settings
    if metrics is not None:
        values["optim.metrics"] = list(metrics)
    return base.with_values(values)


def _metrics_for(bench: BenchmarkConfig, dataset: str) -> list[str]:
    return bench.metrics.get(dataset, bench.default_metrics)


def retention_config(
    bench: BenchmarkConfig, base: Config, cell_cfg: Config, dataset: str
) -> Config:
    """How a cell's model is scored on a retention set: its own config (seed, so the same eval
    prompts as its base's at that seed; protocol) with the base's data settings on that
    dataset, the dataset's overrides and metrics (not those of the domain it trained on)."""
    values: dict[str, Any] = {"data.dataset": dataset, **bench.overrides.get(dataset, {})}
    values["optim.metrics"] = list(_metrics_for(bench, dataset))
    return dataclasses.replace(cell_cfg, data=base.data).with_values(values)
