"""Retention: how much of the pre-trained skill a fine-tuned model keeps, beside what it gains.

Every trained cell (and the teacher, in the zero_shot row) is scored on each
`benchmark.retention` set's test split. This module turns those per-image scores into the
retention table (mean ± std over seeds), paired differences vs base with the same two-level
bootstrap as the in-domain metrics (`orchestrator.benchmark.stats`), the gain-vs-retention
picture and the verdicts that name who is better on both, worse on both, or trades.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from orchestrator.benchmark.config import BenchmarkConfig, _metrics_for
from orchestrator.benchmark.stats import Comparison, compare
from orchestrator.plots import tradeoff_plot

__all__ = ["collect_retention_scores", "retention_report", "retention_table", "tradeoff"]


def collect_retention_scores(out_dir: Path, state: dict[str, Any]):
    """Every finished cell's per-image retention scores (method, dataset = the domain it
    trained on, seed, retention, image_id, prompt, one column per metric)."""
    import pandas as pd

    frames = [
        pd.read_csv(out_dir / r["scores"], dtype={"image_id": str, "prompt": str, "image": str})
        for e in state["cells"].values()
        if e.get("status") == "FINISHED"
        for r in (e.get("retention") or {}).values()
        if r.get("scores") and (out_dir / r["scores"]).is_file()
    ]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def retention_table(state: dict[str, Any], bench: BenchmarkConfig):
    """Methods x (trained domain -> retention set): the set's main metric, mean ± std over
    seeds in %, and the share of the teacher's score kept."""
    import pandas as pd

    rows = [
        {
            "method": e["method"],
            "dataset": e["dataset"],
            "seed": e["seed"],
            "retention": name,
            "metric": key.rsplit("/", 1)[1],
            "value": value,
        }
        for e in state["cells"].values()
        if e.get("status") == "FINISHED"
        for name, r in (e.get("retention") or {}).items()
        for key, value in r["metrics"].items()
    ]
    raw = pd.DataFrame(rows)
    if raw.empty:
        return raw, raw
    agg = raw.groupby(["method", "dataset", "retention", "metric"])["value"].agg(["mean", "std"])
    agg = agg.reset_index()
    agg["cell"] = [
        f"{100 * m:.1f} ± {0 if pd.isna(s) else 100 * s:.1f}"
        for m, s in zip(agg["mean"], agg["std"])
    ]
    table = agg.pivot_table(
        index="method", columns=["dataset", "retention", "metric"], values="cell", aggfunc="first"
    )
    cols = [  # each set's main metric: the other metrics are in the differences table
        (d, r, _metrics_for(bench, r)[0])
        for r in bench.retention
        for d in bench.datasets
        if (d, r, _metrics_for(bench, r)[0]) in table.columns
    ]
    labels = bench.labels()
    table = table.loc[[m for m in bench.methods if m in table.index], cols]
    table.columns = [f"{d} → {r} {m}" for d, r, m in table.columns]
    means = agg.set_index(["method", "dataset", "retention", "metric"])["mean"]
    for r in bench.retention:  # the headline: the share of the teacher's score kept
        main = _metrics_for(bench, r)[0]
        for d in bench.datasets:
            ref = means.get(("zero_shot", d, r, main))
            if ref and (d, r, main) in cols:
                table[f"{d} → {r}: kept"] = [
                    f"{100 * means[(m, d, r, main)] / ref:.0f}%"
                    if (m, d, r, main) in means.index
                    else "-"
                    for m in table.index
                ]
    table.index = [labels.get(m, m) for m in table.index]
    return table, raw


def retention_comparisons(scores, bench: BenchmarkConfig) -> list[Comparison]:
    """Paired differences vs base on each retention set, per trained domain (`dataset`); the
    retention set's name is put in front of the metric (`general:iou`)."""
    out: list[Comparison] = []
    if scores.empty:
        return out
    for name in bench.retention:
        sub = scores[scores["retention"] == name]
        metrics = _metrics_for(bench, name)
        for c in compare(
            sub,
            bench.comparison_pairs(),
            {d: metrics for d in bench.datasets},
            resamples=bench.bootstrap_resamples,
            confidence=bench.confidence,
            rng_seed=bench.bootstrap_seed,
        ):
            c.metric = f"{name}:{c.metric}"
            out.append(c)
    return out


def _find(comparisons: list[Comparison], method: str, base: str, dataset: str, metric: str):
    return next(
        (
            c
            for c in comparisons
            if (c.method, c.base, c.dataset, c.metric) == (method, base, dataset, metric)
        ),
        None,
    )


def _joint_verdict(gain: str, kept: str) -> str:
    """One phrase for (in-domain verdict, retention verdict)."""
    table = {
        ("better", "better"): "better on both",
        ("worse", "worse"): "worse on both",
        ("better", "worse"): "trades retention for in-domain gain",
        ("worse", "better"): "trades in-domain score for retention",
    }
    if (gain, kept) in table:
        return table[(gain, kept)]
    none = "no detectable difference"
    if gain == none and kept == none:
        return "no detectable difference on either"
    if gain == none:
        return f"{kept} on retention, in-domain unchanged"
    return f"{gain} in-domain, retention unchanged"


