"""Ray Data pipeline throughput: images/s (and per CPU) with real JPEG/PNG decoding + resize + pad.

    python experiments/bench_pipeline.py --sizes 256 1024 --num-images 256 --cpus 2

Source images are synthetic `general` samples upscaled to --source-px (JPEG, as real benchmarks
ship), ingested through the normal writer, then streamed with `read_split`. `--teacher-cache`
also streams teacher-cache shards (the same rows + a ViT-B-sized bf16 embedding, 2 MiB per image
at 1024 px; random bytes: their content does not change the cost) as training reads them.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from orchestrator.data.codec import encode_mask
from orchestrator.data.reader import decode_batch, read_split
from orchestrator.data.synthetic import generate_sample
from orchestrator.data.writer import DatasetWriter


def make_dataset(root: str, n: int, source_px: int) -> str:
    writer = DatasetWriter(root, "bench", source="synthetic:bench", fmt="synthetic")
    for i in range(n):
        img, mask = generate_sample("general", 0, "train", i)
        h, w = source_px * 3 // 4, source_px
        img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR))
        mask = np.asarray(Image.fromarray(mask).resize((w, h), Image.NEAREST))
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=92)
        writer.add("train", f"b{i}", buf.getvalue(), encode_mask(mask), h, w, "bench", [])
    writer.close()
    return os.path.join(root, "bench")


def make_cache(root: str, dataset: str, size: int) -> dict:
    """Cache shards in the teacher cache's layout: every source column + `teacher_embedding`."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    shape = (256, size // 16, size // 16)
    rng = np.random.default_rng(0)
    files = []
    for i, name in enumerate(sorted(f for f in os.listdir(dataset) if f.endswith(".parquet"))):
        table = pq.read_table(os.path.join(dataset, name))
        if not len(table) or table.column("split")[0].as_py() != "train":
            continue
        emb = [rng.integers(0, 2**16, shape, dtype=np.uint16).tobytes() for _ in range(len(table))]
        table = table.append_column("teacher_embedding", pa.array(emb, pa.binary()))
        out = os.path.join(root, f"cache-{i:05d}.parquet")
        pq.write_table(table, out, row_group_size=16)
        files.append(out)
    return {"files": files, "embedding_shape": shape}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--num-images", type=int, default=256)
    p.add_argument("--source-px", type=int, default=1280, help="long side of the source JPEGs")
    p.add_argument("--cpus", type=int, default=os.cpu_count())
    p.add_argument("--teacher-cache", action="store_true", help="also stream cache shards")
    args = p.parse_args()
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    with tempfile.TemporaryDirectory() as tmp:
        path = make_dataset(tmp, args.num_images, args.source_px)
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        try:
            for size in args.sizes:
                # One process, no Ray: the per-core cost of decode + resize + pad.
                rows = next(
                    iter(read_split(path, "train", image_size=size).iter_batches(batch_size=8))
                )
                del rows
                import pyarrow.parquet as pq

                table = (
                    pq.read_table(os.path.join(path, "train-00000.parquet"))
                    .slice(0, 32)
                    .to_pydict()
                )
                batch = {k: np.asarray(v, dtype=object) for k, v in table.items()}
                t0 = time.perf_counter()
                decode_batch(batch, size)
                single = 32 / (time.perf_counter() - t0)
                ds = read_split(path, "train", image_size=size, batch_size=32)
                t0 = time.perf_counter()
                n = sum(len(b["id"]) for b in ds.iter_batches(batch_size=32))
                dt = time.perf_counter() - t0
                print(
                    json.dumps(
                        {
                            "image_size": size,
                            "source_px": args.source_px,
                            "images": n,
                            "cpus": args.cpus,
                            "ray_images_per_s": round(n / dt, 1),
                            "ray_images_per_s_per_cpu": round(n / dt / args.cpus, 1),
                            "single_process_images_per_s": round(single, 1),
                        }
                    )
                )
                if args.teacher_cache:
                    cache = make_cache(tmp, path, size)
                    ds = read_split(
                        path, "train", image_size=size, batch_size=32, teacher_cache=cache
                    )
                    t0 = time.perf_counter()
                    n = 0
                    for b in ds.iter_batches(batch_size=32):
                        assert b["teacher_embedding"].shape[1:] == cache["embedding_shape"]
                        n += len(b["id"])
                    dt = time.perf_counter() - t0
                    print(
                        json.dumps(
                            {
                                "image_size": size,
                                "teacher_cache": True,
                                "embedding_mib_per_image": round(
                                    2 * np.prod(cache["embedding_shape"]) / 2**20, 2
                                ),
                                "images": n,
                                "cpus": args.cpus,
                                "ray_images_per_s": round(n / dt, 1),
                                "ray_images_per_s_per_cpu": round(n / dt / args.cpus, 1),
                            }
                        ),
                        flush=True,
                    )
        finally:
            ray.shutdown()


if __name__ == "__main__":
    main()
