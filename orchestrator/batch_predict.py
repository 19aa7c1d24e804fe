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

A folder of image files (`predict --data FOLDER --ray`, prompts from `--prompts FILE.json` or
one `--box`/`--point` for all) runs the same way in parts of `images_per_part` files
(`part-NNNNN.predictions.parquet`); a re-run predicts only the images no part holds yet.
With `png`, the actors also encode the single-process path's PNG files (masks, overlays, the
instance label image) and this driver writes them, before the part's parquet, so a finished
part always has its files.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections import defaultdict
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from orchestrator.storage import atomic_write_json

__all__ = ["RESULT_SUFFIX", "FileSegmenter", "RowSegmenter", "predict_folder", "predict_split"]

RESULT_SUFFIX = ".predictions.parquet"


class RowSegmenter:
    """A Ray Data actor: the model loaded once, stored rows in, one output row per sample."""

    def __init__(
        self,
        checkpoint: str,
        cfg: dict,
        device: str,
        threads: int,
        variant: str | None,
        png: bool = False,
    ) -> None:
        import torch

        from orchestrator.config import Config
        from orchestrator.predict import load_model

        torch.set_num_threads(max(1, threads))  # its share of the node, not every core
        self.model, _ = load_model(checkpoint, variant, device=device)
        self.cfg, self.device, self.png = Config.from_dict(cfg), device, png

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """A batch of shard paths in; every sample of those shards out."""
        import pyarrow.parquet as pq
        import torch

        from orchestrator.predict import row_outputs, segment_row

        out: dict[str, list] = defaultdict(list)
        stored = []
        for path, cols in zip(batch["path"], batch["columns"]):
            table = pq.read_table(str(path), columns=list(cols))  # local path or s3:// URI
            stored += [{**row, "path": str(path)} for row in table.to_pylist()]
        for row in stored:
            with torch.inference_mode():
                decoded, results = segment_row(self.model, row, self.cfg, device=self.device)
            entries, files = row_outputs(row, decoded, results, files=self.png)
            for k, (entry, (pred, score, _)) in enumerate(zip(entries, results, strict=True)):
                out["id"].append(entry["id"])
                out["image_id"].append(str(row["id"]))
                out["shard"].append(Path(row["path"]).name)
                out["prompt"].append(entry["prompt"])
                out["iou"].append(entry["iou"])
                out["score"].append(score)
                out["category"].append(entry.get("category", ""))
                _mask_columns(out, pred)
                _file_columns(out, files if k == 0 else {}, self.png)
        return _columns(out)


class FileSegmenter:
    """A Ray Data actor for a folder of image files: a part (a list of files and their
    prompts) in, one output row per (image, prompt) out."""

    def __init__(
        self,
        checkpoint: str,
        device: str,
        threads: int,
        variant: str | None,
        batch_size: int,
        png: bool = False,
    ) -> None:
        import torch

        from orchestrator.predict import load_model

        torch.set_num_threads(max(1, threads))
        self.model, _ = load_model(checkpoint, variant, device=device)
        self.device, self.batch_size, self.png = device, batch_size, png

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from infosam.predictor import Prompt, segment_image
        from orchestrator.predict import image_outputs, read_image_file

        out: dict[str, list] = defaultdict(list)
        for part, images, asked in zip(batch["part"], batch["images"], batch["prompts"]):
            for path, spec in zip(json.loads(images), json.loads(asked), strict=True):
                several = isinstance(spec, list)
                prompts = [Prompt(**p) for p in (spec if several else [spec])]
                array = read_image_file(path)
                results = segment_image(
                    self.model, array, prompts, batch_size=self.batch_size, device=self.device
                )
                entries, files = image_outputs(path, array, results, several)
                for k, (entry, (mask, _)) in enumerate(zip(entries, results, strict=True)):
                    out["id"].append(f"{path}#{k}" if several else path)
                    out["image_id"].append(path)
                    out["shard"].append(str(part))
                    out["image"].append(path)
                    out["object"].append(k if several else -1)
                    out["prompt"].append(json.dumps(asdict(prompts[k])))
                    out["score"].append(results[k][1])
                    out["foreground_fraction"].append(entry["foreground_fraction"])
                    _mask_columns(out, mask)
                    _file_columns(out, files if k == 0 else {}, self.png)
        return _columns(out)


def _columns(out: dict[str, list]) -> dict[str, np.ndarray]:
    """Numpy columns; bytes stay objects (a fixed-width bytes array drops trailing NULs)."""
    return {k: np.asarray(v, dtype=object if k == "file_data" else None) for k, v in out.items()}


