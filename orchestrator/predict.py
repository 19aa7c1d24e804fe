"""Use a fine-tuned model: predict masks for image files, export weights plain SAM can load."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from infosam.engine import predict_scored
from infosam.predictor import Prompt, segment_image
from infosam.sam import BUILTIN_CHECKPOINTS, PromptableSam, build_sam, resolve_checkpoint
from orchestrator.data.codec import Rejected, decode_image, encode_png, open_encoded
from orchestrator.storage import atomic_write_json, local_copy, local_target

__all__ = [
    "Prompt",
    "export_checkpoint",
    "export_onnx",
    "image_outputs",
    "list_images",
    "load_model",
    "parse_prompts",
    "predict_dataset",
    "predict_files",
    "row_generator",
    "row_outputs",
    "segment_row",
]


def load_model(
    checkpoint: str | os.PathLike, variant: str | None = None, device: str = "cpu"
) -> tuple[PromptableSam, str]:
    """A training checkpoint dir, a self-contained export, plain SAM weights (+ variant), or a
    SAM 2.1 checkpoint in Meta's format (`sam2.1_hiera_*.pt`, variant read from its shapes);
    local or on object storage (`s3://...`, read through a local copy); or an embedded teacher
    (`builtin:tiny_teacher`, `builtin:tiny_sam2_teacher`)."""
    if str(checkpoint).startswith("builtin:"):
        variant = variant or BUILTIN_CHECKPOINTS.get(str(checkpoint), (None, None))[1]
        checkpoint = resolve_checkpoint(checkpoint)  # an unknown name: the known ones listed
    try:
        path = local_copy(checkpoint)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None
    if not path.exists():
        raise ValueError(
            f"checkpoint not found: {path} (a training checkpoint directory, an `infosam export` "
            "file or plain SAM weights such as sam_vit_b_01ec64.pth)"
        )
    if path.is_dir():
        from orchestrator.train.checkpoints import load_trained

        model, cfg, _ = load_trained(path, device)
        return model, cfg.model.variant
    obj = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):  # Meta's SAM 2.1 format
        from infosam.sam2 import PromptableSam2, build_sam2_model, infer_sam2_variant

        variant = variant or infer_sam2_variant(obj["model"], str(path))
        sam2 = build_sam2_model(variant, path, state=obj["model"])
        return PromptableSam2(sam2).to(device).eval(), variant
    if isinstance(obj, dict) and "infosam_export" in obj:
        from infosam.sam2 import PromptableSam2, load_exported

        module, family = load_exported(path)
        wrap = PromptableSam2 if family == "sam2" else PromptableSam
        return wrap(module).to(device).eval(), obj["infosam_export"]["variant"]
    if variant is None:
        raise ValueError(
            f"{path} holds plain SAM weights: pass --variant (tiny, vit_b, vit_l, vit_h)"
        )
    return PromptableSam(build_sam(variant, path)).to(device).eval(), variant


def parse_prompts(
    box: str | None, point: list[str] | None, prompts_file: str | None, images: list[str]
) -> dict[str, Prompt | list[Prompt]]:
    """A Prompt per image: the same --box/--point for all, or per image from a JSON file
    ({"name.png": {"box": [x0, y0, x1, y1], "points": [[x, y, label], ...]}}); a list of such
    objects prompts several objects (instances) of one image, one mask each."""
    if prompts_file:
        data = json.loads(Path(prompts_file).read_text())
        out: dict[str, Prompt | list[Prompt]] = {}
        for image in images:
            entry = data.get(image) or data.get(Path(image).name)
            if not entry:
                raise ValueError(
                    f"{prompts_file} has no prompt for {image} (keys are image paths or file names)"
                )
            if isinstance(entry, list):
                out[image] = [Prompt(e.get("box"), e.get("points")) for e in entry]
            else:
                out[image] = Prompt(entry.get("box"), entry.get("points"))
        return out
    if not box and not point:
        raise ValueError(
            "give a prompt: --box x0,y0,x1,y1, --point x,y[,label] or --prompts FILE.json"
        )
    b = [float(v) for v in box.split(",")] if box else None
    if b is not None and len(b) != 4:
        raise ValueError(f"--box needs 4 numbers x0,y0,x1,y1, got {box!r}")
    pts = None
    if point:
        pts = []
        for p in point:
            vals = [float(v) for v in p.split(",")]
            if len(vals) not in (2, 3):
                raise ValueError(f"--point needs x,y or x,y,label, got {p!r}")
            pts.append(vals if len(vals) == 3 else [*vals, 1.0])
    return {image: Prompt(b, pts) for image in images}


PALETTE = [(255, 60, 0), (0, 160, 255), (255, 200, 0), (200, 0, 255), (0, 220, 120)]


def list_images(folder: str | os.PathLike) -> list[str]:
    """The image files directly in a folder (local or s3://...), sorted by name: what
    `predict --data FOLDER` predicts. A folder without any is a ValueError naming it."""
    import pyarrow.fs as pafs

    from orchestrator.data.codec import IMAGE_EXTENSIONS
    from orchestrator.storage import filesystem, is_remote, join, resolve_location

    location = resolve_location(folder)
    fs, root = filesystem(location)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise ValueError(f"{location} is not a folder (give a folder of images or a dataset)")
    names = sorted(
        info.base_name
        for info in fs.get_file_info(pafs.FileSelector(root, recursive=False))
        if info.type == pafs.FileType.File
        and Path(info.base_name).suffix.lower() in IMAGE_EXTENSIONS
        and not info.base_name.startswith(".")
    )
    if not names:
        raise ValueError(
            f"{location} holds no image files ({', '.join(sorted(IMAGE_EXTENSIONS))}); "
            "an ingested dataset has a manifest.json"
        )
    return [join(location, n) if is_remote(location) else str(Path(location) / n) for n in names]


def predict_files(
    model: PromptableSam,
    images: list[str],
    prompts: dict[str, Prompt | list[Prompt]],
    out_dir: str | os.PathLike,
    *,
    batch_size: int = 8,
    device: str = "cpu",
) -> list[dict]:
    """Masks at original resolution: `<stem>_mask.png` (0/255) per image with one prompt,
    `<stem>_<k>_mask.png` per object when an image has a list of prompts, and one
    `<stem>_overlay.png` per image (each object in its own colour). One image at a time
    (encoded once, `batch_size` prompts per decoder pass), as the Ray path does."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for path in images:
        array = read_image_file(path)
        asked = prompts[path]
        listed = asked if isinstance(asked, list) else [asked]
        results = segment_image(model, array, listed, batch_size=batch_size, device=device)
        entries, files = image_outputs(path, array, results, isinstance(asked, list))
        for name, data in files.items():
            (out / name).write_bytes(data)
        written += [{**e, "mask": str(out / e["mask"])} for e in entries]
    return written


def image_outputs(
    path: str, array: np.ndarray, results: list[tuple[np.ndarray, float]], several: bool
) -> tuple[list[dict], dict[str, bytes]]:
    """One image's entries (image, object, mask file name, foreground, score) and files (mask
    PNGs, the overlay) by relative name: written by `predict_files` and by the Ray path's
    driver alike, so both give the same files."""
    from orchestrator.plots import overlay

    stem = Path(str(path)).stem
    entries, files, shown = [], {}, array
    for k, (mask, score) in enumerate(results):
        name = f"{stem}_{k}_mask.png" if several else f"{stem}_mask.png"
        files[name] = encode_png(mask.astype(np.uint8) * 255)
        shown = overlay(shown, mask, PALETTE[k % len(PALETTE)])
        entries.append(
            {
                "image": str(path),
                "object": k if several else None,
                "mask": name,
                "foreground_fraction": float(mask.mean()),
                "score": round(score, 6),
            }
        )
    files[f"{stem}_overlay.png"] = encode_png(shown)
    return entries, files


def read_image_file(path: str | os.PathLike) -> np.ndarray:
    """An image file to prompt (a local path or s3://...) -> (H, W, 3) uint8, decoded as ingest
    decodes (formats, pixel budget, TIFF and 16-bit images); a ValueError names the file and
    why."""
    from orchestrator.storage import filesystem, is_remote

    try:
        if is_remote(path):
            fs, where = filesystem(path)
            with fs.open_input_stream(where) as f:
                data = f.read()
        else:
            data = Path(path).read_bytes()
        return decode_image(data)[0]
    except Rejected as exc:
        raise ValueError(f"{path}: {exc}") from None


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)


