"""Pre-train the `tiny` SAM teacher on the synthetic `general` domain (the SA-1B stand-in).

    python experiments/pretrain_teacher.py --minutes 35 --out infosam/assets/tiny_teacher.pth

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

from infosam.engine import LossConfig, eval_step, train_step
from infosam.prompts import sample_prompts
from infosam.sam import PromptableSam, build_sam
from infosam.transforms import prepare_pair
from orchestrator.data.synthetic import DOMAINS, generate_sample

SIZE = 256
SEGMENTATION_ONLY = LossConfig(infosam=False)  # pre-training: no teacher, no InfoSAM


def make_batch(indices: list[int], split: str, domain: str = "general", seed: int = 0):
    images, masks, sizes, originals = [], [], [], []
    for i in indices:
        img, m = generate_sample(domain, seed, split, i)
        pi, pm, insz = prepare_pair(img, m, SIZE)
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
def zero_shot(model: PromptableSam, domain: str, n: int, mode: str, device: torch.device) -> float:
    """Mean IoU (clean protocol) on the first n test samples of a domain (seed 0 test split)."""
    ious = []
    for start in range(0, n, 16):
        idx = list(range(start, min(start + 16, n)))
        images, masks, sizes, originals = make_batch(idx, "test", domain)
        prompts = sample_prompts(
            masks, mode, max_shift=0, generator=torch.Generator().manual_seed(start)
        )
        res = eval_step(model, images.to(device), originals, prompts.to(device), sizes.to(device))
        ious += [r["iou"] for r in res]
    return float(np.mean(ious))


def main() -> None:
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
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(args.seed)
    sam = build_sam("tiny").to(device)
    sam.requires_grad_(True)
    model = PromptableSam(sam).train()
    opt = torch.optim.AdamW(sam.parameters(), lr=args.lr, weight_decay=1e-4)
    out = Path(args.out)
    work = out.with_suffix(".train.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
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
        state = {
            "model": sam.state_dict(),
            "optimizer": opt.state_dict(),
            "step": step,
            "elapsed": elapsed,
        }
        torch.save(state, work)

    budget = args.minutes * 60
    warmup = 200
    t_start = time.perf_counter() - elapsed
    last_save = time.perf_counter()
    losses: list[float] = []
    while True:
        elapsed = time.perf_counter() - t_start
        if elapsed >= budget:
            break
        frac = elapsed / budget  # cosine over wall time: the budget, not a step count, is fixed
        lr = (
            args.lr
            * min(1.0, (step + 1) / warmup)
            * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * frac)))
        )
        for g in opt.param_groups:
            g["lr"] = lr
        idx = list(range(stream + step * args.batch_size, stream + (step + 1) * args.batch_size))
        images, masks, sizes, _ = make_batch(idx, "train", seed=args.seed)
        images, masks, sizes = images.to(device), masks.to(device), sizes.to(device)
        prompts = sample_prompts(masks.cpu(), "mixed", max_shift=2, generator=gen).to(device)
        batch = {"image": images, "mask": masks, "input_size": sizes}
        # The same step fine-tuning runs: structure loss at model resolution, clipped grads.
        loss = train_step(model, opt, batch, prompts, SEGMENTATION_ONLY, grad_clip=1.0)["loss"]
        losses.append(loss)
        step += 1
        if step % 50 == 0:
            rate = step * args.batch_size / max(elapsed, 1e-6)
            print(
                f"step {step} {elapsed / 60:.1f} min loss {np.mean(losses[-50:]):.4f} lr {lr:.2e} {rate:.1f} img/s",
                flush=True,
            )
        if time.perf_counter() - last_save > 180:
            save_progress()
            last_save = time.perf_counter()
    save_progress()
    model.eval()
    scores = {}
    for domain in DOMAINS:
        scores[domain] = {
            m: round(zero_shot(model, domain, args.eval_samples, m, device), 4)
            for m in ("box", "point")
        }
        print(f"zero-shot mIoU {domain}: {scores[domain]}", flush=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {k: v.half() if v.is_floating_point() else v for k, v in sam.state_dict().items()}, out
    )
    card = {
        "variant": "tiny",
        "data": f"synthetic `general` domain, an endless stream of fresh samples (seed {args.seed})",
        "steps": step,
        "batch_size": args.batch_size,
        "images_seen": step * args.batch_size,
        "wall_time_min": round(elapsed / 60, 1),
        "device": str(device) if device.type == "cpu" else torch.cuda.get_device_name(),
        "optimizer": f"AdamW lr {args.lr} wd 1e-4, warm-up {warmup} steps, cosine over the time budget",
        "prompts": "per batch 50/50 box (jitter <= 2 px) or one positive point",
        "zero_shot_miou_clean_protocol": scores,
        "eval_samples_per_domain": args.eval_samples,
        "storage": "fp16 tensors (loaded into fp32 models)",
        "bytes": os.path.getsize(out),
    }
    out.with_suffix(".json").write_text(json.dumps(card, indent=2) + "\n")
    print(json.dumps(card, indent=2))


if __name__ == "__main__":
    main()