def _mask_columns(out: dict[str, list], mask: np.ndarray) -> None:
    """A mask as COCO RLE (what pycocotools and the MLflow model give) with its size and area."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    out["mask"].append(rle["counts"].decode("ascii"))
    out["height"].append(int(mask.shape[0]))
    out["width"].append(int(mask.shape[1]))
    out["area"].append(int(mask.sum()))


def _file_columns(out: dict[str, list], files: dict[str, bytes], png: bool) -> None:
    """An image's PNG files ride on its first row, for the driver to write."""
    if png:
        out["file_names"].append(json.dumps(list(files)))
        out["file_data"].append(b"".join(files.values()))
        out["file_sizes"].append(json.dumps([len(v) for v in files.values()]))


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
    png: bool = False,
    stream: Any = None,
) -> dict[str, Any]:
    """Predict `split` of the dataset at `data_dir` on the running Ray; returns a summary
    (also `summary.json` in `out_dir`). `actors` defaults to what the cluster's CPUs (or GPUs)
    hold; `png` also writes the single-process path's PNG files."""
    from orchestrator.data.manifest import load_manifest, shard_paths
    from orchestrator.data.reader import columns

    stream = stream or sys.stdout  # (resolved per call: a test's capture replaces it)
    manifest = load_manifest(data_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = shard_paths(data_dir, split, manifest)
    rows = {Path(s["path"]).name: int(s["rows"]) for s in manifest["shards"] if s["split"] == split}
    pending = [p for p in paths if not _result(out, p).is_file()]
    _say(f"{split}: {len(pending)} of {len(paths)} shards to predict", len(paths), pending, stream)
    started = time.perf_counter()
    images, steady = 0, None
    if pending:
        actors = _pool_size(actors, cpus_per_actor, gpus_per_actor, len(pending))
        actor_args = {
            "checkpoint": str(checkpoint),
            "cfg": cfg.to_dict(),
            **_actor_common(variant, cpus_per_actor, gpus_per_actor, png),
        }
        items = [{"path": p, "columns": columns(manifest)} for p in pending]
        ds = _segmented(items, RowSegmenter, actor_args, actors, cpus_per_actor, gpus_per_actor)
        units = {Path(p).name: rows[Path(p).name] for p in pending}
        images, steady = _write_as_units_finish(ds, units, out, actors, stream)
    frame = _results(out, [_result(out, p) for p in paths])
    summary = {
        "split": split,
        "shards": len(paths),
        "samples": len(frame),
        "mean_iou": float(frame["iou"].mean()),
        **_rates(images, time.perf_counter() - started, steady, actors),
    }
    atomic_write_json(out / "summary.json", summary, indent=2)
    return summary


def predict_folder(
    checkpoint: str,
    images: list[str],
    prompts: dict[str, Any],
    out_dir: str | os.PathLike,
    *,
    variant: str | None = None,
    actors: int | None = None,
    cpus_per_actor: float = 1.0,
    gpus_per_actor: float = 0.0,
    batch_size: int = 8,
    images_per_part: int = 16,
    png: bool = False,
    stream: Any = None,
) -> dict[str, Any]:
    """Predict image files (`predict.list_images` of a folder, local or s3://) with their
    prompts (`predict.parse_prompts`) on the running Ray, `images_per_part` files per task and
    results file; a re-run predicts only the images that no part in `out_dir` holds yet."""
    stream = stream or sys.stdout
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    earlier, pending, parts = _plan_parts(out, images, images_per_part)
    _say(f"{len(pending)} of {len(images)} images to predict", len(images), pending, stream)
    started = time.perf_counter()
    count, steady = 0, None
    if pending:
        actors = _pool_size(actors, cpus_per_actor, gpus_per_actor, len(parts))
        actor_args = {
            "checkpoint": str(checkpoint),
            "batch_size": batch_size,
            **_actor_common(variant, cpus_per_actor, gpus_per_actor, png),
        }
        items = [
            {
                "part": name,
                "images": json.dumps(chunk),
                "prompts": json.dumps(_specs(chunk, prompts)),
            }
            for name, chunk in parts.items()
        ]
        ds = _segmented(items, FileSegmenter, actor_args, actors, cpus_per_actor, gpus_per_actor)
        units = {name: len(chunk) for name, chunk in parts.items()}
        count, steady = _write_as_units_finish(ds, units, out, actors, stream)
    frame = _results(out, sorted(out.glob(f"part-*{RESULT_SUFFIX}")))
    held = frame[frame["image"].isin(set(images))]
    summary = {
        "images": int(held["image"].nunique()),
        "masks": len(held),
        "parts": len(earlier) + len(parts),
        "mean_score": float(held["score"].mean()),
        **_rates(count, time.perf_counter() - started, steady, actors),
    }
    atomic_write_json(out / "summary.json", summary, indent=2)
    return summary


def _plan_parts(
    out: Path, images: list[str], images_per_part: int
) -> tuple[list[Path], list[str], dict[str, list[str]]]:
    """(the parts already in `out`, the images none of them holds, those images in new parts
    numbered after the old ones)."""
    import pandas as pd

    earlier = sorted(out.glob(f"part-*{RESULT_SUFFIX}"))
    done = set()
    for path in earlier:
        done.update(pd.read_parquet(path, columns=["image"])["image"])
    pending = [i for i in images if i not in done]
    first = 1 + max((int(p.name[5:10]) for p in earlier), default=-1)
    step = max(1, images_per_part)
    parts = {
        f"part-{first + n:05d}": pending[start : start + step]
        for n, start in enumerate(range(0, len(pending), step))
    }
    return earlier, pending, parts


def _specs(chunk: list[str], prompts: dict[str, Any]) -> list[Any]:
    """Each image's Prompt (or list of them) as JSON-able dicts for the actors."""
    return [
        [asdict(p) for p in prompts[i]] if isinstance(prompts[i], list) else asdict(prompts[i])
        for i in chunk
    ]


def _say(what: str, total: int, pending: list, stream: Any) -> None:
    print(
        f"[predict] {what} ({total - len(pending)} done earlier, skipped)", file=stream, flush=True
    )


def _pool_size(actors: int | None, cpus_per_actor: float, gpus_per_actor: float, units: int) -> int:
    """As many actors as the cluster's CPUs (or GPUs) hold at the asked share, unless told;
    never more than there are units to give them."""
    import ray

    if actors is not None:
        return max(1, min(actors, units))
    res = ray.cluster_resources()
    key, each = ("GPU", gpus_per_actor) if gpus_per_actor else ("CPU", cpus_per_actor)
    return max(1, min(int(res.get(key, 1) // max(each, 1e-6)), units))


def _actor_common(
    variant: str | None, cpus_per_actor: float, gpus_per_actor: float, png: bool
) -> dict[str, Any]:
    return {
        "device": "cuda" if gpus_per_actor else "cpu",
        "threads": int(max(cpus_per_actor, 1)),
        "variant": variant,
        "png": png,
    }


def _rates(images: int, seconds: float, steady: float | None, actors: int | None) -> dict:
    return {
        "images_this_run": images,
        "seconds_this_run": round(seconds, 2),
        "images_per_s_this_run": round(images / seconds, 2) if images and seconds else None,
        "steady_images_per_s": round(steady, 2) if steady else None,
        "actors": actors,
    }


def _result(out: Path, shard: str) -> Path:
    return out / (Path(shard).stem + RESULT_SUFFIX)


def _results(out: Path, paths: list[Path]) -> Any:
    import pandas as pd

    return pd.concat([pd.read_parquet(p) for p in paths], ignore_index=True)


def _segmented(
    items: list[dict],
    actor: type,
    actor_args: dict[str, Any],
    actors: int,
    cpus_per_actor: float,
    gpus_per_actor: float,
) -> Any:
    """The lazy Dataset: one item per unit (a shard, a part of a folder), a fixed pool of
    `actors` that read, decode and segment a unit each call. Units are the unit of
    parallelism, as they are of the results and of resuming. The actors read their input
    themselves: Ray Data's file listing and read tasks each want a whole CPU, and with one
    actor per CPU (1 CPU, 1 actor) they never ran and the stream hung."""
    import ray

    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(
        actor,
        fn_constructor_kwargs=actor_args,
        compute=ray.data.ActorPoolStrategy(size=actors),
        batch_size=1,
        batch_format="numpy",
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor,
    )


def _write_files(out: Path, frame: Any) -> Any:
    """Write the PNG files riding on `frame` (names, sizes, concatenated bytes); the frame
    without them."""
    if "file_names" not in frame:
        return frame
    for names, sizes, data in zip(frame["file_names"], frame["file_sizes"], frame["file_data"]):
        offset = 0
        for name, size in zip(json.loads(names), json.loads(sizes), strict=True):
            target = out / name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data[offset : offset + size])
            offset += size
    return frame.drop(columns=["file_names", "file_sizes", "file_data"])


def _write_as_units_finish(
    ds: Any, units: dict[str, int], out: Path, actors: int, stream: Any
) -> tuple[int, float | None]:
    """Stream the predictions; write a unit's files as they land and its results parquet once
    its last image has, with a progress line per batch. `units` maps a unit (shard file name
    or part) to its image count. Returns (images predicted, steady images/s: the rate over the
    last three quarters, after the actors' start-up)."""
    buffers: dict[str, list] = defaultdict(list)
    seen: dict[str, set] = defaultdict(set)
    total = sum(units.values())
    started, images, quarter = time.perf_counter(), 0, None
    for batch in ds.iter_batches(batch_size=None, batch_format="pandas"):
        for unit, frame in batch.groupby("shard"):
            buffers[unit].append(_write_files(out, frame))
            seen[unit].update(frame["image_id"])
            if len(seen[unit]) == units[unit]:
                _write_shard(buffers.pop(unit), _result(out, unit))
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
