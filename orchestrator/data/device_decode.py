"""`data.decode_on=gpu`: decode, resize and pad the stored images on the training device.

Ray Data then ships the stored JPEG/PNG bytes (about 0.2 MB for a 1280x960 JPEG) instead of
3 MB of decoded pixels per sample, and the CPUs only decode masks. JPEGs go through
`torchvision.io.decode_jpeg` on the device (nvJPEG on CUDA, one batched call; libjpeg-turbo on
CPU), PNGs through PIL on the CPU (no GPU PNG decoder; stored PNGs are the rarer re-encoded
images), then one antialiased bilinear resize of the longest side on the device, as PIL's
`BILINEAR` downscale does, and zero padding to the model size. On CPU the same code runs, which
is how it is tested against the PIL path (`tests/data/test_device_decode.py`): pixels within
1 grey level. No Ray here: the GPU test (`tests/data/test_device_decode_gpu.py`) runs on a
machine with torch and torchvision alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from orchestrator.data.codec import SampleDecodeError, open_rgb

__all__ = ["decode_images_on_device", "decode_on_device"]

_JPEG = b"\xff\xd8\xff"


def _decode_all(encoded: Sequence[bytes], device: torch.device) -> list[torch.Tensor]:
    """Each distinct image -> (3, H, W) uint8 on `device`; JPEGs in one batched call."""
    from torchvision.io import ImageReadMode, decode_jpeg

    out: list[torch.Tensor | None] = [None] * len(encoded)
    jpegs = [i for i, data in enumerate(encoded) if bytes(data[:3]) == _JPEG]
    if jpegs:
        raw = [torch.frombuffer(bytearray(encoded[i]), dtype=torch.uint8) for i in jpegs]
        decoded = decode_jpeg(raw, mode=ImageReadMode.RGB, device=device)
        for i, img in zip(jpegs, decoded, strict=True):
            out[i] = img
    for i, data in enumerate(encoded):
        if out[i] is None:  # PNG (and anything ingest re-encoded): PIL on the CPU
            hwc = np.asarray(open_rgb(data))
            out[i] = torch.from_numpy(hwc.copy()).permute(2, 0, 1).to(device)
    return out  # type: ignore[return-value]


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """(3, H, W) uint8 -> (3, h, w) uint8: bilinear, antialiased when shrinking (PIL's filter
    support grows with the scale; torch's `antialias=True` is that filter)."""
    if tuple(img.shape[1:]) == (h, w):
        return img
    x = F.interpolate(
        img[None].float(), size=(h, w), mode="bilinear", antialias=True, align_corners=False
    )
    return x[0].round_().clamp_(0, 255).to(torch.uint8)


def decode_images_on_device(
    encoded: Sequence[bytes],
    input_sizes: Any,
    image_size: int,
    device: Any = None,
    channel_order: str = "rgb",
    keys: Sequence[Any] | None = None,
) -> torch.Tensor:
    """Stored image bytes -> (B, 3, S, S) uint8 on `device`, resized to `input_sizes` (h, w per
    sample) and zero-padded bottom/right, as the CPU reader lays them out. Samples sharing a key
    (the instances of one image) are decoded once."""
    device = torch.device(device or "cpu")
    keys = list(keys) if keys is not None else list(range(len(encoded)))
    first: dict[Any, int] = {}
    for i, k in enumerate(keys):
        first.setdefault(k, i)
    distinct = sorted(set(first.values()))
    images = dict(zip(distinct, _decode_all([encoded[i] for i in distinct], device), strict=True))
    sizes = torch.as_tensor(np.asarray(input_sizes)).tolist()
    out = torch.zeros((len(encoded), 3, image_size, image_size), dtype=torch.uint8, device=device)
    done: dict[int, int] = {}
    for i, k in enumerate(keys):
        h, w = (int(v) for v in sizes[i])
        src = first[k]
        if src in done:  # another instance of an image already placed
            out[i] = out[done[src]]
            continue
        img = _resize(images[src], h, w)
        out[i, :, :h, :w] = img.flip(0) if channel_order == "bgr" else img
        done[src] = i
    return out


def decode_on_device(batch: dict[str, Any], image_size: int, device: Any = None) -> torch.Tensor:
    """The `image` tensor of a numpy batch read with `decode_on="gpu"`, on `device`."""
    orders = set(batch["channel_order"])
    if len(orders) != 1:
        raise ValueError(f"one batch mixes channel orders {sorted(orders)}")
    try:
        return decode_images_on_device(
            batch["image_bytes"],
            batch["input_size"],
            image_size,
            device,
            channel_order=orders.pop(),
            keys=batch.get("image_id"),
        )
    except Exception as exc:
        raise SampleDecodeError(
            f"a stored image of samples {list(batch['id'])[:8]} cannot be decoded on {device}: "
            f"{type(exc).__name__}: {exc}. Run `infosam data inspect --verify DIR` to find it, "
            "or set data.decode_on=cpu"
        ) from None