def tradeoff(
    in_domain: list[Comparison], kept: list[Comparison], bench: BenchmarkConfig
) -> list[dict[str, Any]]:
    """One point per (pair, trained domain, retention set) with both differences, intervals
    and the joint verdict. Pairs vs the zero-shot teacher are left out: they sit tens of
    points away (the retention table shows them)."""
    labels = bench.labels()
    points = []
    for method, base in bench.comparison_pairs():
        if base == "zero_shot":
            continue
        for d in bench.datasets:
            main = _metrics_for(bench, d)[0]
            gain = _find(in_domain, method, base, d, main)
            for name in bench.retention:
                r_main = f"{name}:{_metrics_for(bench, name)[0]}"
                keep = _find(kept, method, base, d, r_main)
                if gain is None or keep is None:
                    continue
                points.append(
                    {
                        "panel": f"trained on {d}, retention on {name}",
                        "dataset": d,
                        "retention": name,
                        "method": method,
                        "base": base,
                        "label": f"{labels.get(method, method)} vs {labels.get(base, base)}",
                        "x": gain.difference,
                        "x_low": gain.ci_low,
                        "x_high": gain.ci_high,
                        "y": keep.difference,
                        "y_low": keep.ci_low,
                        "y_high": keep.ci_high,
                        "x_name": f"{d} {main}: difference vs base (points)",
                        "y_name": f"{r_main.replace(':', ' ')}: difference vs base (points)",
                        "verdict": _joint_verdict(gain.verdict, keep.verdict),
                    }
                )
    return points


def _differences_markdown(kept: list[Comparison], bench: BenchmarkConfig) -> str:
    """The paired differences on the retention sets as one markdown table."""
    import pandas as pd

    labels = bench.labels()
    rows: dict[str, dict[str, str]] = {}
    for c in kept:
        mark = " *" if c.significant else ""
        label = f"{labels.get(c.method, c.method)} vs {labels.get(c.base, c.base)}"
        rows.setdefault(label, {})[f"{c.dataset} → {c.metric.replace(':', ' ')}"] = (
            f"{c.difference:+.1f} [{c.ci_low:+.1f}, {c.ci_high:+.1f}]{mark}"
        )
    frame = pd.DataFrame.from_dict(rows, orient="index").fillna("-")
    return (
        "\nPaired differences on the retention sets (method - base, points), same bootstrap as "
        f"the in-domain differences; `*`: the interval excludes 0.\n\n{frame.to_markdown()}\n"
    )


def retention_report(
    out_dir: Path,
    state: dict[str, Any],
    bench: BenchmarkConfig,
    in_domain: list[Comparison],
    files: dict[str, str],
) -> str:
    """The retention section of results.md; retention_scores.csv, retention_differences.csv
    and tradeoff.png are added to `files`."""
    if not bench.retention:
        return ""
    import pandas as pd

    table, _ = retention_table(state, bench)
    if table.empty:
        return ""
    scores = collect_retention_scores(out_dir, state)
    kept = retention_comparisons(scores, bench)
    files["retention_scores"] = str(out_dir / "retention_scores.csv")
    scores.to_csv(files["retention_scores"], index=False)
    md = (
        "\n## Retention: the pre-trained skill kept\n\nEach trained model (and the teacher, in "
        "the zero-shot row) scored on the test split of "
        f"{', '.join(f'`{r}`' for r in bench.retention)} after training on the domain named "
        "in the column: mean ± std over seeds, in %. The zero-shot row is the reference "
        "before any fine-tuning; `kept` is a method's main-metric mean over the "
        f"teacher's.\n\n{table.to_markdown()}\n"
    )
    if not kept:
        return md
    files["retention_differences"] = str(out_dir / "retention_differences.csv")
    pd.DataFrame([c.as_row() for c in kept]).to_csv(files["retention_differences"], index=False)
    md += _differences_markdown(kept, bench)
    points = tradeoff(in_domain, kept, bench)
    if points:
        files["tradeoff"] = str(out_dir / "tradeoff.png")
        tradeoff_plot(points, list(dict.fromkeys(p["panel"] for p in points)), files["tradeoff"])
        lines = [
            f"- **{p['label']}** ({p['dataset']} → {p['retention']}): {p['verdict']} "
            f"(in-domain {p['x']:+.1f} [{p['x_low']:+.1f}, {p['x_high']:+.1f}], retention "
            f"{p['y']:+.1f} [{p['y_low']:+.1f}, {p['y_high']:+.1f}])"
            for p in points
        ]
        md += (
            "\nGain vs retention (tradeoff.png), on each dataset's main metric:\n\n"
            + "\n".join(lines)
            + "\n"
        )
    return md
