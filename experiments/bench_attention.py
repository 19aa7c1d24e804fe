"""One global-attention block of SAM's image encoder (rel-pos bias on), forward + backward, per
attention implementation: time, peak memory, and error against segment-anything's own code.

    python experiments/bench_attention.py --variant vit_b --batch-size 16     # on a GPU

`folded_nopad` is `folded` with v kept at its head dim (memory-efficient kernel instead of
flash/cuDNN). Errors compare fp32 outputs and input gradients with the eager fp32 block.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from segment_anything.modeling.image_encoder import Attention

from infosam.sam import SAM_VARIANTS
from infosam.speed import FlexAttention, FoldedAttention, SDPAAttention

KINDS = {
    "eager": Attention,
    "sdpa": SDPAAttention,
    "folded": FoldedAttention,
    "folded_nopad": FoldedAttention,
    "flex": FlexAttention,
}


def make_block(kind: str, base: Attention) -> Attention:
    block = copy.deepcopy(base)
    block.__class__ = KINDS[kind]
    if kind == "folded_nopad":
        block.pad_value = False
    return block


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    on_gpu = torch.cuda.is_available()
    p.add_argument("--variant", default="vit_b" if on_gpu else "tiny")
    p.add_argument("--batch-size", type=int, default=16 if on_gpu else 2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kinds", default=",".join(KINDS))
    args = p.parse_args(argv)
    device = torch.device("cuda" if on_gpu else "cpu")
    spec = SAM_VARIANTS[args.variant]
    grid = spec.image_size // spec.patch_size
    torch.manual_seed(0)
    base = Attention(
        spec.encoder_embed_dim,
        num_heads=spec.encoder_num_heads,
        qkv_bias=True,
        use_rel_pos=True,
        input_size=(grid, grid),
    ).to(device)
    with torch.no_grad():
        base.rel_pos_h.normal_(0, 0.5)
        base.rel_pos_w.normal_(0, 0.5)
    x = torch.randn(args.batch_size, grid, grid, spec.encoder_embed_dim, device=device)
    small = x[:2].clone().requires_grad_(True)
    ref_out = base(small)
    (ref_grad,) = torch.autograd.grad(ref_out.square().mean(), small)
    for kind in args.kinds.split(","):
        row: dict = {"kind": kind, "variant": args.variant, "batch_size": args.batch_size}
        try:
            block = make_block(kind, base)
            xs = small.detach().clone().requires_grad_(True)
            out = block(xs)
            (grad,) = torch.autograd.grad(out.square().mean(), xs)
            row["max_err_out"] = float((out - ref_out).detach().abs().max())
            row["max_err_grad"] = float((grad - ref_grad).abs().max() / ref_grad.abs().max())
            xb = x.detach().clone().requires_grad_(True)

            def step(block=block, xb=xb):
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=on_gpu):
                    y = block(xb)
                y.float().square().mean().backward()

            step()
            if on_gpu:
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                step()
            if on_gpu:
                torch.cuda.synchronize()
            row["ms_fwd_bwd"] = round((time.perf_counter() - t0) / args.steps * 1000, 2)
            if on_gpu:
                row["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        except Exception as exc:
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps(row), flush=True)
        if on_gpu:
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