def predict_dataset(
    model: PromptableSam,
    data_dir: str | os.PathLike,
    split: str,
    out_dir: str | os.PathLike,
    *,
    cfg: Any = None,
    batch_size: int = 8,
    device: str = "cpu",
) -> list[dict]:
    """Predict every sample of a dataset split with prompts drawn from its own mask (the run's
    evaluation prompts; per instance for COCO and label-image datasets).

    Writes per image `<image>_overlay.png` (every instance in its own colour) and
    `<image>_instances.png` (16-bit: k + 1 for the k-th sample of the image, 0 background), per
    sample `<image>/<instance>_mask.png`, and `predictions.json` (id, prompt, IoU, files, and
    the instance's category)."""
    from orchestrator.config import Config
    from orchestrator.data.manifest import iter_rows

    cfg = cfg or Config()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: list[dict] = []
    for row in iter_rows(data_dir, split):
        written += _predict_row(model, row, cfg, out, batch_size, device)
    atomic_write_json(out / "predictions.json", written, indent=2)
    return written


def row_generator(seed: int, image_id: str) -> torch.Generator:
    """The prompt RNG of one stored image: from the seed and the image alone, not the order
    images are visited in, so a sharded parallel prediction draws the same prompts."""
    digest = hashlib.sha256(f"{seed}:{image_id}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def segment_row(
    model: PromptableSam, row: dict, cfg: Any, batch_size: int = 8, device: str = "cpu"
) -> tuple[dict[str, np.ndarray], list[tuple[np.ndarray, float, str]]]:
    """One stored row decoded into its samples (one, or one per instance) and each predicted
    with an evaluation prompt drawn from its own mask: (decoded batch, [(mask at original
    resolution, SAM's predicted IoU, prompt text)] in sample order)."""
    from orchestrator.data.manifest import INSTANCE_COLUMNS
    from orchestrator.data.reader import decode_batch
    from orchestrator.train.evaluation import draw_prompts

    cols = {}
    for k in ("id", "image", "mask", "source", *INSTANCE_COLUMNS):
        if k in row:
            cols[k] = np.empty(1, dtype=object)
            cols[k][0] = row[k]
    square = getattr(model, "square_inputs", False)  # SAM 2.1
    batch = decode_batch(cols, model.image_size, cfg.data.channel_order, True, square=square)
    gen = row_generator(cfg.seed, str(row["id"]))
    results = []
    for start in range(0, len(batch["id"]), batch_size):
        part = slice(start, start + batch_size)
        prompts = draw_prompts(cfg, torch.from_numpy(batch["mask"][part]), gen, device, train=False)
        logits, scores = predict_scored(
            model,
            prompts,
            torch.from_numpy(batch["input_size"][part]).to(device),
            [m.shape for m in batch["mask_original"][part]],
            images=torch.from_numpy(batch["image"][part]).to(device),
        )
        for j, (lg, score) in enumerate(zip(logits, scores.tolist())):
            results.append(((lg > 0).cpu().numpy(), float(score), prompts.describe(j)))
    return batch, results


