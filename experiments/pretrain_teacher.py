"""Pre-train a `tiny` teacher on the synthetic `general` domain (the SA-1B stand-in).

    python experiments/pretrain_teacher.py --minutes 45 --out infosam/assets/tiny_teacher.pth
    python experiments/pretrain_teacher.py --family sam2 --minutes 45 \
        --out infosam/assets/tiny_sam2_teacher.pt

`--family sam` trains segment-anything's tiny SAM (a bare fp16 state_dict); `--family sam2` the
tiny SAM 2.1 (Hiera, image mode, square frame), written in Meta's `{"model": state_dict}` format.

Trains every SAM part from scratch with box and point prompts (per batch, 50/50) on an endless
stream of freshly generated `general` samples (no sample is seen twice), then measures zero-shot
IoU on the held-out test split of `general` and of each specialised domain and writes a model
card beside the checkpoint. Runs on CPU or GPU; no Ray needed. Saves every few minutes so an
interrupted run keeps its progress (`--resume`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from infosam.engine import LossConfig, eval_step, train_step
from infosam.prompts import sample_prompts
from infosam.sam import PromptableSam, build_sam
from infosam.sam2 import PromptableSam2, build_sam2_model
from infosam.transforms import prepare_pair
from orchestrator.data.synthetic import DOMAINS, generate_sample

SIZE = 256
SEGMENTATION_ONLY = LossConfig(infosam=False)  # pre-training: no teacher, no InfoSAM


def side_by_side(index: int, split: str, domain: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Two samples side by side, the mask of one (which one: the index's parity): an image whose
    salient objects are not all the answer, so only the prompt tells which is (a model that
    learns to segment the salient object and ignore its prompt scores ~half here)."""
    img_a, m_a = generate_sample(domain, seed, split, index)
    img_b, m_b = generate_sample(domain, seed, split, index + 5_000_000)
    h = img_a.shape[0]
    w = max(1, round(img_b.shape[1] * h / img_b.shape[0]))
    img_b = np.asarray(Image.fromarray(img_b).resize((w, h), Image.BILINEAR))
    m_b = np.asarray(Image.fromarray(m_b).resize((w, h), Image.NEAREST))
    if index % 2:
        m_a = np.zeros_like(m_a)
    else:
        m_b = np.zeros_like(m_b)
    return np.concatenate([img_a, img_b], axis=1), np.concatenate([m_a, m_b], axis=1)


def make_batch(
    indices: list[int],
    split: str,
    domain: str = "general",
    seed: int = 0,
    square: bool = False,
    pairs: float = 0.0,
):
    images, masks, sizes, originals = [], [], [], []
    for i in indices:
        pair = pairs > 0 and (i * 2654435761 % 1000) / 1000 < pairs  # a fixed choice per index
        img, m = (
            side_by_side(i, split, domain, seed)
            if pair
            else generate_sample(domain, seed, split, i)
        )
        pi, pm, insz = prepare_pair(img, m, SIZE, square=square)
        images.append(pi)
        masks.append(pm)
        sizes.append(insz)
        originals.append(torch.from_numpy(m))
    return (
        torch.from_numpy(np.stack(images)),
        torch.from_numpy(np.stack(masks)),
        torch.tensor(sizes),
        originals,
    )


@torch.no_grad()
def zero_shot(
    model: torch.nn.Module,
    domain: str,
    n: int,
    mode: str,
    device: torch.device,
    pairs: float = 0.0,
) -> float:
    """Mean IoU (clean protocol) on the first n test samples of a domain (seed 0 test split);
    `pairs=1`: each a pair of test images side by side, the mask of one (does it follow the
    prompt?)."""
    ious = []
    square = bool(getattr(model, "square_inputs", False))
    for start in range(0, n, 16):
        idx = list(range(start, min(start + 16, n)))
        images, masks, sizes, originals = make_batch(
            idx, "test", domain, square=square, pairs=pairs
        )
        prompts = sample_prompts(
            masks, mode, max_shift=0, generator=torch.Generator().manual_seed(start)
        )
        res = eval_step(model, images.to(device), originals, prompts.to(device), sizes.to(device))
        ious += [r["iou"] for r in res]
    return float(np.mean(ious))


WARMUP = 200


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--minutes", type=float, default=35.0, help="training wall-time budget")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="infosam/assets/tiny_teacher.pth")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--eval-samples", type=int, default=80)
    p.add_argument("--family", choices=("sam", "sam2"), default="sam")
    p.add_argument(
        "--pairs",
        type=float,
        default=0.0,
        help="fraction of training samples made of two images side by side, the mask of one",
    )
    p.add_argument("--init", help="start from these weights (this script's output file)")
    return p.parse_args()


