"""Time the full InfoSAM training step (teacher + adapter student + relation module + losses +
optimizer) under speed switches; one JSON line per configuration.

    python experiments/bench_step.py --variant vit_b --configs reference,fast@16   # on a GPU
    python experiments/bench_step.py --variant tiny --steps 2 --warmup 1           # CPU smoke
    python experiments/bench_step.py --family sam2 --variant tiny                  # SAM 2.1

The reference-equivalent configuration (fp32, eager attention, teacher encoder recomputed every
step, adapter student, batch --batch-size) always runs first in the same process, so every line
carries its speed ratio (`x_reference`) and how far its first-step loss is from the reference's
on the same weights and batch (`first_loss_rel_diff`: the switches' numerical equivalence).
`NAME@N` runs a configuration at batch N. `--encode` adds the teacher cache pre-pass's
encoder throughput (what `infosam data teacher-cache` runs per GPU). `--family sam2` times SAM
2.1 (Hiera) students and teachers; the attention switches are SAM's ViT kernels, so its
configurations are the others (bf16, cache, checkpointing, compile).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from infosam.engine import train_step
from infosam.prompts import sample_prompts
from infosam.speed import use_attention
from orchestrator.config import Config
from orchestrator.train.models import autocast_dtype, build_backbone, build_models, promptable
from orchestrator.train.worker import make_optimizer

# Each configuration is a set of config values, applied by the same code training runs
# (`orchestrator.train.models.build_models`, `orchestrator.train.worker.make_optimizer`).
BF16 = {"optim.precision": "bf16"}
SDPA, FOLDED, FLEX = ({"speed.attention": k} for k in ("sdpa", "folded", "flex"))
CACHE = {"speed.teacher_cache": True}
CKPT = {"speed.checkpointing": True}
COMPILE = {"speed.compile": True}
CONFIGS: dict[str, dict] = {
    "reference": {},
    "sdpa": SDPA,
    "folded": FOLDED,
    "bf16": BF16,
    "bf16_sdpa": {**BF16, **SDPA},
    "bf16_folded": {**BF16, **FOLDED},
    "bf16_flex": {**BF16, **FLEX},
    "bf16_sdpa_cache": {**BF16, **SDPA, **CACHE},
    "bf16_folded_cache": {**BF16, **FOLDED, **CACHE},
    "bf16_folded_cache_ckpt": {**BF16, **FOLDED, **CACHE, **CKPT},
    "bf16_sdpa_cache_compile": {**BF16, **SDPA, **CACHE, **COMPILE},
    "bf16_folded_cache_compile": {**BF16, **FOLDED, **CACHE, **COMPILE},
    "bf16_flex_cache_compile": {**BF16, **FLEX, **CACHE, **COMPILE},
    "bf16_folded_cache_ckpt_compile": {**BF16, **FOLDED, **CACHE, **CKPT, **COMPILE},
}
CONFIGS.update(  # without an attention kernel: what SAM 2.1 takes (its Hiera uses SDPA)
    {
        "bf16_cache": {**BF16, **CACHE},
        "bf16_cache_ckpt": {**BF16, **CACHE, **CKPT},
        "bf16_cache_compile": {**BF16, **CACHE, **COMPILE},
    }
)
CONFIGS["fast"] = CONFIGS["bf16_folded_cache_compile"]
CPU_DEFAULT = "bf16,bf16_sdpa,bf16_folded,bf16_folded_cache,bf16_folded_cache_ckpt"
SAM2_DEFAULT = "bf16,bf16_cache,bf16_cache_ckpt"
FAMILY = {"family": "sam"}  # set by main from --family


def config(variant: str, opts: dict) -> Config:
    """The training config of one configuration: adapter student + InfoSAM, random weights."""
    return Config().with_values(
        {
            "model.family": FAMILY["family"],
            "model.variant": variant,
            "model.checkpoint": None,  # speed does not depend on the weights' values
            "tuning.method": "adapter",
            "loss.infosam": True,
            "optim.lr": 2e-4,
            "optim.schedule": "constant",
            **opts,
        }
    )


def build(variant: str, opts: dict, device: torch.device):
    cfg = config(variant, opts)
    if cfg.speed.compile:
        torch._dynamo.reset()  # each configuration compiles for its own shapes, not dynamic ones
    torch.manual_seed(0)  # the same weights in every configuration
    teacher, student, relation, _ = build_models(cfg, device)
    params = [p for p in student.parameters() if p.requires_grad] + list(relation.parameters())
    opt, _ = make_optimizer(cfg, params, steps_total=1)
    return cfg, teacher, student, relation, opt


def make_batch(variant: str, bs: int, device: torch.device):
    size = config(variant, {}).model.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (bs, 3, size, size), generator=g, dtype=torch.uint8)
    masks = torch.zeros(bs, size, size, dtype=torch.uint8)
    for i in range(bs):
        o = (i * size // 64) % (size // 4)
        masks[i, size // 4 + o : size // 2 + o, size // 5 : size // 2] = 1
    prompts = sample_prompts(masks, "box", generator=g)
    return {"image": images.to(device), "mask": masks.to(device)}, prompts.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _step_fn(args, opts, device, bs):
    cfg, teacher, student, relation, opt = build(args.variant, opts, device)
    batch, prompts = make_batch(args.variant, bs, device)
    autocast = autocast_dtype(cfg)
    if cfg.speed.teacher_cache:  # as streamed from the cache: bf16, computed once
        with (
            torch.no_grad(),
            torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"),
        ):
            batch["teacher_embedding"] = teacher.encode(batch["image"]).to(torch.bfloat16)

    def step():
        return train_step(
            student,
            opt,
            batch,
            prompts,
            cfg.loss,
            teacher=teacher,
            relation=relation,
            autocast_dtype=autocast,
        )

    return step


def _flops_per_image(args, opts, device) -> float | None:
    """FLOPs of one step per image, counted on the uncompiled twin at batch 2 (compiled kernels
    are invisible to the counter; the work is the same)."""
    from torch.utils.flop_counter import FlopCounterMode

    twin = {k: v for k, v in opts.items() if k != "speed.compile"}
    try:
        step = _step_fn(args, twin, device, 2)
        with FlopCounterMode(display=False) as counter:
            step()
        return counter.get_total_flops() / 2
    except Exception:
        return None


def run(name: str, opts: dict, args, device: torch.device, bs: int) -> dict:
    step = _step_fn(args, opts, device, bs)
    first = step()["loss"]  # same weights and batch in every configuration
    for _ in range(args.warmup - 1):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        losses = step()
    _sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    del step
    fpi = _flops_per_image(args, opts, device) if args.flops else None
    return {
        "config": name,
        **opts,
        "family": FAMILY["family"],
        "variant": args.variant,
        "batch_size": bs,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "images_per_s": round(bs / dt, 2),
        "step_ms": round(dt * 1000, 1),
        "peak_gib": None if peak is None else round(peak, 2),
        "tflops_per_s": None if fpi is None else round(fpi * bs / dt / 1e12, 2),
        "first_loss": round(first, 6),
        "loss": round(losses["loss"], 5),
    }


def encode_pass(args, device: torch.device, bs: int, attention: str) -> dict:
    """Images/s of the frozen teacher's encoder alone (bf16 on GPU): the cache pre-pass."""
    torch.manual_seed(0)
    cfg = config(args.variant, {})
    sam = build_backbone(cfg, None)
    if cfg.model.family == "sam":
        use_attention(sam, attention)
    teacher = promptable(cfg, sam).to(device).eval().requires_grad_(False)
    batch, _ = make_batch(args.variant, bs, device)
    on_gpu = device.type == "cuda"
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
        for _ in range(args.warmup):
            teacher.encode(batch["image"])
        _sync(device)
        t0 = time.perf_counter()
        for _ in range(args.steps):
            teacher.encode(batch["image"])
        _sync(device)
    dt = (time.perf_counter() - t0) / args.steps
    return {
        "config": f"teacher_encode_{attention}",
        "variant": args.variant,
        "batch_size": bs,
        "device": torch.cuda.get_device_name() if on_gpu else "cpu",
        "images_per_s": round(bs / dt, 2),
    }


