"""A benchmark's files: per-cell scores, results.md (tables, paired differences, costs), the
forest plot and bar chart, collected from cells.json."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.benchmark.cells import (
    Cell,
)
from orchestrator.benchmark.config import BenchmarkConfig, _metrics_for
from orchestrator.benchmark.retention import retention_report
from orchestrator.benchmark.stats import compare
from orchestrator.plots import bar_chart, forest_plot
from orchestrator.storage import (
    atomic_write,
)


def _write_cell_scores(
    out_dir: Path, cell: Cell, rows: list[dict[str, Any]], retention: str | None = None
) -> str | None:
    """A finished cell's per-image test scores, kept beside cells.json (a resume re-reads them);
    with `retention`, its scores on that retention set (`scores/retention/<set>/`)."""
    if not rows:
        return None
    import pandas as pd

    folder = out_dir / "scores" / ("retention" if retention else "") / (retention or "")
    path = folder / f"{cell.method}-{cell.dataset}-seed{cell.seed}.csv"
    path.parent.mkdir(parents=True, exist_ok=True)
    where = {"cell": cell.key, "method": cell.method, "dataset": cell.dataset, "seed": cell.seed}
    if retention:
        where["retention"] = retention
    pd.DataFrame([where | r for r in rows]).to_csv(path, index=False)
    return str(path.relative_to(out_dir))


def collect_scores(out_dir: Path, state: dict[str, Any]):
    """Every finished cell's per-image scores in one table (method, dataset, seed, image_id,
    prompt, one column per metric)."""
    import pandas as pd

    frames = [
        pd.read_csv(out_dir / e["scores"], dtype={"image_id": str, "prompt": str, "image": str})
        for e in state["cells"].values()
        if e.get("status") == "FINISHED" and e.get("scores") and (out_dir / e["scores"]).is_file()
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def results_table(state: dict[str, Any], bench: BenchmarkConfig):
    """(markdown-ready table of mean ± std over seeds, raw per-cell DataFrame)."""
    import pandas as pd

    rows = []
    for cell in state["cells"].values():
        if cell.get("status", "FINISHED") != "FINISHED":
            continue  # listed under the table as missing, never averaged
        for k, v in cell["metrics"].items():
            rows.append(
                {
                    "method": cell["method"],
                    "dataset": cell["dataset"],
                    "seed": cell["seed"],
                    "metric": k.split("/", 1)[1],
                    "value": v,
                }
            )
    raw = pd.DataFrame(rows)
    if raw.empty:
        return raw, raw
    raw = raw[raw.apply(lambda r: r["metric"] in _metrics_for(bench, r["dataset"]), axis=1)]
    agg = (
        raw.groupby(["method", "dataset", "metric"])["value"]
        .agg(["mean", "std", "count"])
        .reset_index()
    )
    seeds = len(bench.seeds)
    agg["cell"] = agg.apply(
        lambda r: (
            f"{100 * r['mean']:.1f} ± {0 if pd.isna(r['std']) else 100 * r['std']:.1f}"
            + ("" if r["count"] >= seeds else f" (n={int(r['count'])}/{seeds})")
        ),
        axis=1,
    )
    table = agg.pivot_table(
        index="method", columns=["dataset", "metric"], values="cell", aggfunc="first"
    )
    order = [m for m in bench.methods if m in table.index]
    cols = [
        (d, m) for d in bench.datasets for m in _metrics_for(bench, d) if (d, m) in table.columns
    ]
    table = table.loc[order, cols]
    table.columns = [f"{d} {m}" for d, m in table.columns]
    costs = _costs(state)
    table["trainable params"] = [_count(costs.get(m, {}).get("params")) for m in table.index]
    table["train s / cell"] = [
        f"{costs[m]['train_s']:.1f}" if costs.get(m, {}).get("train_s") else "-"
        for m in table.index
    ]
    labels = bench.labels()
    table.index = [labels.get(m, m) for m in table.index]
    return table, raw


def _costs(state: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per method: trainable parameters and mean training seconds per finished cell."""
    out: dict[str, dict[str, list[float]]] = {}
    for e in state["cells"].values():
        if e.get("status") != "FINISHED":
            continue
        m = out.setdefault(e["method"], {"params": [], "train_s": []})
        m["params"].append(float(e.get("trainable_params", 0)))
        if (e.get("timings") or {}).get("train_s"):
            m["train_s"].append(float(e["timings"]["train_s"]))
    return {
        k: {n: (sum(v) / len(v) if v else 0.0) for n, v in vals.items()} for k, vals in out.items()
    }


