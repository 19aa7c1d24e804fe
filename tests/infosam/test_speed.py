"""Speed switches change nothing numerically (tiny SAM; CPU, and CUDA where there is one)."""

import copy

import pytest
import torch

from infosam.engine import LossConfig, compute_losses
from infosam.relation import RelationModule
from infosam.sam import PromptableSam, build_sam
from infosam.speed import checkpoint_blocks, use_attention
from infosam.tuning import apply_tuning
from tests.helpers import ROOT


def _student():
    torch.manual_seed(0)
    sam = build_sam("tiny")
    with torch.no_grad():  # non-zero rel-pos tables, so the bias path is exercised
        for n, p in sam.named_parameters():
            if "rel_pos" in n:
                p.normal_(0, 0.5)
    apply_tuning(sam, method="adapter")
    return sam


def _grads(sam, batch, prompts, teacher, device="cpu"):
    model = PromptableSam(sam).to(device).train()
    torch.manual_seed(1)  # the same relation-module init for both models
    relation = RelationModule(128).to(device)
    loss, _, out = compute_losses(
        model,
        batch["image"].to(device),
        batch["mask"].to(device),
        prompts.to(device),
        LossConfig(),
        teacher=teacher.to(device),
        relation=relation,
    )
    loss.backward()
    return out.low_res_logits.detach(), {
        n: p.grad.clone() for n, p in sam.named_parameters() if p.grad is not None
    }


def test_flex_attention_forward_matches_eager(batch, box_prompts):
    """FlexAttention has no CPU backward; its gradients are checked by the gpu case below."""
    eager = _student()
    flex = use_attention(copy.deepcopy(eager), "flex")
    assert type(flex.image_encoder.blocks[1].attn).__name__ == "FlexAttention"
    assert type(flex.image_encoder.blocks[0].attn).__name__ == "SDPAAttention"  # windowed
    with torch.no_grad():
        a = PromptableSam(eager)(batch["image"], boxes=box_prompts.boxes).low_res_logits
        b = PromptableSam(flex)(batch["image"], boxes=box_prompts.boxes).low_res_logits
    torch.testing.assert_close(b, a, atol=2e-4, rtol=1e-4)


GPU = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.mark.parametrize(
    ("kind", "device"),
    [
        ("sdpa", "cpu"),
        ("folded", "cpu"),
        pytest.param("sdpa", "cuda", marks=GPU),
        pytest.param("folded", "cuda", marks=GPU),  # v padded: flash/cuDNN kernels
        pytest.param("flex", "cuda", marks=GPU),  # FlexAttention has no CPU backward
    ],
)
def test_attention_kinds_match_eager_forward_and_backward(
    kind, device, batch, box_prompts, teacher
):
    eager = _student()
    fast = use_attention(copy.deepcopy(eager), kind)
    assert fast.state_dict().keys() == eager.state_dict().keys()
    logits_a, grads_a = _grads(eager, batch, box_prompts, teacher, device)
    logits_b, grads_b = _grads(fast, batch, box_prompts, teacher, device)
    torch.testing.assert_close(logits_b, logits_a, atol=2e-4, rtol=1e-4)
    assert grads_a.keys() == grads_b.keys()
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-4, rtol=1e-3, msg=n)


def test_folded_attention_with_padded_values_matches_eager(batch, box_prompts, teacher):
    """The CUDA layout (v zero-padded to the folded head dim for flash/cuDNN), run on CPU."""
    eager = _student()
    fast = use_attention(copy.deepcopy(eager), "folded")
    for block in fast.image_encoder.blocks:
        block.attn.pad_value = True
    logits_a, grads_a = _grads(eager, batch, box_prompts, teacher)
    logits_b, grads_b = _grads(fast, batch, box_prompts, teacher)
    torch.testing.assert_close(logits_b, logits_a, atol=2e-4, rtol=1e-4)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], atol=1e-4, rtol=1e-3, msg=n)


def test_checkpointing_gives_identical_gradients(batch, box_prompts, teacher):
    plain = _student()
    ckpt = checkpoint_blocks(copy.deepcopy(plain))
    assert "Checkpointed" in type(ckpt.image_encoder.blocks[3]).__name__
    # One class for all blocks of a kind (per-block classes made torch.compile recompile).
    kinds = {type(b) for b in plain.image_encoder.blocks}
    assert len({type(b) for b in ckpt.image_encoder.blocks}) == len(kinds)
    assert checkpoint_blocks(ckpt) is ckpt and "CheckpointedCheckpointed" not in str(
        type(ckpt.image_encoder.blocks[0])
    )
    logits_a, grads_a = _grads(plain, batch, box_prompts, teacher)
    logits_b, grads_b = _grads(ckpt, batch, box_prompts, teacher)
    torch.testing.assert_close(logits_b, logits_a)
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], msg=n)


def test_bf16_autocast_stays_close_to_fp32(batch, box_prompts, teacher):
    sam = _student()
    model = PromptableSam(sam)
    with torch.no_grad():
        ref = model(batch["image"], boxes=box_prompts.boxes).low_res_logits
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(batch["image"], boxes=box_prompts.boxes).low_res_logits.float()
    assert (torch.sigmoid(low) - torch.sigmoid(ref)).abs().mean() < 0.02


def test_bench_step_on_cpu_shows_the_switches_agree_with_the_reference():
    """The GPU benchmark script, run small: every switch's first-step loss (same weights, same
    batch) matches the reference-equivalent configuration's."""
    import importlib.util

    path = ROOT / "experiments" / "bench_step.py"
    spec = importlib.util.spec_from_file_location("bench_step", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(
        [
            "--variant=tiny",
            "--steps=1",
            "--warmup=1",
            "--no-flops",
            "--configs=sdpa,folded,bf16,bf16_folded_cache,bf16_folded_cache_ckpt,bf16_folded@2",
        ]
    )
    by_name = {r["config"]: r for r in rows}
    assert all("error" not in r for r in rows), rows
    assert by_name["reference"]["x_reference"] == 1.0
    for name in ("sdpa", "folded"):  # fp32: the same math in another order
        assert by_name[name]["first_loss_rel_diff"] < 1e-5, by_name[name]
    for name in ("bf16", "bf16_folded_cache", "bf16_folded_cache_ckpt"):
        assert by_name[name]["first_loss_rel_diff"] < 1e-2, by_name[name]
    assert by_name["bf16_folded@2"]["batch_size"] == 2
    assert "first_loss_rel_diff" not in by_name["bf16_folded@2"]  # other batch: no comparison


def test_bench_step_runs_sam2_and_its_switches_agree():
    """SAM 2.1 through the same step: bf16, the teacher cache (packed high-res features) and
    checkpointed Hiera blocks give the reference's first-step loss."""
    import importlib.util

    path = ROOT / "experiments" / "bench_step.py"
    spec = importlib.util.spec_from_file_location("bench_step_sam2", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rows = bench.main(["--family=sam2", "--steps=1", "--warmup=1", "--no-flops", "--batch-size=2"])
    by_name = {r["config"]: r for r in rows}
    assert all("error" not in r for r in rows), rows
    assert set(by_name) == {"reference", "bf16", "bf16_cache", "bf16_cache_ckpt"}
    assert all(r["family"] == "sam2" and r["variant"] == "tiny" for r in rows)
    for name in ("bf16", "bf16_cache", "bf16_cache_ckpt"):
        assert by_name[name]["first_loss_rel_diff"] < 1e-2, by_name[name]
