"""The embedded default data: deterministic synthetic domains, no downloads, seconds to make.

- `general`: varied shapes (ellipses, polygons, blobs, silhouettes) with procedural textures that
  stand out from a textured background: the pre-training domain of the tiny teacher (it plays
  the role of SA-1B).
- Specialised domains modelled on the paper's benchmarks, where a general model is weak:
  `camouflage` (object texture and colour close to the background, like CAMO),
  `roads` (thin curved structures, like the Road benchmark),
  `lesions` (low-contrast blobs with soft borders, like ISIC / Kvasir).
Every sample is a pure function of (seed, domain, split, index): same seed, same bytes.
"""

from __future__ import annotations

import fcntl
import io
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from orchestrator.config import SYNTHETIC_DOMAINS, Config, ConfigError
from orchestrator.data.codec import IngestError, encode_mask
from orchestrator.data.manifest import iter_rows, load_manifest
from orchestrator.data.writer import DatasetWriter
from orchestrator.storage import is_remote, join


def ensure_data(cfg: Config) -> Path | str:
    """The dataset folder; synthesises an embedded domain on first use (under a file lock)."""
    if is_remote(cfg.data.root):  # shared storage on clusters (s3://...): must be ingested already
        uri = join(cfg.data.root, cfg.data.dataset)
        load_manifest(uri)
        return uri
    root = Path(cfg.data.root).expanduser().resolve()
    path = root / cfg.data.dataset
    if (path / "manifest.json").is_file() and not _stale_synthetic(cfg, path):
        return path
    if not (cfg.data.synthesize and cfg.data.dataset in SYNTHETIC_DOMAINS):
        raise ConfigError(
            f"dataset not found: {path} has no manifest.json. For the paper benchmarks, download "
            "the Conv-LoRA dataset zips (polyp, camo_sem_seg, isic2017, leaf_disease_segmentation, "
            f"road_segmentation), unzip each, and run `infosam data ingest --format convlora "
            f"<unzipped folder> {root}`; or point data.root/data.dataset at an ingested dataset"
        )
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".synth.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if not (path / "manifest.json").is_file() or _stale_synthetic(cfg, path):
            print(
                f"[infosam] generating synthetic domain {cfg.data.dataset!r} in {root}", flush=True
            )
            synthesize(  # replaces our own stale domain whole (DatasetWriter), nothing else
                root,
                [cfg.data.dataset],
                seed=cfg.data.synth_seed,
                scale=cfg.data.synth_scale,
                counts=cfg.data.synth_counts,
            )
    return path


def _stale_synthetic(cfg: Config, path: Path) -> bool:
    """A synthetic domain this project generated with other split sizes or seed than `cfg`'s."""
    if not (cfg.data.synthesize and cfg.data.dataset in SYNTHETIC_DOMAINS):
        return False
    import json

    manifest = json.loads((path / "manifest.json").read_text())  # no shard checks: just sizes
    generator = manifest.get("generator") or {}
    if manifest.get("format") != "synthetic" or not generator:
        return False  # a user's dataset under a synthetic name: never touched
    wanted = split_sizes(cfg.data.dataset, cfg.data.synth_scale, cfg.data.synth_counts)
    return generator.get("splits") != wanted or generator.get("seed") != cfg.data.synth_seed


__all__ = ["DOMAINS", "contact_sheet", "generate_sample", "synthesize"]


Sample = tuple[np.ndarray, np.ndarray]


def fractal_noise(
    rng: np.random.Generator, h: int, w: int, base: int = 4, octaves: int = 4
) -> np.ndarray:
    """Sum of upsampled random grids (value noise), normalised to 0..1."""
    out = np.zeros((h, w), np.float32)
    amp, total = 1.0, 0.0
    for o in range(octaves):
        n = base * 2**o
        grid = rng.random((n, n), dtype=np.float32)
        up = Image.fromarray(grid, mode="F").resize((w, h), Image.BICUBIC)
        out += amp * np.asarray(up)
        total += amp
        amp *= 0.5
    out /= total
    lo, hi = out.min(), out.max()
    return (out - lo) / max(hi - lo, 1e-6)