def _count(n: float | None) -> str:
    if not n:
        return "0"
    for unit, div in (("M", 1e6), ("k", 1e3)):
        if n >= div:
            return f"{n / div:.1f}{unit}"
    return f"{n:.0f}"


def _write_outputs(
    out_dir: Path,
    table,
    raw,
    provenance: dict[str, Any],
    bench: BenchmarkConfig,
    state: dict[str, Any],
) -> dict[str, str]:
    """results.md (provenance, the table, failed cells, paired differences, categories),
    results.csv, the bar chart, and the per-image scores behind the differences."""
    header = "\n".join(f"- {k}: {v}" for k, v in provenance.items())
    seeds = len(bench.seeds)
    files = {
        "markdown": str(out_dir / "results.md"),
        "csv": str(out_dir / "results.csv"),
        "chart": str(out_dir / "results.png"),
    }
    scores = collect_scores(out_dir, state)
    differences, comparisons = _write_differences(out_dir, scores, bench, files)
    retention = retention_report(out_dir, state, bench, comparisons, files)
    units = ""
    if not scores.empty and "image" in scores.columns:
        per_instance = scores["image"].astype(str) != scores["image_id"].astype(str)
        if per_instance.any():
            names = ", ".join(sorted(scores.loc[per_instance, "dataset"].unique()))
            units = f" On {names} (instance datasets) a value is a mean over instances."
    md = (
        f"# Benchmark `{bench.name}`\n\n{header}\n\nValues: mean ± std over {seeds} seed(s), in %, "
        f"on each dataset's test split; trainable parameters and training seconds per cell "
        f"(mean over its cells) on the right.{units}\n\n{table.to_markdown()}\n"
        f"{_failed_markdown(state, seeds)}{differences}{retention}"
        f"{_category_markdown(scores, bench)}"
    )
    atomic_write(files["markdown"], md)
    raw.to_csv(files["csv"], index=False)
    bar_chart(
        raw, bench.datasets, bench.methods, _main_metrics(bench), bench.labels(), files["chart"]
    )
    print(md, flush=True)
    return files


def _failed_markdown(state: dict[str, Any], seeds: int) -> str:
    """The failed cells, named with their errors, or nothing."""
    failed = {k: e for k, e in state["cells"].items() if e.get("status") == "FAILED"}
    if not failed:
        return ""
    lines = "\n".join(f"- `{k}`: {e.get('error', '')}" for k, e in sorted(failed.items()))
    return (
        f"\n**{len(failed)} cell(s) FAILED and are missing from the table** (values with "
        f"n=k/{seeds} average the seeds that finished); re-run the same benchmark name to "
        f"retry them:\n\n{lines}\n"
    )


def _write_differences(
    out_dir: Path, scores: Any, bench: BenchmarkConfig, files: dict
) -> tuple[str, list]:
    """scores.csv, differences.csv and the forest plot (added to `files`); their markdown and
    the comparisons."""
    if scores.empty:
        return "", []
    files["scores"] = str(out_dir / "scores.csv")
    scores.to_csv(files["scores"], index=False)
    comparisons = compare(
        scores,
        bench.comparison_pairs(),
        {d: _metrics_for(bench, d) for d in bench.datasets},
        resamples=bench.bootstrap_resamples,
        confidence=bench.confidence,
        rng_seed=bench.bootstrap_seed,
    )
    if not comparisons:
        return "", []
    import pandas as pd

    files["differences"] = str(out_dir / "differences.csv")
    pd.DataFrame([c.as_row() for c in comparisons]).to_csv(files["differences"], index=False)
    files["forest"] = str(out_dir / "differences.png")
    label = _pair_labeller(bench)
    forest_plot(comparisons, bench.datasets, _main_metrics(bench), label, files["forest"])
    return _differences_markdown(comparisons, bench), comparisons


