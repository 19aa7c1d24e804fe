"""Box and point prompts sampled from ground-truth masks, vectorised over the batch.

Coordinates are (x, y) pixels of the mask's frame (the padded model input). Empty masks and
one-pixel objects never crash: every batch reports which samples had an empty mask (`empty`), gets
a harmless prompt for them (a whole-image box; points labelled -1, SAM's "not a point"), and the
engine counts them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["PromptBatch", "boxes_from_masks", "points_from_masks", "sample_prompts"]


@dataclass
class PromptBatch:
    """One prompt per image: a box, points, or both."""

    boxes: torch.Tensor | None  # (B, 4) x0, y0, x1, y1
    point_coords: torch.Tensor | None  # (B, N, 2) x, y
    point_labels: torch.Tensor | None  # (B, N) 1 fg, 0 bg, -1 none
    empty: torch.Tensor  # (B,) bool: the mask had no foreground

    @property
    def kind(self) -> str:
        return "+".join(
            k for k, v in (("box", self.boxes), ("point", self.point_coords)) if v is not None
        )

    def describe(self, i: int) -> str:
        """Image i's prompt as text (model-input pixels), e.g. `box 12,30,200,180; points 50,60+`.

        Per-image score tables carry it, so paired comparisons can check that two methods were
        scored with the same prompt on the same image.
        """
        parts = []
        if self.boxes is not None:
            parts.append("box " + ",".join(f"{float(v):.0f}" for v in self.boxes[i]))
        if self.point_coords is not None:
            pts = [
                f"{float(x):.0f},{float(y):.0f}{'+' if int(lab) == 1 else '-'}"
                for (x, y), lab in zip(self.point_coords[i], self.point_labels[i])
                if int(lab) >= 0
            ]
            parts.append("points " + ";".join(pts))
        return "; ".join(parts) or "none"

    def to(self, device: torch.device | str) -> PromptBatch:
        def mv(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return PromptBatch(
            mv(self.boxes), mv(self.point_coords), mv(self.point_labels), self.empty.to(device)
        )

    def as_kwargs(self) -> dict[str, torch.Tensor | None]:
        return {
            "boxes": self.boxes,
            "point_coords": self.point_coords,
            "point_labels": self.point_labels,
        }


def _first_last(flags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Index of the first and last True along dim 1 (0 for all-False rows)."""
    n = flags.shape[1]
    f = flags.to(torch.uint8)
    first = f.argmax(dim=1)
    last = n - 1 - f.flip(1).argmax(dim=1)
    return first, last


def boxes_from_masks(
    masks: torch.Tensor, max_shift: float = 0.0, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tight boxes of `masks` (B, H, W), each corner shifted by a random offset in [-m, m).

    m = min(max_shift, half the box's shorter side), the paper's jitter (max_shift=5 at 1024 px);
    the cap keeps jittered boxes of tiny objects from turning inside out. Returns (boxes, empty).
    """
    m = masks > 0
    b, h, w = m.shape
    rows, cols = m.any(dim=2), m.any(dim=1)
    empty = ~rows.any(dim=1)
    y0, y1 = _first_last(rows)
    x0, x1 = _first_last(cols)
    boxes = torch.stack([x0, y0, x1, y1], dim=1).float()
    if max_shift > 0:
        side = torch.minimum(x1 - x0, y1 - y0).float()
        cap = torch.clamp(torch.minimum(torch.full_like(side, float(max_shift)), side // 2), min=0)
        gen_device = generator.device if generator is not None else masks.device
        u = torch.rand((b, 4), generator=generator, device=gen_device).to(masks.device)
        shift = torch.floor(u * 2 * cap[:, None]) - cap[:, None]
        boxes = boxes + shift
        boxes[:, 0::2] = boxes[:, 0::2].clamp(0, w - 1)
        boxes[:, 1::2] = boxes[:, 1::2].clamp(0, h - 1)
    full = torch.tensor([0.0, 0.0, w - 1.0, h - 1.0], device=masks.device)
    boxes = torch.where(empty[:, None], full, boxes)
    return boxes, empty


def _sample_pixels(
    weights: torch.Tensor, n: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """n pixel indices per row, uniform over the row's nonzero weights; rows with none get -1."""
    has = weights.sum(dim=1) > 0
    safe = torch.where(has[:, None], weights, torch.ones_like(weights))
    idx = torch.multinomial(safe, n, replacement=True, generator=generator)
    return idx, has


def points_from_masks(
    masks: torch.Tensor,
    num_positive: int = 1,
    num_negative: int = 0,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random foreground (label 1) and background (label 0) pixels of `masks` (B, H, W).

    Points that cannot exist (no foreground, or no background) get label -1 so SAM ignores them.
    Returns (coords (B, N, 2) as x, y; labels (B, N); empty).
    """
    m = (masks > 0).flatten(1)
    b, w = masks.shape[0], masks.shape[2]
    coords, labels = [], []
    empty = ~m.any(dim=1)
    for n, weights, label in ((num_positive, m, 1), (num_negative, ~m, 0)):
        if n <= 0:
            continue
        gen_device = generator.device if generator is not None else masks.device
        idx, has = _sample_pixels(weights.float().to(gen_device), n, generator)
        idx, has = idx.to(masks.device), has.to(masks.device)
        coords.append(torch.stack([idx % w, idx // w], dim=-1).float())
        lab = torch.full((b, n), label, dtype=torch.int64, device=masks.device)
        labels.append(torch.where(has[:, None], lab, torch.full_like(lab, -1)))
    if not coords:
        raise ValueError("ask for at least one point (num_positive + num_negative >= 1)")
    return torch.cat(coords, dim=1), torch.cat(labels, dim=1), empty


def sample_prompts(
    masks: torch.Tensor,
    mode: str = "mixed",
    *,
    max_shift: float = 0.0,
    num_positive: int = 1,
    num_negative: int = 0,
    generator: torch.Generator | None = None,
) -> PromptBatch:
    """Prompts for a batch: `box`, `point`, or `mixed` (the paper: per BATCH, 50/50 all-box or
    all-point). Teacher and student must receive the same PromptBatch."""
    if mode == "mixed":
        coin = torch.rand((), generator=generator).item()
        mode = "box" if coin < 0.5 else "point"
    if mode == "box":
        boxes, empty = boxes_from_masks(masks, max_shift, generator)
        return PromptBatch(boxes, None, None, empty)
    if mode == "point":
        coords, labels, empty = points_from_masks(masks, num_positive, num_negative, generator)
        return PromptBatch(None, coords, labels, empty)
    raise ValueError(f"unknown prompt mode {mode!r}; choose box, point or mixed")
