"""Time the full InfoSAM training step (teacher + adapter student + relation module + losses +
optimizer) under speed switches; one JSON line per configuration.

    python experiments/bench_step.py --variant vit_b --batch-size 4            # on a GPU
    python experiments/bench_step.py --variant tiny --steps 3 --warmup 1       # CPU smoke

The reference-equivalent configuration (fp32, eager attention, teacher encoder recomputed every
step, adapter student) always runs first in the same process, so every line carries its ratio.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infosam.engine import LossConfig, train_step
from infosam.prompts import sample_prompts
from infosam.relation import RelationModule
from infosam.sam import SAM_VARIANTS, PromptableSam, build_sam
from infosam.speed import checkpoint_blocks, compile_blocks, use_attention
from infosam.tuning import apply_tuning

CONFIGS = {
    "reference": {},
    "bf16": {"precision": "bf16"},
    "bf16_sdpa": {"precision": "bf16", "attention": "sdpa"},
    "bf16_flex": {"precision": "bf16", "attention": "flex"},
    "bf16_sdpa_cache": {"precision": "bf16", "attention": "sdpa", "teacher_cache": True},
    "bf16_sdpa_cache_ckpt": {
        "precision": "bf16",
        "attention": "sdpa",
        "teacher_cache": True,
        "checkpoint": True,
    },
    "bf16_sdpa_cache_bf16w": {
        "precision": "bf16",
        "attention": "sdpa",
        "teacher_cache": True,
        "teacher_bf16": True,
    },
    "bf16_sdpa_cache_compile": {
        "precision": "bf16",
        "attention": "sdpa",
        "teacher_cache": True,
        "compile": True,
    },
}


def build(variant: str, opts: dict, device: torch.device):
    torch.manual_seed(0)
    teacher = PromptableSam(build_sam(variant)).to(device).eval().requires_grad_(False)
    sam = build_sam(variant)
    sam.load_state_dict(teacher.sam.state_dict())
    apply_tuning(sam, method="adapter")
    kind = opts.get("attention", "eager")
    use_attention(sam, kind)
    use_attention(teacher.sam, kind)
    if opts.get("checkpoint"):
        checkpoint_blocks(sam)
    if opts.get("compile"):
        compile_blocks(sam)
        compile_blocks(teacher.sam)
    if opts.get("teacher_bf16"):
        teacher = teacher.to(torch.bfloat16)
    student = PromptableSam(sam).to(device)
    relation = RelationModule(SAM_VARIANTS[variant].prompt_embed_dim).to(device)
    params = [p for p in student.parameters() if p.requires_grad] + list(relation.parameters())
    opt = torch.optim.Adam(params, lr=2e-4, **({"fused": True} if device.type == "cuda" else {}))
    return teacher, student, relation, opt


def run(name: str, opts: dict, args, device: torch.device) -> dict:
    size = SAM_VARIANTS[args.variant].image_size
    bs = opts.get("batch_size", args.batch_size)
    teacher, student, relation, opt = build(args.variant, opts, device)
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (bs, 3, size, size), generator=g, dtype=torch.uint8).to(device)
    masks = torch.zeros(bs, size, size, dtype=torch.uint8)
    for i in range(bs):
        masks[i, size // 4 + 8 * i : size // 2 + 8 * i, size // 5 : size // 2] = 1
    masks = masks.to(device)
    batch = {"image": images, "mask": masks}
    autocast = torch.bfloat16 if opts.get("precision") == "bf16" else None
    if opts.get("teacher_cache"):
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast is not None),
        ):
            batch["teacher_embedding"] = teacher.encode(images).to(torch.bfloat16)
    prompts = sample_prompts(masks.cpu(), "box", generator=g).to(device)
    loss_cfg = LossConfig()

    def step():
        return train_step(
            student,
            opt,
            batch,
            prompts,
            loss_cfg,
            teacher=teacher,
            relation=relation,
            autocast_dtype=autocast,
        )

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses = step()
    sync()
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    flops = None
    if not opts.get("compile"):
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False) as counter:
            step()
        flops = counter.get_total_flops()
    return {
        "config": name,
        **{k: v for k, v in opts.items()},
        "variant": args.variant,
        "batch_size": bs,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "images_per_s": round(bs / dt, 2),
        "step_ms": round(dt * 1000, 1),
        "peak_gib": None if peak is None else round(peak, 2),
        "tflops_per_s": None if flops is None else round(flops / dt / 1e12, 2),
        "loss": round(losses["loss"], 5),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--variant", default="vit_b" if torch.cuda.is_available() else "tiny")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--configs", default=",".join(c for c in CONFIGS if c != "reference"))
    p.add_argument(
        "--extra-batch-size",
        type=int,
        default=0,
        help="also run the last config at this batch size",
    )
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = ["reference", *[c for c in args.configs.split(",") if c and c != "reference"]]
    results = []
    ref = None
    for name in names:
        try:
            r = run(name, CONFIGS[name], args, device)
        except Exception as exc:  # one failing switch must not hide the others' numbers
            r = {"config": name, "error": f"{type(exc).__name__}: {str(exc)[:300]}"}
        if name == "reference":
            ref = r.get("images_per_s")
        if ref and "images_per_s" in r:
            r["x_reference"] = round(r["images_per_s"] / ref, 2)
        print(json.dumps(r), flush=True)
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.extra_batch_size:
        opts = {**CONFIGS[names[-1]], "batch_size": args.extra_batch_size}
        r = run(f"{names[-1]}@bs{args.extra_batch_size}", opts, args, device)
        r["x_reference"] = round(r["images_per_s"] / ref, 2) if ref else None
        print(json.dumps(r), flush=True)
        results.append(r)
    return results


if __name__ == "__main__":
    main()
