"""SAM's geometry: resize the longest side to the model size, zero-pad, and map logits back.

The data pipeline uses the numpy/PIL half (uint8 in, uint8 out; normalisation happens on the
device); evaluation uses the torch half to bring low-res logits back to the original resolution,
as segment-anything's `Sam.postprocess_masks` does.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

__all__ = [
    "pad_to_square",
    "postprocess_logits",
    "prepare_pair",
    "preprocess_shape",
    "random_hflip",
    "resize_longest_side",
]


def preprocess_shape(height: int, width: int, long_side: int) -> tuple[int, int]:
    """Output (h, w) after resizing the longest side to `long_side` (segment-anything's rule)."""
    scale = long_side * 1.0 / max(height, width)
    return int(height * scale + 0.5), int(width * scale + 0.5)


def model_frame(height: int, width: int, size: int, square: bool = False) -> tuple[int, int]:
    """An image's size in the model frame: longest side to `size` (SAM, padded after), or
    `size` x `size` (SAM 2.1, aspect ratio not kept)."""
    return (size, size) if square else preprocess_shape(height, width, size)


def resize_longest_side(
    array: np.ndarray, long_side: int, *, is_mask: bool = False, square: bool = False
) -> np.ndarray:
    """Resize an HxW or HxWxC uint8 array into the model frame (`model_frame`); bilinear for
    images, nearest for masks."""
    h, w = array.shape[:2]
    nh, nw = model_frame(h, w, long_side, square)
    if (nh, nw) == (h, w):
        return array
    resample = Image.NEAREST if is_mask else Image.BILINEAR
    return np.asarray(Image.fromarray(array).resize((nw, nh), resample=resample))


def pad_to_square(array: np.ndarray, size: int) -> np.ndarray:
    """Zero-pad bottom and right to size x size (top-left content, as segment-anything)."""
    h, w = array.shape[:2]
    pad = [(0, size - h), (0, size - w)] + [(0, 0)] * (array.ndim - 2)
    return np.pad(array, pad)


def prepare_pair(
    image: np.ndarray, mask: np.ndarray, size: int, *, square: bool = False
) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """(H, W, 3) uint8 image + (H, W) 0/1 mask -> (3, S, S) image, (S, S) mask, resized (h, w).
    `square`: SAM 2.1's frame (resized to S x S, nothing to pad) instead of SAM's."""
    img = resize_longest_side(image, size, square=square)
    msk = resize_longest_side(mask, size, is_mask=True, square=square)
    input_size = img.shape[:2]
    return (
        np.ascontiguousarray(pad_to_square(img, size).transpose(2, 0, 1)),
        pad_to_square(msk, size),
        (int(input_size[0]), int(input_size[1])),
    )


def postprocess_logits(
    low_res_logits: torch.Tensor,
    input_size: tuple[int, int],
    original_size: tuple[int, int],
    image_size: int,
) -> torch.Tensor:
    """(N, 1, h, w) low-res logits of one image -> (N, 1, H, W) logits at original resolution:
    upsample to the model size, crop the padding, resize to the original size (bilinear)."""
    x = F.interpolate(
        low_res_logits.float(), (image_size, image_size), mode="bilinear", align_corners=False
    )
    x = x[..., : input_size[0], : input_size[1]]
    return F.interpolate(x, tuple(original_size), mode="bilinear", align_corners=False)


def random_hflip(
    images: torch.Tensor,
    masks: torch.Tensor,
    input_sizes: torch.Tensor,
    generator: torch.Generator | None = None,
    p: float = 0.5,
) -> torch.Tensor:
    """Flip each sample's image and mask left-right with probability `p`, in place.

    Only the valid (top-left, `input_sizes`) region flips, so the zero padding stays where SAM's
    post-processing expects it. Returns the boolean flip decision per sample.
    """
    flip = torch.rand(images.shape[0], generator=generator) < p
    for i in torch.nonzero(flip).flatten().tolist():
        h, w = (int(v) for v in input_sizes[i])
        images[i, :, :h, :w] = images[i, :, :h, :w].flip(-1)
        masks[i, :h, :w] = masks[i, :h, :w].flip(-1)
    return flip