def build(
    args: argparse.Namespace, device: torch.device
) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(the bare SAM / SAM2Base, its promptable wrapper), trainable, from `--init` if given."""
    torch.manual_seed(args.seed)
    if args.family == "sam2":
        sam = build_sam2_model("tiny").to(device)
        model = PromptableSam2(sam).to(device)
    else:
        sam = build_sam("tiny").to(device)
        model = PromptableSam(sam)
    if args.init:
        state = torch.load(args.init, map_location="cpu", weights_only=True)
        state = state["model"] if args.family == "sam2" else state
        sam.load_state_dict(
            {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
        )
    sam.requires_grad_(True)
    return sam, model.train()


def train(
    args: argparse.Namespace, sam: torch.nn.Module, model: torch.nn.Module, device: torch.device
) -> tuple[int, float]:
    """Train until the wall-time budget is spent; (steps, elapsed seconds)."""
    opt = torch.optim.AdamW(sam.parameters(), lr=args.lr, weight_decay=1e-4)
    work = Path(args.out).with_suffix(".train.pt")
    work.parent.mkdir(parents=True, exist_ok=True)
    step, elapsed, stream = 0, 0.0, 10_000_000  # training indices start far from test indices
    if args.resume and work.exists():
        state = torch.load(work, map_location=device, weights_only=True)
        sam.load_state_dict(state["model"])
        opt.load_state_dict(state["optimizer"])
        step, elapsed = int(state["step"]), float(state["elapsed"])
        print(f"resumed at step {step} ({elapsed / 60:.1f} min)")
    gen = torch.Generator().manual_seed(args.seed + step)

    def save_progress() -> None:
        """What `--resume` needs: weights, optimizer, step and elapsed wall time."""
        state = {"model": sam.state_dict(), "optimizer": opt.state_dict()}
        torch.save({**state, "step": step, "elapsed": elapsed}, work)

    budget = args.minutes * 60
    t_start, last_save = time.perf_counter() - elapsed, time.perf_counter()
    losses: list[float] = []
    while (elapsed := time.perf_counter() - t_start) < budget:
        frac = elapsed / budget  # cosine over wall time: the budget, not a step count, is fixed
        cosine = 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac))
        lr = args.lr * min(1.0, (step + 1) / WARMUP) * cosine
        for g in opt.param_groups:
            g["lr"] = lr
        idx = list(range(stream + step * args.batch_size, stream + (step + 1) * args.batch_size))
        images, masks, sizes, _ = make_batch(
            idx, "train", seed=args.seed, square=args.family == "sam2", pairs=args.pairs
        )
        images, masks, sizes = images.to(device), masks.to(device), sizes.to(device)
        prompts = sample_prompts(masks.cpu(), "mixed", max_shift=2, generator=gen).to(device)
        batch = {"image": images, "mask": masks, "input_size": sizes}
        # The same step fine-tuning runs: structure loss at model resolution, clipped grads.
        losses.append(
            train_step(model, opt, batch, prompts, SEGMENTATION_ONLY, grad_clip=1.0)["loss"]
        )
        step += 1
        if step % 50 == 0:
            rate = step * args.batch_size / max(elapsed, 1e-6)
            print(
                f"step {step} {elapsed / 60:.1f} min loss {np.mean(losses[-50:]):.4f} "
                f"lr {lr:.2e} {rate:.1f} img/s",
                flush=True,
            )
        if time.perf_counter() - last_save > 180:
            save_progress()
            last_save = time.perf_counter()
    save_progress()
    return step, elapsed


def evaluate(model: torch.nn.Module, n: int, device: torch.device) -> dict[str, dict[str, float]]:
    """Zero-shot mIoU per domain and prompt kind, and on side-by-side pairs of `general`."""
    model.eval()
    scores = {}
    for domain in DOMAINS:
        scores[domain] = {
            m: round(zero_shot(model, domain, n, m, device), 4) for m in ("box", "point")
        }
        print(f"zero-shot mIoU {domain}: {scores[domain]}", flush=True)
    scores["general_side_by_side"] = {
        m: round(zero_shot(model, "general", n, m, device, pairs=1.0), 4) for m in ("box", "point")
    }
    print(f"zero-shot mIoU general side by side: {scores['general_side_by_side']}", flush=True)
    return scores


def main() -> None:
    args = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    sam, model = build(args, device)
    step, elapsed = train(args, sam, model, device)
    scores = evaluate(model, args.eval_samples, device)
    out = Path(args.out)
    half = {k: v.half() if v.is_floating_point() else v for k, v in sam.state_dict().items()}
    torch.save({"model": half} if args.family == "sam2" else half, out)
    data = f"synthetic `general` domain, an endless stream of fresh samples (seed {args.seed})"
    if args.pairs:
        data += f"; {args.pairs:.0%} of them two images side by side, the mask of one"
    if args.init:
        data += f"; started from {os.path.basename(args.init)}"
    card = {
        "family": args.family,
        "variant": "tiny",
        "parameters": sum(p.numel() for p in sam.parameters()),
        "data": data,
        "steps": step,
        "batch_size": args.batch_size,
        "images_seen": step * args.batch_size,
        "wall_time_min": round(elapsed / 60, 1),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "optimizer": f"AdamW lr {args.lr} wd 1e-4, warm-up {WARMUP} steps, cosine over the "
        "time budget",
        "prompts": "per batch 50/50 box (jitter <= 2 px) or one positive point",
        "zero_shot_miou_clean_protocol": scores,
        "eval_samples_per_domain": args.eval_samples,
        "storage": "fp16 tensors (loaded into fp32 models)"
        + (", Meta's {'model': state_dict} format" if args.family == "sam2" else ""),
        "bytes": os.path.getsize(out),
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
