"""`infosam predict --data DATASET --ray`: a whole split predicted on Ray Data.

Ray Data hands the split's shards to a fixed pool of model actors (one model per actor,
loaded once; GPU actors on a cluster, CPU ones here); an actor reads a shard's stored bytes,
decodes each stored image into its samples, draws each sample's evaluation prompt from its own mask and predicts it
(`predict.segment_row`, the single-process path's function), and this driver writes one
results parquet per source shard (`<shard>.predictions.parquet`: id, image, prompt, IoU against
the mask, SAM's score, the mask as COCO RLE, and the category) as soon as the shard's last
image lands. A re-run skips shards whose results exist: an interruption costs at most the
shards in flight. A sample's prompt depends on the seed and its image only
(`predict.row_generator`), so the masks equal the single-process `predict_dataset`'s.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["RESULT_SUFFIX", "RowSegmenter", "predict_split"]

RESULT_SUFFIX = ".predictions.parquet"


class RowSegmenter:
    """A Ray Data actor: the model loaded once, stored rows in, one output row per sample."""

    def __init__(
        self, checkpoint: str, cfg: dict, device: str, threads: int, variant: str | None
    ) -> None:
        import torch

        from orchestrator.config import Config
        from orchestrator.predict import load_model

        torch.set_num_threads(max(1, threads))  # its share of the node, not every core
        self.model, _ = load_model(checkpoint, variant, device=device)
        self.cfg, self.device = Config.from_dict(cfg), device

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of shard paths in; every sample of those shards out."""
        import pyarrow.parquet as pq
        import torch
        from pycocotools import mask as coco_mask

        from orchestrator.predict import segment_row

        out: dict[str, list] = defaultdict(list)
        stored = []
        for path, cols in zip(batch["path"], batch["columns"]):
            table = pq.read_table(str(path), columns=list(cols))  # local path or s3:// URI
            stored += [{**row, "path": str(path)} for row in table.to_pylist()]
        for row in stored:
            with torch.inference_mode():
                decoded, results = segment_row(self.model, row, self.cfg, device=self.device)
            for k, (pred, score, prompt) in enumerate(results):
                gt = decoded["mask_original"][k].astype(bool)
                union = (pred | gt).sum()
                rle = coco_mask.encode(np.asfortranarray(pred.astype(np.uint8)))
                out["id"].append(str(decoded["id"][k]))
                out["image_id"].append(str(row["id"]))
                out["shard"].append(Path(row["path"]).name)
                out["prompt"].append(prompt)
                out["iou"].append(float((pred & gt).sum() / union) if union else 1.0)
                out["score"].append(score)
                out["mask"].append(rle["counts"].decode("ascii"))
                out["height"].append(int(pred.shape[0]))
                out["width"].append(int(pred.shape[1]))
                out["area"].append(int(pred.sum()))
                out["category"].append(str(decoded["category"][k]) if "category" in decoded else "")
        return {k: np.asarray(v) for k, v in out.items()}


def _write_shard(frames: list[Any], target: Path) -> int:
    import pandas as pd

    frame = pd.concat(frames, ignore_index=True).sort_values("id", kind="stable")
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    frame.to_parquet(tmp, index=False)
    os.replace(tmp, target)  # a shard's results appear whole or not at all
    return len(frame)


