"""Is the GPU fed? Ray Data's streamed decode rate per CPU against what one core decodes alone.

    python experiments/bench_pipeline.py --sizes 256 1024 --cpus 1 2 --teacher-cache

Source images are synthetic `general` samples upscaled to --source-px (JPEG, as real benchmarks
ship), ingested through the normal writer into one shard (the worst case for parallelism), then
streamed with `read_split` for --epochs passes, as a training run reads an unmaterialised split.

For each CPU count and size it prints one JSON line and, at the end, a markdown table:
- `single_per_core`: `decode_batch` on 32 rows in this process, no Ray (median of 5, measured
  right before each stream: this machine kind's speed drifts, up to 1.7x in an hour);
- `first_batch_s`: from the pass's start to its first 32-image batch (planning, listing, the
  first decode tasks);
- `steady_per_cpu`: images/s per Ray CPU over the last three quarters of the last (warm) pass:
  the rate a long epoch runs at;
- `ratio`: `steady_per_cpu / single_per_core`, the share of one core's decode the stream
  delivers per CPU;
- `consumer_ms_per_image`: CPU time of this process (the consumer: fetching blocks, converting
  them to numpy, re-batching) per image;
- `cpus_per_gpu@R`: CPUs of this pipeline a training step of R images/s needs (`--step-rates`).
`--teacher-cache` also streams teacher-cache shards (the same rows + a ViT-B-sized bf16
embedding, 2 MiB per image at 1024 px; random bytes: their content does not change the cost).
`--decode-on gpu` streams the stored bytes and decoded masks (the `data.decode_on=gpu` path):
the CPUs' share of the work when the GPU decodes; `--device cuda` also decodes them in this
process on that device, as a training worker does. `--stats` prints Ray Data's per-operator
statistics of the last pass (where the time goes).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
import tempfile
import time

import numpy as np
from PIL import Image

from orchestrator.data.codec import encode_mask
from orchestrator.data.reader import decode_batch, read_split
from orchestrator.data.synthetic import generate_sample
from orchestrator.data.writer import DatasetWriter

BATCH = 32


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
        out = os.path.join(root, f"cache-{size}-{i:05d}.parquet")
        pq.write_table(table, out, row_group_size=16)
        files.append(out)
    return {"files": files, "embedding_shape": shape}


def single_process_rate(path: str, size: int) -> float:
    """What one core decodes: `decode_batch` over 32 rows already in memory (median of 5)."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(path, "train-00000.parquet")).slice(0, BATCH).to_pydict()
    batch = {k: np.asarray(v, dtype=object) for k, v in table.items()}
    decode_batch(batch, size)  # warm-up: imports, first allocations
    rates = []
    for _ in range(5):
        t0 = time.perf_counter()
        decode_batch(batch, size)
        rates.append(BATCH / (time.perf_counter() - t0))
    return statistics.median(rates)


def stream(ds, epochs: int, consume=None) -> dict:
    """Iterate `ds` `epochs` times as a training worker does; the last pass's timings. The
    steady rate is taken over the last three quarters of the batches: the first ones include
    start-up, and the iterator's prefetched batches arrive at once after the first."""
    out = {}
    for _ in range(epochs):
        cpu0 = time.process_time()  # this process: the consumer's share (fetch, convert, batch)
        t0 = time.perf_counter()
        stamps, counts = [], []
        for batch in ds.iter_batches(batch_size=BATCH, batch_format="numpy"):
            if consume is not None:
                consume(batch)
            stamps.append(time.perf_counter() - t0)
            counts.append(len(batch["id"]))
        total = stamps[-1]
        k = len(stamps) // 4
        out = {
            "images": sum(counts),
            "first_batch_s": round(stamps[0], 2),
            "total_s": round(total, 2),
            "steady_images_per_s": sum(counts[k + 1 :]) / max(total - stamps[k], 1e-9),
            "end_to_end_images_per_s": sum(counts) / total,
            "consumer_cpu_ms_per_image": 1000 * (time.process_time() - cpu0) / sum(counts),
        }
    return out