def _predict_row(
    model: PromptableSam, row: dict, cfg: Any, out: Path, batch_size: int, device: str
) -> list[dict]:
    """One stored image: each of its samples predicted, its files written."""
    with torch.inference_mode():
        batch, results = segment_row(model, row, cfg, batch_size, device)
    entries, files = row_outputs(row, batch, results)
    for name, data in files.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_bytes(data)
    return [{**e, "mask": str(out / e["mask"])} for e in entries]


def row_outputs(
    row: dict, batch: dict, results: list[tuple[np.ndarray, float, str]], files: bool = True
) -> tuple[list[dict], dict[str, bytes]]:
    """A stored image's entries (id, prompt, IoU against its mask, mask file, label, score,
    category) and, with `files`, its files by relative name: `<image>/<instance>_mask.png` per
    sample, `<image>_overlay.png` (each instance in its colour) and `<image>_instances.png`
    (16-bit: k + 1 for the k-th sample, 0 background). Written by `predict_dataset` and by the
    Ray path's driver alike."""
    from orchestrator.plots import overlay

    name = _safe(str(row["id"]))
    written: dict[str, bytes] = {}
    entries = []
    shown = labels = None
    if files:
        shown = np.asarray(open_encoded(row["image"], "stored image").convert("RGB"))
        labels = np.zeros(shown.shape[:2], np.uint16)
    for k, (pred, score, prompt) in enumerate(results):
        entry = _sample_entry(batch, k, pred, name, str(row["id"]), prompt)
        entry["score"] = round(score, 6)
        entries.append(entry)
        if files:
            written[entry["mask"]] = encode_png(pred.astype(np.uint8) * 255)
            labels[pred] = k + 1
            shown = overlay(shown, pred, PALETTE[k % len(PALETTE)])
    if files:
        written[f"{name}_overlay.png"] = encode_png(shown)
        written[f"{name}_instances.png"] = encode_png(labels)
    return entries, written


def _sample_entry(
    batch: dict, k: int, pred: np.ndarray, folder: str, image_id: str, prompt: str
) -> dict:
    """The k-th sample's predictions entry: IoU against its mask, its mask's file name."""
    gt = batch["mask_original"][k].astype(bool)
    union = (pred | gt).sum()
    sample = str(batch["id"][k])
    instance = sample.split("#", 1)[1] if "#" in sample else "mask"
    entry = {
        "id": sample,
        "image_id": image_id,
        "prompt": prompt,
        "iou": float((pred & gt).sum() / union) if union else 1.0,
        "mask": f"{folder}/{_safe(instance)}_mask.png",
        "label": k + 1,
    }
    if "category" in batch:
        entry["category"] = str(batch["category"][k])
    return entry


def export_checkpoint(checkpoint: str | os.PathLike, out: str | os.PathLike) -> tuple[str, str]:
    """(kind, explanation). Methods that fold into SAM's own tensors give a plain SAM state_dict;
    adapters give a self-contained file for `infosam.sam2.load_exported`."""
    from orchestrator.train.checkpoints import export_student, load_trained

    model, cfg, _ = load_trained(checkpoint)
    return export_student(model, cfg, out)


def export_onnx(checkpoint: str | os.PathLike, out: str | os.PathLike) -> str:
    """The student's prompt encoder + mask decoder as ONNX (`infosam.deploy`); returns how to
    use it."""
    from infosam.deploy import export_decoder_onnx
    from orchestrator.train.checkpoints import load_trained

    model, _, _ = load_trained(checkpoint)
    with local_target(out) as path:
        export_decoder_onnx(model.sam, path)
    return (
        f"{out}: run it with onnxruntime on an image embedding from PyTorch "
        "(`PromptableSam.encode`); inputs as `infosam.deploy.onnx_prompt_inputs` builds them, "
        "masks at the original size (logits: > 0 is the mask)"
    )
