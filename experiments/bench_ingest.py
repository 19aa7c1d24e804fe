"""Ingest throughput: COCO polygons, instance label images and folder pairs, 1 and 2 workers.

    python experiments/bench_ingest.py [--images 200] [--repeats 2] [--work DIR]

Builds three sources from one set of 640x480 JPEGs (noise plus shapes, ~275 KB each): a COCO
file with 7 polygons an image, 16-bit PNG label images with ~20 ids, and binary PNG masks; then
times the ingest function (best of `--repeats`) with `--workers` 1 and 2, and prints one JSON
line per measurement and a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw


def _image(rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]]]:
    img = rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)
    polys = []
    canvas = Image.fromarray(img)
    draw = ImageDraw.Draw(canvas)
    for _ in range(7):
        cx, cy = rng.uniform(60, 580), rng.uniform(60, 420)
        r = rng.uniform(15, 50)
        angles = np.sort(rng.uniform(0, 2 * np.pi, 8))
        pts = [(cx + r * np.cos(a), cy + r * np.sin(a)) for a in angles]
        draw.polygon(pts, fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
        polys.append([float(v) for p in pts for v in p])
    return np.asarray(canvas), polys


def build(root: Path, n: int) -> None:
    """Images once, then the three annotation forms of them."""
    rng = np.random.default_rng(0)
    for sub in ("images", "masks", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        img, polys = _image(rng)
        name = f"im{i:04d}.jpg"
        Image.fromarray(img).save(root / "images" / name, quality=90)
        images.append({"id": i, "file_name": name, "height": 480, "width": 640})
        labels = np.zeros((480, 640), np.uint16)
        mask = np.zeros((480, 640), np.uint8)
        for k, poly in enumerate(polys):
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": i,
                    "category_id": 1,
                    "segmentation": [poly],
                    "iscrowd": 0,
                }
            )
            layer = Image.new("L", (640, 480))
            ImageDraw.Draw(layer).polygon(list(zip(poly[::2], poly[1::2])), fill=1)
            on = np.asarray(layer) > 0
            mask |= on
            labels[on] = 1000 + 3 * k
        for k in range(13):  # more ids in the label image: ~20 in all
            y, x = rng.integers(0, 440), rng.integers(0, 600)
            labels[y : y + 30, x : x + 30] = 2000 + k
        Image.fromarray(labels).save(root / "labels" / f"im{i:04d}.png")
        Image.fromarray(mask * 255).save(root / "masks" / f"im{i:04d}.png")
    coco = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
    (root / "coco.json").write_text(json.dumps(coco))


def run(fmt: str, root: Path, out: Path, workers: int) -> tuple[float, int]:
    from orchestrator.data.formats import ingest

    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    if fmt == "coco":
        manifest = ingest(
            "coco", root / "coco.json", out, images_dir=root / "images", workers=workers
        )
    elif fmt == "labels":
        manifest = ingest("labels", root, out, masks="labels", images="images", workers=workers)
    else:
        manifest = ingest("folders", root, out, workers=workers, name="pairs")
    return time.perf_counter() - t0, sum(manifest["counts"].values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", help="folder for the sources (default: a temporary one)")
    args = p.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="bench-ingest-"))
    src = work / "src"
    if not (src / "coco.json").is_file():
        build(src, args.images)
    rows = []
    for fmt in ("coco", "labels", "folders"):
        for workers in (1, 2):
            best, samples = min(
                run(fmt, src, work / f"out-{fmt}", workers) for _ in range(args.repeats)
            )
            row = {"format": fmt, "workers": workers, "seconds": round(best, 2), "samples": samples}
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\nmachine: {os.cpu_count()} CPUs; best of {args.repeats}\n")
    print("| source | samples | 1 worker | 2 workers |\n|---|---|---|---|")
    for fmt in ("coco", "labels", "folders"):
        one, two = (r for r in rows if r["format"] == fmt)
        print(
            f"| {fmt} | {one['samples']} | {one['seconds']:.2f} s | {two['seconds']:.2f} s "
            f"({one['seconds'] / two['seconds']:.2f}x) |"
        )


if __name__ == "__main__":
    main()