def texture(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """One of several procedural textures in 0..1: noise, stripes, spots, or a smooth gradient."""
    kind = rng.integers(4)
    noise = fractal_noise(rng, h, w, base=int(rng.integers(2, 8)), octaves=int(rng.integers(2, 5)))
    if kind == 0:
        return noise
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    if kind == 1:
        theta = rng.uniform(0, np.pi)
        freq = rng.uniform(0.05, 0.3)
        stripes = 0.5 + 0.5 * np.sin(freq * (np.cos(theta) * xx + np.sin(theta) * yy) + 4 * noise)
        return 0.7 * stripes + 0.3 * noise
    if kind == 2:
        spots = np.zeros((h, w), np.float32)
        for _ in range(int(rng.integers(10, 60))):
            cy, cx, r = rng.uniform(0, h), rng.uniform(0, w), rng.uniform(2, 10)
            spots = np.maximum(spots, ((yy - cy) ** 2 + (xx - cx) ** 2 < r * r).astype(np.float32))
        return 0.6 * spots + 0.4 * noise
    theta = rng.uniform(0, 2 * np.pi)
    grad = np.cos(theta) * xx / w + np.sin(theta) * yy / h
    grad = (grad - grad.min()) / max(np.ptp(grad), 1e-6)
    return 0.6 * grad + 0.4 * noise


def colourise(t: np.ndarray, c0: np.ndarray, c1: np.ndarray) -> np.ndarray:
    return t[..., None] * c1[None, None] + (1 - t[..., None]) * c0[None, None]


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3).astype(np.float32)


def _ellipse(rng, h, w, scale) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    ry, rx = rng.uniform(0.4, 1.0, 2) * scale * min(h, w) / 2
    t = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u, v = dx * np.cos(t) + dy * np.sin(t), -dx * np.sin(t) + dy * np.cos(t)
    return (u / rx) ** 2 + (v / ry) ** 2 <= 1


def _polygon(rng, h, w, scale) -> np.ndarray:
    n = int(rng.integers(3, 9))
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r = scale * min(h, w) / 2
    angles = np.sort(rng.uniform(0, 2 * np.pi, n))
    radii = r * rng.uniform(0.5, 1.0, n)
    pts = [(float(cx + a * np.cos(b)), float(cy + a * np.sin(b))) for a, b in zip(radii, angles)]
    img = Image.new("L", (w, h), 0)
    ImageDraw.Draw(img).polygon(pts, fill=1)
    return np.asarray(img).astype(bool)


def _blob(rng, h, w, scale, wobble: float = 0.25) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    cy, cx = rng.uniform(0.3, 0.7) * h, rng.uniform(0.3, 0.7) * w
    r0 = scale * min(h, w) / 2 * rng.uniform(0.6, 1.0)
    theta = np.arctan2(yy - cy, xx - cx)
    r = np.full_like(theta, r0)
    for k in range(2, 6):
        r += r0 * wobble / k * rng.uniform(-1, 1) * np.sin(k * theta + rng.uniform(0, 2 * np.pi))
    return np.hypot(yy - cy, xx - cx) <= r


def _silhouette(rng, h, w, scale) -> np.ndarray:
    """A body with a head and limbs: union of connected ellipses/rectangles."""
    img = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(img)
    s = scale * min(h, w) / 2
    cy, cx = rng.uniform(0.4, 0.6) * h, rng.uniform(0.4, 0.6) * w
    bw, bh = s * rng.uniform(0.5, 0.9), s * rng.uniform(0.3, 0.6)
    d.ellipse([cx - bw, cy - bh, cx + bw, cy + bh], fill=1)
    hx = cx + bw * rng.choice([-1, 1]) * 0.9
    hr = s * rng.uniform(0.2, 0.35)
    d.ellipse([hx - hr, cy - bh - hr * 0.8, hx + hr, cy - bh + hr * 1.2], fill=1)
    for _ in range(int(rng.integers(2, 5))):
        lx = cx + rng.uniform(-0.8, 0.8) * bw
        lw = s * rng.uniform(0.06, 0.12)
        d.rectangle([lx - lw, cy, lx + lw, cy + bh + s * rng.uniform(0.3, 0.6)], fill=1)
    return np.asarray(img).astype(bool)


SHAPES: list[Callable[..., np.ndarray]] = [_ellipse, _polygon, _blob, _silhouette]


def _size(rng: np.random.Generator) -> tuple[int, int]:
    """Varied, often non-square original sizes so resizing and padding are exercised."""
    return int(rng.integers(200, 321)), int(rng.integers(200, 321))


