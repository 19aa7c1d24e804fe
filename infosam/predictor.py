"""Prompted masks for whole images: what `infosam predict`, the MLflow model and serving share.

One function, `segment`, turns decoded images and prompts in ORIGINAL image pixels into masks
at original resolution plus SAM's predicted IoU, so every way of using a fine-tuned model gives
the same masks. An image prompted several times (many objects) is encoded once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from infosam.engine import predict_scored
from infosam.prompts import PromptBatch
from infosam.sam import PromptableSam
from infosam.transforms import prepare_pair, preprocess_shape

__all__ = ["Prompt", "prompt_batch", "segment", "segment_image"]


@dataclass
class Prompt:
    """A prompt in ORIGINAL image pixels: a box and/or points (x, y, label)."""

    box: Sequence[float] | None = None
    points: Sequence[Sequence[float]] | None = None


def prompt_batch(
    prompts: Sequence[Prompt],
    originals: Sequence[tuple[int, int]],
    size: int,
    *,
    square: bool = False,
) -> PromptBatch:
    """Original-pixel prompts -> the model frame: scaled by each image's resize factor (SAM's
    longest side to `size`), or per axis with `square` (SAM 2.1 resizes to size x size)."""
    scales = [
        (size / w, size / h) if square else (preprocess_shape(h, w, size)[1] / w,) * 2
        for h, w in originals
    ]
    has_box = [p.box is not None for p in prompts]
    has_pts = [p.points is not None and len(p.points) > 0 for p in prompts]
    if len(set(has_box)) > 1 or len(set(has_pts)) > 1:
        raise ValueError(
            "all prompts in one call must be of the same kind (a box, points, or both); "
            "split them into calls of one kind"
        )
    if not has_box[0] and not has_pts[0]:
        raise ValueError("SAM needs a prompt: give a box [x0, y0, x1, y1] and/or points")
    for p in prompts:
        if p.box is not None and len(p.box) != 4:
            raise ValueError(f"a box is 4 numbers x0, y0, x1, y1, got {list(p.box)!r}")
        for pt in p.points if has_pts[0] else ():
            if len(pt) not in (2, 3):
                raise ValueError(f"a point is x, y or x, y, label, got {list(pt)!r}")
    boxes = (
        torch.tensor(
            [[float(v) * s[i % 2] for i, v in enumerate(p.box)] for p, s in zip(prompts, scales)]
        )
        if has_box[0]
        else None
    )
    coords = labels = None
    if has_pts[0]:
        n = max(len(p.points) for p in prompts)
        coords = torch.zeros(len(prompts), n, 2)
        labels = torch.full((len(prompts), n), -1, dtype=torch.int64)
        for i, (p, s) in enumerate(zip(prompts, scales)):
            for j, pt in enumerate(p.points):
                coords[i, j] = torch.tensor([float(pt[0]) * s[0], float(pt[1]) * s[1]])
                labels[i, j] = int(pt[2]) if len(pt) == 3 else 1
    return PromptBatch(boxes, coords, labels, torch.zeros(len(prompts), dtype=torch.bool))


def _encode(
    model: PromptableSam, images: Sequence[np.ndarray], device: str | torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Each image resized (and padded) as the model family takes it, then encoded:
    (embeddings, input sizes), one per image."""
    size = model.image_size
    if getattr(model, "square_inputs", False):
        from infosam.sam2 import square_image

        pixels = torch.stack([square_image(a, size) for a in images]).to(device)
        sizes = torch.tensor([[size, size]] * len(images), device=device)
        return model.encode(pixels, sizes), sizes
    prepared = [prepare_pair(a, np.zeros(a.shape[:2], np.uint8), size) for a in images]
    pixels = torch.from_numpy(np.stack([p[0] for p in prepared])).to(device)
    sizes = torch.tensor([p[2] for p in prepared], device=device)
    return model.encode(pixels, sizes), sizes


def _decode(
    model: PromptableSam,
    embeddings: torch.Tensor,
    sizes: torch.Tensor,
    originals: list[tuple[int, int]],
    prompts: Sequence[Prompt],
    device: str | torch.device,
) -> list[tuple[np.ndarray, float]]:
    logits, scores = predict_scored(
        model,
        prompt_batch(
            prompts, originals, model.image_size, square=getattr(model, "square_inputs", False)
        ).to(device),
        sizes,
        originals,
        image_embeddings=embeddings,
    )
    return [((lg > 0).cpu().numpy(), float(s)) for lg, s in zip(logits, scores.cpu(), strict=True)]


@torch.inference_mode()
def segment(
    model: PromptableSam,
    images: Sequence[np.ndarray],
    prompts: Sequence[Prompt],
    *,
    device: str | torch.device = "cpu",
) -> list[tuple[np.ndarray, float]]:
    """(bool mask at the image's original size, predicted IoU) per (image, prompt) pair.

    `images` are (H, W, 3) uint8; the same array object given for several prompts is resized
    and encoded once (one encoder pass per distinct image, then one decoder pass per prompt)."""
    if len(images) != len(prompts):
        raise ValueError(f"{len(images)} images but {len(prompts)} prompts: give one each")
    if not images:
        return []
    distinct: dict[int, int] = {}
    which = [distinct.setdefault(id(a), len(distinct)) for a in images]
    firsts = {k: a for a, k in zip(images, which)}
    embeddings, sizes = _encode(model, [firsts[k] for k in range(len(distinct))], device)
    index = torch.tensor(which, device=device)
    originals = [tuple(a.shape[:2]) for a in images]
    return _decode(model, embeddings[index], sizes[index], originals, prompts, device)


@torch.inference_mode()
def segment_image(
    model: PromptableSam,
    image: np.ndarray,
    prompts: Sequence[Prompt],
    *,
    batch_size: int = 8,
    device: str | torch.device = "cpu",
) -> list[tuple[np.ndarray, float]]:
    """Every prompt of one image, in order: the image encoded once, then prompts of one kind
    (box, points, both) through the decoder `batch_size` at a time. The unit every path
    predicts in (files one by one, a folder on Ray's actors), so the batch an image lands in
    never changes its masks."""
    if not prompts:
        return []
    embeddings, sizes = _encode(model, [image], device)
    kinds: dict[tuple[bool, bool], list[int]] = {}
    for i, p in enumerate(prompts):
        kinds.setdefault((p.box is not None, bool(p.points)), []).append(i)
    results: list = [None] * len(prompts)
    step = max(1, batch_size)
    for members in kinds.values():
        for start in range(0, len(members), step):
            chunk = members[start : start + step]
            index = torch.zeros(len(chunk), dtype=torch.long, device=embeddings.device)
            done = _decode(
                model,
                embeddings[index],
                sizes[index],
                [tuple(image.shape[:2])] * len(chunk),
                [prompts[i] for i in chunk],
                device,
            )
            for i, result in zip(chunk, done, strict=True):
                results[i] = result
    return results