def _category_markdown(scores, bench: BenchmarkConfig) -> str:
    """Instance datasets with categories: each method's test metric per category (mean over
    seeds of the per-category mean over instances), in %. The headline mean follows the common
    classes; a method that fails a rare one shows here."""
    if scores.empty or "category" not in scores.columns:
        return ""
    parts = []
    for dataset in bench.datasets:
        d = scores[(scores["dataset"] == dataset) & scores["category"].notna()]
        if d.empty:
            continue
        metric = _metrics_for(bench, dataset)[0]
        d = d.assign(category=d["category"].astype(str))
        per_seed = d.groupby(["method", "seed", "category"])[metric].mean()
        table = per_seed.groupby(["category", "method"]).mean().unstack("method") * 100
        table = table[[m for m in bench.methods if m in table.columns]]
        table.columns = [bench.labels().get(m, m) for m in table.columns]
        means = table.mean()
        counts = d.groupby("category")["image_id"].nunique().reindex(table.index)
        table.insert(0, "instances", [str(int(n)) for n in counts])
        table.loc["**mean over categories**"] = [f"{len(counts)} categories", *means]
        parts.append(
            f"\n### Per category: {dataset}, test {metric} (%)\n\nMean over seeds of each "
            f"category's mean over its instances; the last row weighs every category once.\n\n"
            f"{table.to_markdown(floatfmt='.1f')}\n"
        )
    return "".join(parts)


def _pair_labeller(bench: BenchmarkConfig):
    """`method vs base` in the benchmark's labels (custom methods included)."""
    labels = bench.labels()
    return lambda method, base: f"{labels.get(method, method)} vs {labels.get(base, base)}"


def _differences_markdown(comparisons: list, bench: BenchmarkConfig) -> str:
    """The "differences vs base" table (difference [CI], * = interval excludes 0) + verdicts."""
    import pandas as pd

    first = comparisons[0]
    _pair_label = _pair_labeller(bench)
    rows: dict[str, dict[str, str]] = {}
    for c in comparisons:
        mark = " *" if c.significant else ""
        rows.setdefault(_pair_label(c.method, c.base), {})[f"{c.dataset} {c.metric}"] = (
            f"{c.difference:+.1f} [{c.ci_low:+.1f}, {c.ci_high:+.1f}]{mark}"
        )
    cols = [
        f"{d} {m}"
        for d in bench.datasets
        for m in _metrics_for(bench, d)
        if any(f"{d} {m}" in r for r in rows.values())
    ]
    frame = pd.DataFrame.from_dict(rows, orient="index").reindex(columns=cols).fillna("-")
    verdicts = []
    for method, base in dict.fromkeys((c.method, c.base) for c in comparisons):
        parts = []
        for d in bench.datasets:
            main = _metrics_for(bench, d)[0]
            c = next(
                (
                    x
                    for x in comparisons
                    if (x.method, x.base, x.dataset, x.metric) == (method, base, d, main)
                ),
                None,
            )
            if c is not None:
                parts.append(
                    f"{d} {c.verdict} ({main} {c.difference:+.1f} "
                    f"[{c.ci_low:+.1f}, {c.ci_high:+.1f}])"
                )
        verdicts.append(f"- **{_pair_label(method, base)}**: " + "; ".join(parts))
    mismatched = sum(c.prompt_mismatches for c in comparisons)
    note = (
        f"\n{mismatched} image/seed pairs were scored with different prompts.\n"
        if mismatched
        else ""
    )
    units, clusters = f"{first.images} images", ""
    if first.samples > first.images:  # an instance dataset: the image is the unit drawn
        units = f"{first.samples} instances in {first.images} images"
        clusters = " with all their instances"
    return (
        f"\n## Differences vs base\n\nMean paired difference (method - base) in points on the "
        f"same test images and seeds ({first.seeds} seed(s) x {units} on the first "
        f"dataset), with a {100 * first.confidence:.0f}% interval from a two-level bootstrap "
        f"(seeds, then images{clusters}; {first.resamples} resamples, RNG seed "
        f"{first.rng_seed}). "
        f"`*`: the interval excludes 0. Intervals are per comparison, not corrected for the "
        f"number of comparisons.\n\n{frame.to_markdown()}\n{note}\n"
        f"Verdicts on each dataset's main metric:\n\n" + "\n".join(verdicts) + "\n"
    )


def _main_metrics(bench: BenchmarkConfig) -> dict[str, str]:
    """Each dataset's headline metric (the first of its metrics)."""
    return {d: _metrics_for(bench, d)[0] for d in bench.datasets}
