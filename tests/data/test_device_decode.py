"""`data.decode_on=gpu`: images decoded, resized and padded on the worker's device give what the
PIL path gives (CPU here; the same checks on CUDA behind the `gpu` marker)."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from orchestrator.data.codec import encode_mask
from orchestrator.data.reader import SampleDecodeError, decode_batch, read_split, to_torch
from orchestrator.data.writer import DatasetWriter
from orchestrator.train.driver import fit
from tests.helpers import train_config

pytestmark = pytest.mark.timeout(300)


def _image(rng, h, w):
    """Smooth colour gradients plus noise: real JPEG content, not flat blocks."""
    yy, xx = np.mgrid[:h, :w]
    base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], -1)
    return np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def _rows(tmp_path, sizes=((300, 400), (480, 640), (200, 150), (256, 256))):
    """Parquet rows of JPEGs and one PNG (the re-encoded kind), masks with a disc each."""
    rng = np.random.default_rng(0)
    writer = DatasetWriter(tmp_path, "d", source="test", fmt="synthetic")
    originals = {}
    for i, (h, w) in enumerate(sizes):
        img = _image(rng, h, w)
        yy, xx = np.mgrid[:h, :w]
        mask = (((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 3) / (w / 4)) ** 2 <= 1).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="PNG" if i == 2 else "JPEG", quality=90)
        for split in ("train", "val"):
            writer.add(split, f"{split}{i}", buf.getvalue(), encode_mask(mask), h, w, "t", [])
        originals[f"train{i}"] = mask
    writer.close()
    return tmp_path / "d", originals


def _batch(path, split="train"):
    import pyarrow.parquet as pq

    table = pq.read_table(sorted(path.glob(f"{split}-*.parquet"))[0]).to_pydict()
    return {k: np.asarray(v, dtype=object) for k, v in table.items()}


def _assert_equivalent(cpu, dev, originals=None):
    a, b = cpu["image"].astype(np.int16), dev["image"].cpu().numpy().astype(np.int16)
    assert a.shape == b.shape
    diff = np.abs(a - b)
    assert diff.max() <= 1, f"max difference {diff.max()} grey levels"
    assert diff.mean() < 0.25  # within rounding, not a shifted or blurred image
    assert np.array_equal(cpu["mask"], dev["mask"].cpu().numpy())
    assert np.array_equal(cpu["input_size"], dev["input_size"].cpu().numpy())
    for i, m in enumerate(dev.get("mask_original", [])):
        inter = np.logical_and(m, cpu["mask_original"][i]).sum()
        union = np.logical_or(m, cpu["mask_original"][i]).sum()
        assert inter / union >= 0.999
        if originals is not None:
            assert np.array_equal(m, originals[dev["id"][i]])


@pytest.mark.parametrize("size", [256, 1024])
@pytest.mark.parametrize("order", ["rgb", "bgr"])
def test_device_decode_matches_the_pil_path_on_cpu(tmp_path, size, order):
    path, originals = _rows(tmp_path)
    batch = _batch(path)
    cpu = decode_batch(batch, size, order, keep_original_mask=True)
    shipped = decode_batch(batch, size, order, keep_original_mask=True, decode_on="gpu")
    assert "image" not in shipped and len(shipped["image_bytes"]) == len(batch["id"])
    if size == 1024:  # what crosses the object store: the stored bytes, not 3 MB of pixels each
        assert sum(map(len, shipped["image_bytes"])) < cpu["image"].nbytes / 10
    dev = to_torch(shipped, "cpu")
    assert dev["image"].dtype == torch.uint8 and "image_bytes" not in dev
    _assert_equivalent(cpu, dev, originals)


def test_instances_of_one_image_are_decoded_once_and_placed_alike(tmp_path):
    path, _ = _rows(tmp_path, sizes=((300, 400),))
    row = _batch(path)
    h, w = 300, 400
    masks = []
    for k in range(3):
        m = np.zeros((h, w), np.uint8)
        m[50 * k : 50 * k + 40, 30:200] = 1
        masks.append(encode_mask(m))
    batch = {
        **row,
        "instance_ids": np.array([[1, 2, 3]], dtype=object),
        "instance_masks": np.array([masks], dtype=object),
        "instance_categories": np.array([["a", "b", "a"]], dtype=object),
    }
    cpu = decode_batch(batch, 256, keep_original_mask=True)
    dev = to_torch(decode_batch(batch, 256, keep_original_mask=True, decode_on="gpu"))
    assert list(dev["id"]) == [f"{row['id'][0]}#{k}" for k in (1, 2, 3)]
    _assert_equivalent(cpu, dev)
    assert torch.equal(dev["image"][0], dev["image"][2])


def test_a_corrupt_stored_image_names_the_samples_and_the_fix(tmp_path):
    path, _ = _rows(tmp_path, sizes=((300, 400),))
    batch = _batch(path)
    shipped = decode_batch(batch, 256, decode_on="gpu")
    data = shipped["image_bytes"][0]
    shipped["image_bytes"][0] = data[:600] + bytes(len(data) - 600)  # same header, no scan data
    with pytest.raises(SampleDecodeError, match=r"train0.*data\.decode_on=cpu"):
        to_torch(shipped, "cpu")


def test_ray_data_ships_bytes_and_the_worker_decodes_the_same_batches(ray_local, tmp_path):
    path, _ = _rows(tmp_path)

    def samples(decode_on):
        ds = read_split(path, "train", image_size=256, batch_size=2, decode_on=decode_on)
        out = {}
        for b in ds.iter_batches(batch_size=2, batch_format="numpy"):
            t = to_torch(b, "cpu")
            for i, sid in enumerate(t["id"]):
                out[sid] = (t["image"][i].numpy().astype(np.int16), t["mask"][i].numpy())
        return out

    cpu, dev = samples("cpu"), samples("gpu")
    assert cpu.keys() == dev.keys() and len(cpu) == 4
    for sid in cpu:
        assert np.abs(cpu[sid][0] - dev[sid][0]).max() <= 1
        assert np.array_equal(cpu[sid][1], dev[sid][1])


def test_training_with_decode_on_gpu_runs_on_a_cpu_worker(ray_local, tmp_path):
    """The switch end to end on a CPU worker: the run trains and evaluates as with CPU decoding
    (losses within what 1 grey level of input changes)."""
    _rows(tmp_path / "data")
    common = [
        "data.dataset=d",
        "data.test_split=val",
        "scaling.num_workers=0",
        "optim.epochs=1",
        "optim.batch_size=4",
        "data.prompt=box",
        "data.box_jitter=0",
        "data.shuffle_buffer=0",
        "tracking.overlays=0",
    ]
    runs = {
        on: fit(
            train_config(tmp_path / on, tmp_path / "data", *common, f"data.decode_on={on}"),
            quiet=True,
        )
        for on in ("cpu", "gpu")
    }
    a, b = runs["cpu"].metrics, runs["gpu"].metrics
    assert b["train/loss"] == pytest.approx(a["train/loss"], rel=0.02)
    assert b["val/zero_shot_iou"] == pytest.approx(a["val/zero_shot_iou"], abs=0.01)
    assert b["test/iou"] == pytest.approx(a["test/iou"], abs=0.02)
