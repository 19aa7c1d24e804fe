"""Batch inference rate: `infosam predict --data --ray` with 1 and 2 CPUs against one process.

    python experiments/bench_batch_predict.py --images 160 --cpus 1 2

A synthetic `camouflage` test split (--images, in shards of ~--shard-kb) is predicted with
the embedded tiny SAM (plain weights, as a user's exported student would be): first by the
single-process `predict_dataset` (torch on one thread, and on all), then on a fresh local
Ray per CPU count with one model actor per CPU. Prints one JSON line per setting: images/s
over the whole run (start-up included) and steady (the last three quarters, after the
actors' start-up), and the speed-up of each CPU count over one.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _dataset(root: Path, images: int, shard_kb: int) -> Path:
    from orchestrator.data.synthetic import synthesize

    synthesize(
        root,
        ["camouflage"],
        seed=0,
        counts={"train": 2, "val": 2, "test": images},
        sheets=False,
        shard_bytes=shard_kb << 10,
    )
    return root / "camouflage"


def _single(data: Path, out: Path, threads: int) -> dict:
    import torch

    from infosam.sam import resolve_checkpoint
    from orchestrator.config import Config
    from orchestrator.predict import load_model, predict_dataset

    torch.set_num_threads(threads)
    model, _ = load_model(resolve_checkpoint("builtin:tiny_teacher"), "tiny")
    t = time.perf_counter()
    done = predict_dataset(model, data, "test", out, cfg=Config())
    seconds = time.perf_counter() - t
    return {"setting": f"single process, {threads} thread(s)", "images_per_s": len(done) / seconds}


def _ray(data: Path, out: Path, cpus: int) -> dict:
    import ray

    from infosam.sam import resolve_checkpoint
    from orchestrator.batch_predict import predict_split
    from orchestrator.config import Config

    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
    try:
        s = predict_split(
            resolve_checkpoint("builtin:tiny_teacher"),
            data,
            "test",
            out,
            cfg=Config(),
            variant="tiny",
            actors=cpus,
            stream=open("/dev/null", "w"),  # noqa: SIM115 - the progress lines, not wanted here
        )
    finally:
        ray.shutdown()
    return {
        "setting": f"Ray Data, {cpus} CPU(s), {s['actors']} actor(s)",
        "images_per_s": s["images_per_s_this_run"],
        "steady_images_per_s": s["steady_images_per_s"],
        "shards": s["shards"],
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--images", type=int, default=160)
    ap.add_argument("--shard-kb", type=int, default=200)
    ap.add_argument("--cpus", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--child", nargs=3, metavar=("DATA", "OUT", "CPUS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        data, out, cpus = args.child
        print(json.dumps(_ray(Path(data), Path(out), int(cpus))))
        return
    with tempfile.TemporaryDirectory(prefix="bench-batch-") as tmp:
        data = _dataset(Path(tmp) / "data", args.images, args.shard_kb)
        rows = [_single(data, Path(tmp) / f"single{t}", t) for t in (1, 2)]
        for cpus in args.cpus:  # a fresh Ray per CPU count, in its own process
            cmd = [sys.executable, __file__, "--child", str(data), f"{tmp}/ray{cpus}", str(cpus)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=True)
            rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = next((r for r in rows if r["setting"].startswith("Ray Data, 1 CPU")), None)
    for r in rows:
        if base and "steady_images_per_s" in r and base["steady_images_per_s"]:
            r["steady_speedup_over_1_cpu"] = round(
                r["steady_images_per_s"] / base["steady_images_per_s"], 2
            )
        r["images_per_s"] = round(r["images_per_s"], 2)
        print(json.dumps({"images": args.images, **r}))


if __name__ == "__main__":
    main()
