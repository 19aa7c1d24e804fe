"""Every picture people look at, with one matplotlib set-up: prediction overlays, loss curves,
per-category bars, the benchmark's forest plot and bars, the cell timeline, the sweep scatter.

Figures are drawn off-screen (Agg) on any machine; `save` writes and closes one, and
`RunLogger.log_figure` logs and closes one, so no caller manages matplotlib state.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw


def pyplot() -> Any:
    """matplotlib.pyplot on the Agg backend (no display needed: CI, Ray workers, clusters)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save(fig: Any, path: str | Path) -> str:
    """Write `fig` as a PNG and release it; returns the path."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return str(path)


_COLOURS = {"gt": (0, 200, 0), "teacher": (0, 120, 255), "student": (255, 60, 0)}


def overlay(
    image: np.ndarray, mask: np.ndarray, colour: tuple[int, int, int], alpha: float = 0.45
) -> np.ndarray:
    """Blend a 0/1 mask over an (H, W, 3) uint8 image, with a solid outline."""
    out = image.astype(np.float32).copy()
    m = mask.astype(bool)
    out[m] = (1 - alpha) * out[m] + alpha * np.asarray(colour, np.float32)
    edge = m ^ _erode(m)
    out[edge] = colour
    return out.clip(0, 255).astype(np.uint8)


def _erode(m: np.ndarray) -> np.ndarray:
    e = m.copy()
    e[1:] &= m[:-1]
    e[:-1] &= m[1:]
    e[:, 1:] &= m[:, :-1]
    e[:, :-1] &= m[:, 1:]
    return e


def overlay_grid(
    rows: Sequence[dict[str, np.ndarray]],
    columns: Sequence[str] = ("gt", "teacher", "student"),
    tile: int = 192,
    captions: Sequence[str] | None = None,
) -> Image.Image:
    """One row per sample: the image, then each named mask overlaid (GT / teacher / student)."""
    cols = ["image", *columns]
    label_h = 16
    sheet = Image.new("RGB", (tile * len(cols), (tile + label_h) * len(rows)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        image = row["image"]
        for c, name in enumerate(cols):
            arr = (
                image
                if name == "image"
                else overlay(image, row[name], _COLOURS.get(name, (255, 0, 255)))
            )
            pic = Image.fromarray(arr)
            pic.thumbnail((tile, tile))
            y = r * (tile + label_h)
            sheet.paste(pic, (c * tile, y + label_h))
            text = name if c or not captions else f"{name} {captions[r]}"
            draw.text((c * tile + 3, y + 2), text, fill=(0, 0, 0))
    return sheet


def loss_curve_figure(history: dict[str, list[tuple[int, float]]], title: str = "") -> object:
    """Training losses and validation metrics per epoch (matplotlib figure, Agg backend)."""
    plt = pyplot()

    fig, (ax_loss, ax_val) = plt.subplots(1, 2, figsize=(11, 4))
    for key, points in sorted(history.items()):
        if not points:
            continue
        steps, values = zip(*sorted(points))
        ax = ax_val if key.startswith("val/") else ax_loss
        ax.plot(steps, values, marker="o", label=key)
    ax_loss.set_title("training losses")
    ax_val.set_title("validation")
    for ax in (ax_loss, ax_val):
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def category_figure(table: Sequence[dict], metric: str) -> object:
    """Per-category mean of `metric` as horizontal bars, lowest at the top, with instance counts
    (matplotlib figure, Agg backend): which classes the model fails on, at a glance."""
    plt = pyplot()

    rows = sorted(table, key=lambda r: r[metric], reverse=True)
    fig, ax = plt.subplots(figsize=(7, 1.2 + 0.28 * len(rows)))
    names = [f"{r['category']} (n={r['instances']})" for r in rows]
    ax.barh(range(len(rows)), [r[metric] for r in rows], color="#3b7dd8")
    ax.set_yticks(range(len(rows)), names, fontsize=8)
    total = sum(r["instances"] for r in rows)
    mean = sum(r[metric] * r["instances"] for r in rows) / max(total, 1)
    ax.axvline(mean, color="k", linestyle="--", linewidth=1)
    ax.set_title(f"dashed: the mean over all {total} instances, {mean:.3f}", fontsize=9)
    ax.set_xlabel(f"test {metric}, mean per category")
    ax.set_xlim(0, 1)  # every metric here lies in [0, 1]
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def forest_plot(
    comparisons: Sequence[Any],
    datasets: Sequence[str],
    main_metric: Mapping[str, str],
    pair_label: Callable[[str, str], str],
    path: str | Path,
) -> str:
    """One row per pair, one panel per dataset (its main metric): difference and interval.

    Pairs against the zero-shot teacher get their own row of panels: their differences are
    tens of points and would flatten the ablations' intervals on a shared axis.
    """
    plt = pyplot()

    datasets = [d for d in datasets if any(c.dataset == d for c in comparisons)]
    pairs = list(dict.fromkeys((c.method, c.base) for c in comparisons))
    groups = [
        g
        for g in (
            [p for p in pairs if p[1] != "zero_shot"],
            [p for p in pairs if p[1] == "zero_shot"],
        )
        if g
    ]
    fig, axes = plt.subplots(
        len(groups),
        len(datasets),
        figsize=(4.2 * len(datasets) + 2.8, sum(0.42 * len(g) + 1.2 for g in groups)),
        squeeze=False,
        gridspec_kw={"height_ratios": [len(g) + 1 for g in groups]},
    )
    for row, group in zip(axes, groups):
        for ax, dataset in zip(row, datasets):
            main = main_metric[dataset]
            for y, (method, base) in enumerate(group):
                c = next(
                    (
                        x
                        for x in comparisons
                        if (x.method, x.base, x.dataset, x.metric) == (method, base, dataset, main)
                    ),
                    None,
                )
                if c is None:
                    continue
                colour = {"better": "#2ca02c", "worse": "#d62728"}.get(c.verdict, "#555555")
                ax.plot([c.ci_low, c.ci_high], [y, y], color=colour, lw=2)
                ax.plot([c.difference], [y], "o", color=colour)
            ax.axvline(0, color="black", lw=0.8)
            ax.set_ylim(len(group) - 0.5, -0.5)
            ax.set_yticks(range(len(group)))
            ax.set_yticklabels(
                [pair_label(m, b) for m, b in group] if ax is row[0] else [], fontsize=8
            )
            ax.set_title(f"{dataset}: {main} difference (points)", fontsize=9)
            ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def bar_chart(
    raw: Any,
    datasets: Sequence[str],
    methods: Sequence[str],
    main_metric: Mapping[str, str],
    labels: Mapping[str, str],
    path: str | Path,
) -> str:
    """Per dataset, each method's mean main metric over seeds, with the seeds' spread."""
    plt = pyplot()

    datasets = [d for d in datasets if d in set(raw["dataset"])]
    fig, axes = plt.subplots(1, len(datasets), figsize=(5 * len(datasets), 4.5), squeeze=False)
    for ax, dataset in zip(axes[0], datasets):
        metric = main_metric[dataset]
        sub = raw[(raw["dataset"] == dataset) & (raw["metric"] == metric)]
        stats = (
            sub.groupby("method")["value"]
            .agg(["mean", "std"])
            .reindex([m for m in methods if m in set(sub["method"])])
        )
        ax.bar(
            range(len(stats)),
            stats["mean"] * 100,
            yerr=stats["std"].fillna(0) * 100,
            capsize=3,
            color=[
                "#999999"
                if m == "zero_shot"
                else "#d62728"
                if "infosam" in m or m.endswith("ld_only")
                else "#1f77b4"
                for m in stats.index
            ],
        )
        ax.set_xticks(range(len(stats)))
        ax.set_xticklabels(
            [labels.get(m, m) for m in stats.index], rotation=60, ha="right", fontsize=8
        )
        ax.set_title(f"{dataset}: {metric} (%)")
        ax.grid(axis="y", alpha=0.3)
    return save(fig, path)


def sweep_scatter(
    table: Any, metric: str, name: str, path: str | Path, measured: Sequence[str] = ()
) -> str:
    """Each sampled value of a sweep against the trial's metric (failed trials at 0, crossed);
    `measured`: other metric columns of the table (not sampled values)."""
    plt = pyplot()

    numeric = [
        c
        for c in table.columns
        if c not in ("trial", "status", "epochs", metric, *measured)
        and not c.endswith("__off")
        and table[c].dtype.kind in "fi"
    ]
    numeric = numeric or ["epochs"]
    fig, axes = plt.subplots(1, len(numeric), figsize=(4.2 * len(numeric), 3.6), squeeze=False)
    for ax, col in zip(axes[0], numeric):
        ok = table["status"] == "OK"
        ax.scatter(table.loc[ok, col], table.loc[ok, metric], c="#1f77b4", label="trial")
        if (~ok).any():
            ax.scatter(
                table.loc[~ok, col], [0] * int((~ok).sum()), marker="x", c="#d62728", label="failed"
            )
        if col.startswith("loss.weight") or col == "optim.lr":
            positive = table[col][table[col] > 0]
            if not positive.empty:
                ax.set_xscale("symlog", linthresh=float(positive.min()))
        ax.set_xlabel(col)
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.suptitle(f"sweep {name}: sampled values vs {metric}")
    return save(fig, path)


def timeline_chart(
    bars: Sequence[tuple[int, Any]], ticks: Sequence[str], title: str, path: str
) -> str:
    """A Gantt chart of benchmark cells: one bar per cell on its lane, failed cells hatched red."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(11, 1.6 + 0.45 * max(len(ticks), 2)))
    colors: dict[str, Any] = {}
    cmap = plt.get_cmap("tab20")
    for lane, r in bars:
        color = colors.setdefault(r["method"], cmap(len(colors) % 20))
        failed = r["status"] != "FINISHED"
        ax.barh(
            lane,
            r["duration_s"],
            left=r["start_s"],
            color="#d62728" if failed else color,
            edgecolor="black",
            linewidth=0.4,
            hatch="//" if failed else None,
        )
    ax.set_yticks(range(len(ticks)))
    ax.set_yticklabels(ticks, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the first cell started")
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in colors.values()]
    if handles:
        ax.legend(handles, list(colors), fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    return save(fig, path)


def tradeoff_plot(
    points: Sequence[Mapping[str, Any]], panels: Sequence[str], path: str | Path
) -> str:
    """Gain vs retention: per panel (a trained domain and retention set), each method's paired
    difference vs its base in-domain (x) against its difference on the retention set (y), with
    both intervals. Top right: better on both; bottom left: worse on both; the other two
    quadrants trade one for the other."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.6), squeeze=False)
    for ax, panel in zip(axes[0], panels):
        mine = [p for p in points if p["panel"] == panel]
        for i, p in enumerate(mine):
            colour = f"C{i % 10}"
            ax.errorbar(
                p["x"],
                p["y"],
                xerr=[[p["x"] - p["x_low"]], [p["x_high"] - p["x"]]],
                yerr=[[p["y"] - p["y_low"]], [p["y_high"] - p["y"]]],
                fmt="o",
                color=colour,
                capsize=3,
                label=p["label"],
            )
        ax.axhline(0, color="black", lw=0.8)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel(mine[0]["x_name"] if mine else "in-domain difference (points)")
        ax.set_ylabel(mine[0]["y_name"] if mine else "retention difference (points)")
        if mine:
            ax.legend(fontsize=7, loc="best")
    fig.suptitle("Gain vs retention: paired difference vs base, with intervals", fontsize=11)
    return save(fig, path)


def front_plot(
    table: Any, on_front: Sequence[bool], metrics: Sequence[str], name: str, path: str | Path
) -> str:
    """Trials on two objective metrics; the non-dominated ones joined and labelled by trial."""
    plt = pyplot()
    x, y = metrics[0], metrics[1]
    mask = np.asarray(on_front, dtype=bool)
    fig, ax = plt.subplots(figsize=(5.6, 4.4))
    ax.scatter(table[x][~mask], table[y][~mask], c="#999999", label="dominated")
    front = table[mask].sort_values(x)
    ax.plot(front[x], front[y], "o-", c="#d62728", label="non-dominated")
    for _, r in front.iterrows():
        ax.annotate(
            str(r["trial"])[-5:],
            (r[x], r[y]),
            fontsize=7,
            xytext=(3, 3),
            textcoords="offset points",
        )
    ax.set_xlabel(x)
    ax.set_ylabel(y)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"sweep {name}: the trade-off front", fontsize=10)
    return save(fig, path)
