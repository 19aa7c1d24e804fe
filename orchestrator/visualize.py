"""Pictures people look at: prediction overlays, loss curves, benchmark bars."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["category_figure", "loss_curve_figure", "overlay", "overlay_grid"]

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