def parse_configs(text: str, default_bs: int) -> list[tuple[str, dict, int]]:
    out = [("reference", CONFIGS["reference"], default_bs)]
    for item in filter(None, text.split(",")):
        name, _, bs = item.partition("@")
        if name not in CONFIGS:
            raise SystemExit(f"unknown config {name!r}; known: {', '.join(CONFIGS)}")
        if item != "reference":
            out.append((item, CONFIGS[name], int(bs) if bs else default_bs))
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    on_gpu = torch.cuda.is_available()
    p.add_argument("--family", choices=["sam", "sam2"], default="sam")
    p.add_argument("--variant", help="default: vit_b / hiera_b+ on a GPU, tiny on the CPU")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument(
        "--configs",
        help=f"comma-separated NAME[@BATCH]; names: {', '.join(CONFIGS)} (default: per family "
        "and device)",
    )
    p.add_argument("--encode", type=int, default=0, help="also time the encoder at this batch")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    args = p.parse_args(argv)
    args.warmup = max(args.warmup, 1)
    FAMILY["family"] = args.family
    if args.variant is None:
        args.variant = ("hiera_b+" if args.family == "sam2" else "vit_b") if on_gpu else "tiny"
    if args.configs is None and args.family == "sam2":
        args.configs = SAM2_DEFAULT + (
            ",bf16_cache_compile,bf16_cache_compile@16" if on_gpu else ""
        )
    elif args.configs is None:
        args.configs = (
            "bf16_folded_cache_ckpt,bf16_folded_cache_compile,fast@16" if on_gpu else CPU_DEFAULT
        )
    device = torch.device("cuda" if on_gpu else "cpu")
    results = []
    ref: dict = {}
    for name, opts, bs in parse_configs(args.configs, args.batch_size):
        try:
            r = run(name, opts, args, device, bs)
        except Exception as exc:  # one failing switch must not hide the others' numbers
            r = {"config": name, "error": f"{type(exc).__name__}: {str(exc)[:400]}"}
        if name == "reference":
            ref = r
        if "images_per_s" in r and "images_per_s" in ref:
            r["x_reference"] = round(r["images_per_s"] / ref["images_per_s"], 2)
            if bs == ref["batch_size"]:
                r["first_loss_rel_diff"] = round(
                    abs(r["first_loss"] - ref["first_loss"]) / max(abs(ref["first_loss"]), 1e-12),
                    6,
                )
        print(json.dumps(r), flush=True)
        results.append(r)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if args.encode:
        for attention in ("sdpa", "folded"):
            try:
                r = encode_pass(args, device, args.encode, attention)
            except Exception as exc:
                r = {"config": f"teacher_encode_{attention}", "error": f"{exc}"[:400]}
            print(json.dumps(r), flush=True)
            results.append(r)
    return results


if __name__ == "__main__":
    main()