def predict_split(
    checkpoint: str,
    data_dir: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    *,
    cfg: Any,
    variant: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    stream: Any = None,
) -> dict[str, Any]:
    """Predict `split` of the dataset at `data_dir` on the running Ray; returns a summary
    (also `summary.json` in `out_dir`). `actors` defaults to what the cluster's CPUs (or GPUs)
    hold."""
    import ray

    from orchestrator.data.manifest import load_manifest, shard_paths

    stream = stream or sys.stdout  # (resolved per call: a test's capture replaces it)
    manifest = load_manifest(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = shard_paths(data_dir, split, manifest)
    rows = {Path(s["path"]).name: int(s["rows"]) for s in manifest["shards"] if s["split"] == split}
    pending = [p for p in paths if not _result(out, p).is_file()]
    print(
        f"[predict] {split}: {len(pending)} of {len(paths)} shards to predict "
        f"({len(paths) - len(pending)} done earlier, skipped)",
        file=stream,
        flush=True,
    )
    started = time.perf_counter()
    images, steady = 0, None
    if pending:
        if actors is None:
            res = ray.cluster_resources()
            key, each = ("GPU", gpus_per_actor) if gpus_per_actor else ("CPU", cpus_per_actor)
            actors = max(1, int(res.get(key, 1) // max(each, 1e-6)))
        actor_args = {
            "checkpoint": str(checkpoint),
            "cfg": cfg.to_dict(),
            "device": "cuda" if gpus_per_actor else "cpu",
            "threads": int(max(cpus_per_actor, 1)),
            "variant": variant,
        }
        ds = _segmented(pending, manifest, actor_args, actors, cpus_per_actor, gpus_per_actor)
        images, steady = _write_as_shards_finish(ds, rows, pending, out, actors, stream)
    summary = _summary(out, paths, split, time.perf_counter() - started, images)
    summary["steady_images_per_s"] = round(steady, 2) if steady else None
    summary["actors"] = actors
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _result(out: Path, shard: str) -> Path:
    return out / (Path(shard).stem + RESULT_SUFFIX)


def _segmented(
    paths: list[str],
    manifest: dict,
    actor_args: dict[str, Any],
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
) -> Any:
    """The lazy Dataset: one item per shard, a fixed pool of `actors` that read, decode and
    segment a shard each call. Shards are the unit of parallelism, as they are of the results
    and of resuming. The actors read the parquet themselves: Ray Data's file listing and read
    tasks each want a whole CPU, and with one actor per CPU (1 CPU, 1 actor) they never ran
    and the stream hung."""
    import ray

    from orchestrator.data.reader import columns

    items = [{"path": p, "columns": columns(manifest)} for p in paths]
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        RowSegmenter,
        fn_constructor_kwargs=actor_args,
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=1,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )


def _write_as_shards_finish(
    ds: Any, rows: dict[str, int], pending: list[str], out: Path, actors: int, stream: Any
) -> tuple[int, float | None]:
    """Stream the predictions; write a shard's results once its last image has landed, with a
    progress line per batch. Returns (images predicted, steady images/s: the rate over the
    last three quarters, after the actors' start-up)."""
    buffers: dict[str, list] = defaultdict(list)
    seen: dict[str, set] = defaultdict(set)
    total = sum(rows[Path(p).name] for p in pending)
    started, images, quarter = time.perf_counter(), 0, None
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        for shard, frame in batch.groupby("shard"):
            buffers[shard].append(frame)
            seen[shard].update(frame["image_id"])
            if len(seen[shard]) == rows[shard]:
                _write_shard(buffers.pop(shard), _result(out, shard))
        images = sum(len(v) for v in seen.values())
        now = time.perf_counter()
        if quarter is None and images >= total / 4:
            quarter = (images, now)
        rate = images / max(now - started, 1e-9)
        print(
            f"[predict] {images}/{total} images, {rate:.1f} images/s, up to {actors} actors",
            file=stream,
            flush=True,
        )
    steady = None
    if quarter is not None and images > quarter[0]:
        steady = (images - quarter[0]) / max(time.perf_counter() - quarter[1], 1e-9)
    return images, steady


def _summary(out: Path, paths: list[str], split: str, seconds: float, images: int) -> dict:
    import pandas as pd

    frames = [pd.read_parquet(out / (Path(p).stem + RESULT_SUFFIX)) for p in paths]
    frame = pd.concat(frames, ignore_index=True)
    return {
        "split": split,
        "shards": len(paths),
        "samples": len(frame),
        "mean_iou": float(frame["iou"].mean()),
        "images_this_run": images,
        "seconds_this_run": round(seconds, 2),
        "images_per_s_this_run": round(images / seconds, 2) if images and seconds else None,
    }
