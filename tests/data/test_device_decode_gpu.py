"""nvJPEG decode + resize + pad on CUDA against the PIL path (`-m gpu`; skipped without CUDA).

Ray-free on purpose: the GPU machine this runs on has torch and torchvision, not Ray."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from infosam.transforms import prepare_pair, preprocess_shape
from orchestrator.data.device_decode import decode_images_on_device

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def _jpegs(sizes=((960, 1280), (480, 640), (200, 150), (1024, 1024))):
    rng = np.random.default_rng(0)
    out = []
    for h, w in sizes:
        yy, xx = np.mgrid[:h, :w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
        img = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


@pytest.mark.parametrize("size", [256, 1024])
def test_nvjpeg_decode_matches_the_pil_path(size):
    data = _jpegs()
    expected, sizes = [], []
    for d in data:
        img = np.asarray(Image.open(io.BytesIO(d)).convert("RGB"))
        chw, _, input_size = prepare_pair(img, np.zeros(img.shape[:2], np.uint8), size)
        expected.append(chw)
        sizes.append(preprocess_shape(*img.shape[:2], size))
        assert tuple(input_size) == sizes[-1]
    got = decode_images_on_device(data, sizes, size, "cuda")
    assert got.device.type == "cuda" and got.dtype == torch.uint8
    diff = np.abs(np.stack(expected).astype(np.int16) - got.cpu().numpy().astype(np.int16))
    # nvJPEG's IDCT and chroma upsampling may round differently from libjpeg-turbo
    assert diff.mean() < 0.5, diff.mean()
    assert np.quantile(diff, 0.999) <= 2, np.quantile(diff, 0.999)
    for i, (h, w) in enumerate(sizes):  # the padding stays zero
        assert not got[i, :, h:, :].any() and not got[i, :, :, w:].any()
