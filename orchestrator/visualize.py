"""Pictures people look at: prediction overlays, loss curves, benchmark bars."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["loss_curve_figure", "overlay", "overlay_grid"]

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