def _finish(img: np.ndarray, rng: np.random.Generator, noise: float = 6.0) -> np.ndarray:
    img = img + rng.normal(0, noise, img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def gen_general(rng: np.random.Generator) -> Sample:
    h, w = _size(rng)
    bg0, bg1 = _colour(rng), _colour(rng)
    img = colourise(texture(rng, h, w), bg0, bg1)
    for _ in range(int(rng.integers(0, 3))):  # distractors, not part of the mask
        m = SHAPES[rng.integers(len(SHAPES))](rng, h, w, rng.uniform(0.15, 0.35))
        img[m] = colourise(texture(rng, h, w), _colour(rng), _colour(rng))[m]
    mask = SHAPES[rng.integers(len(SHAPES))](rng, h, w, rng.uniform(0.25, 0.7))
    # Object colours far from the background mean: the general domain is easy to separate.
    while True:
        c0, c1 = _colour(rng), _colour(rng)
        if np.linalg.norm((c0 + c1) / 2 - (bg0 + bg1) / 2) > 90:
            break
    obj = colourise(texture(rng, h, w), c0, c1)
    img[mask] = obj[mask]
    return _finish(img, rng), mask.astype(np.uint8)


def gen_camouflage(rng: np.random.Generator) -> Sample:
    h, w = _size(rng)
    c0, c1 = _colour(rng), _colour(rng)
    base = int(rng.integers(3, 8))
    bg = colourise(fractal_noise(rng, h, w, base=base, octaves=4), c0, c1)
    mask = SHAPES[[2, 3, 0][rng.integers(3)]](rng, h, w, rng.uniform(0.3, 0.7))
    shift = rng.uniform(-18, 18, 3).astype(np.float32)  # object colour barely differs
    obj = colourise(fractal_noise(rng, h, w, base=base + 2, octaves=4), c0 + shift, c1 + shift)
    img = bg.copy()
    img[mask] = obj[mask]
    return _finish(img, rng, noise=8.0), mask.astype(np.uint8)


def gen_roads(rng: np.random.Generator) -> Sample:
    h, w = _size(rng)
    ground = colourise(
        fractal_noise(rng, h, w, base=6, octaves=5),
        np.array([60, 90, 40], np.float32) + rng.uniform(-20, 20, 3),
        np.array([150, 140, 90], np.float32) + rng.uniform(-20, 20, 3),
    )
    mimg = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(mimg)
    for _ in range(int(rng.integers(1, 4))):
        # A smooth curve across the image: a random walk with inertia.
        x, y = (rng.uniform(0, w), 0.0) if rng.random() < 0.5 else (0.0, rng.uniform(0, h))
        ang = np.arctan2(h / 2 - y, w / 2 - x) + rng.uniform(-0.5, 0.5)
        pts = [(x, y)]
        for _ in range(80):
            ang += rng.normal(0, 0.12)
            x, y = x + 6 * np.cos(ang), y + 6 * np.sin(ang)
            pts.append((float(x), float(y)))
        d.line(pts, fill=1, width=int(rng.integers(3, 9)), joint="curve")
    mask = np.asarray(mimg).astype(bool)
    road = np.array([120, 118, 112], np.float32) + rng.uniform(-25, 25, 3)
    img = ground.copy()
    img[mask] = 0.75 * road + 0.25 * ground[mask]
    return _finish(img, rng, noise=10.0), mask.astype(np.uint8)


def gen_lesions(rng: np.random.Generator) -> Sample:
    h, w = _size(rng)
    skin = np.array([200, 150, 130], np.float32) + rng.uniform(-30, 30, 3)
    bg = colourise(fractal_noise(rng, h, w, base=3, octaves=3), skin * 0.85, skin)
    yy, xx = np.mgrid[:h, :w].astype(np.float32)
    vignette = 1 - 0.35 * (((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2) * 2
    mask = _blob(rng, h, w, rng.uniform(0.25, 0.6), wobble=0.4)
    soft = Image.fromarray((mask * 255).astype(np.uint8)).filter(
        ImageFilter.GaussianBlur(rng.uniform(4, 9))
    )
    alpha = np.asarray(soft).astype(np.float32) / 255 * rng.uniform(0.18, 0.32)
    lesion = skin * np.array([0.55, 0.45, 0.45], np.float32)
    img = (bg * (1 - alpha[..., None]) + lesion * alpha[..., None]) * vignette[..., None]
    return _finish(img, rng, noise=5.0), mask.astype(np.uint8)


@dataclass(frozen=True)
class DomainSpec:
    generate: Callable[[np.random.Generator], Sample]
    splits: dict[str, int]
    about: str


DOMAINS: dict[str, DomainSpec] = {
    "general": DomainSpec(
        gen_general,
        {"train": 1200, "val": 100, "test": 200},
        "textured shapes on textured backgrounds (teacher pre-training)",
    ),
    "camouflage": DomainSpec(
        gen_camouflage,
        {"train": 120, "val": 40, "test": 80},
        "objects whose texture and colour match the background",
    ),
    "roads": DomainSpec(
        gen_roads,
        {"train": 120, "val": 40, "test": 80},
        "thin curved road-like structures on aerial-like ground",
    ),
    "lesions": DomainSpec(
        gen_lesions,
        {"train": 120, "val": 40, "test": 80},
        "low-contrast soft-bordered blobs on skin-like backgrounds",
    ),
}


_DOMAIN_INDEX = {name: i for i, name in enumerate(DOMAINS)}


_SPLIT_INDEX = {"train": 0, "val": 1, "test": 2}


def generate_sample(domain: str, seed: int, split: str, index: int) -> Sample:
    """One (image (H, W, 3) uint8, mask (H, W) 0/1) pair, a pure function of its arguments."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown synthetic domain {domain!r}; choose from {sorted(DOMAINS)}")
    rng = np.random.default_rng([seed, _DOMAIN_INDEX[domain], _SPLIT_INDEX.get(split, 9), index])
    return DOMAINS[domain].generate(rng)


def _jpeg(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=92)
    return buf.getvalue()


def split_sizes(
    domain: str, scale: float = 1.0, counts: dict[str, int] | None = None
) -> dict[str, int]:
    """Images per split: the domain's defaults times `scale`, then `counts` where given."""
    sizes = {s: max(2, round(n * scale)) for s, n in DOMAINS[domain].splits.items()}
    sizes.update({s: int(n) for s, n in (counts or {}).items()})
    return sizes


def synthesize(
    out: str | os.PathLike,
    domains: list[str] | None = None,
    *,
    seed: int = 0,
    scale: float = 1.0,
    counts: dict[str, int] | None = None,
    sheets: bool = True,
    shard_bytes: int | None = None,
) -> dict[str, dict]:
    """Write each domain as a dataset (parquet shards + manifest [+ contact_sheet.png]) under `out`.

    `scale` multiplies the default split sizes; `counts` sets some or all of them explicitly
    (the same for every domain); `shard_bytes` the shard size (default the writer's).
    """
    manifests = {}
    for domain in domains or list(DOMAINS):
        spec = DOMAINS.get(domain)
        if spec is None:
            raise IngestError(f"unknown synthetic domain {domain!r}; choose from {sorted(DOMAINS)}")
        sizes = split_sizes(domain, scale, counts)
        writer = DatasetWriter(
            out,
            domain,
            source=f"synthetic:{domain}",
            fmt="synthetic",
            extra={
                "generator": {"domain": domain, "seed": seed, "splits": sizes, "about": spec.about}
            },
            **({"shard_bytes": shard_bytes} if shard_bytes else {}),
        )
        with writer:
            manifests[domain] = _fill_domain(writer, domain, seed, sizes, sheets)
    return manifests


def _fill_domain(
    writer: DatasetWriter, domain: str, seed: int, sizes: dict[str, int], sheets: bool
) -> dict:
    """One domain's samples into `writer`; its contact sheet goes in before the swap."""
    for split, n in sizes.items():
        for i in range(n):
            img, mask = generate_sample(domain, seed, split, i)
            flags = [] if mask.any() else ["empty_mask"]
            writer.add(
                split,
                f"{split}/{domain}_{i:05d}",
                _jpeg(img),
                encode_mask(mask),
                img.shape[0],
                img.shape[1],
                f"synthetic:{domain}:seed={seed}:{split}:{i}",
                flags,
            )
    return writer.close(
        (lambda folder: contact_sheet(folder, folder / "contact_sheet.png")) if sheets else None
    )


def contact_sheet(
    dataset_dir: str | os.PathLike,
    out_png: str | os.PathLike,
    n: int = 16,
    split: str = "train",
    tile: int = 160,
) -> Path:
    """A grid of images with their mask outlines in red, so a person can see the data."""
    cols = 4
    rows_img = []
    for i, row in enumerate(iter_rows(dataset_dir, split)):
        if i >= n:
            break
        img = Image.open(io.BytesIO(row["image"])).convert("RGB")
        mask = Image.open(io.BytesIO(row["mask"])).point(lambda v: 255 if v else 0)
        edge = np.asarray(mask.filter(ImageFilter.MaxFilter(3))) != np.asarray(
            mask.filter(ImageFilter.MinFilter(3))
        )
        arr = np.asarray(img).copy()
        arr[edge] = (255, 0, 0)
        thumb = Image.fromarray(arr)
        thumb.thumbnail((tile, tile))
        canvas = Image.new("RGB", (tile, tile), (30, 30, 30))
        canvas.paste(thumb, (0, 0))
        rows_img.append(canvas)
    sheet = Image.new(
        "RGB", (cols * tile, ((len(rows_img) + cols - 1) // cols) * tile), (30, 30, 30)
    )
    for i, t in enumerate(rows_img):
        sheet.paste(t, ((i % cols) * tile, (i // cols) * tile))
    out_png = Path(out_png)
    sheet.save(out_png)
    return out_png