def row(kind: str, size: int, cpus: int, single: float, res: dict, step_rates) -> dict:
    per_cpu = res["steady_images_per_s"] / cpus
    out = {
        "stream": kind,
        "image_size": size,
        "cpus": cpus,
        "images": res["images"],
        "single_per_core": round(single, 1),
        "first_batch_s": res["first_batch_s"],
        "steady_images_per_s": round(res["steady_images_per_s"], 1),
        "steady_per_cpu": round(per_cpu, 1),
        "ratio": round(per_cpu / single, 2),
        "end_to_end_per_cpu": round(res["end_to_end_images_per_s"] / cpus, 1),
        "consumer_ms_per_image": round(res["consumer_cpu_ms_per_image"], 1),
    }
    for rate in step_rates:
        out[f"cpus_per_gpu@{rate:g}"] = round(rate / per_cpu, 1)
    return out


def table(rows: list[dict]) -> str:
    keys = [k for k in rows[0] if k != "images"]
    for r in rows[1:]:
        keys += [k for k in r if k not in keys and k != "images"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(str(r.get(k, "-")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 1024])
    p.add_argument("--cpus", type=int, nargs="+", default=[os.cpu_count()])
    p.add_argument("--num-images", type=int, default=512)
    p.add_argument("--epochs", type=int, default=2, help="passes; the last one is reported")
    p.add_argument("--source-px", type=int, default=1280, help="long side of the source JPEGs")
    p.add_argument("--teacher-cache", action="store_true", help="also stream cache shards")
    p.add_argument("--decode-on", choices=["cpu", "gpu"], default="cpu")
    p.add_argument(
        "--device",
        help="with --decode-on gpu: decode in this process on this device (cuda, cpu); "
        "unset: time only what the CPUs deliver (bytes + decoded masks)",
    )
    p.add_argument(
        "--data-cpus",
        type=float,
        default=1.0,
        help="CPUs per decode task (scaling.data_cpus; training's default 0.5 runs two per CPU)",
    )
    p.add_argument("--step-rates", type=float, nargs="+", default=[73.4, 160.0])
    p.add_argument("--stats", action="store_true", help="print Ray Data's stats of each stream")
    p.add_argument("--out", help="append the JSON lines to this file")
    args = p.parse_args()
    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        path = make_dataset(tmp, args.num_images, args.source_px)
        caches = {s: make_cache(tmp, path, s) for s in args.sizes} if args.teacher_cache else {}
        for cpus in args.cpus:
            ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
            try:
                for size in args.sizes:
                    kinds = [("decoded", None)] + (
                        [("teacher_cache", caches[size])] if caches else []
                    )
                    for kind, cache in kinds:
                        ds = read_split(
                            path,
                            "train",
                            image_size=size,
                            batch_size=BATCH,
                            teacher_cache=cache,
                            decode_on=args.decode_on,
                            num_cpus=args.data_cpus,
                        )
                        consume = None
                        if args.data_cpus != 1.0:
                            kind += f"@{args.data_cpus:g}cpu"
                        if args.decode_on == "gpu":
                            kind += "+bytes"
                        if args.device:
                            from orchestrator.data.device_decode import decode_on_device

                            def consume(b, size=size):
                                decode_on_device(b, size, args.device)

                            kind += f"+decode_on_{args.device}"
                        # one core's rate measured right before its stream: this machine
                        # kind's speed drifts, up to 1.7x in an hour
                        single = single_process_rate(path, size)
                        res = stream(ds, args.epochs, consume)
                        r = row(kind, size, cpus, single, res, args.step_rates)
                        rows.append(r)
                        print(json.dumps(r), flush=True)
                        if args.out:
                            with open(args.out, "a") as f:
                                f.write(json.dumps(r) + "\n")
                        if args.stats:
                            print(ds.stats(), flush=True)
            finally:
                ray.shutdown()
    print(table(rows))


if __name__ == "__main__":
    main()
