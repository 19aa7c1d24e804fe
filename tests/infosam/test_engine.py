import pytest
import torch

from infosam.engine import LossConfig, compute_losses, eval_step, predict_logits, train_step
from infosam.prompts import sample_prompts
from infosam.relation import RelationModule
from infosam.sam import PromptableSam, build_sam
from infosam.tuning import apply_tuning


def _student(method="adapter"):
    torch.manual_seed(1)
    sam = build_sam("tiny")
    apply_tuning(sam, method=method)
    return PromptableSam(sam)


def _infosam_losses(teacher, batch, prompts, compression: float, distillation: float):
    """(student, relation, losses) of one InfoSAM forward with these two weights."""
    student, relation = _student(), RelationModule(128)
    cfg = LossConfig(weight_compression=compression, weight_distillation=distillation)
    _, losses, _ = compute_losses(
        student, batch["image"], batch["mask"], prompts, cfg, teacher=teacher, relation=relation
    )
    return student, relation, losses


def test_compression_gradients_reach_only_the_relation_module(teacher, batch, box_prompts):
    student, relation, losses = _infosam_losses(teacher, batch, box_prompts, 1.0, 0.0)
    losses["compression"].backward()
    # The shared relation call may hand the student exact zeros, never a real gradient.
    assert all(p.grad is None or not p.grad.any() for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())
    assert relation.query_proj.weight.grad.abs().sum() > 0


def test_distillation_gradients_reach_the_student(teacher, batch, box_prompts):
    student, _, losses = _infosam_losses(teacher, batch, box_prompts, 0.0, 1.0)
    losses["distillation"].backward()
    grads = [p.grad for n, p in student.named_parameters() if "Adapter" in n]
    assert grads and all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_full_train_and_eval_step_on_tiny(teacher, batch):
    student, relation = _student(), RelationModule(128)
    params = [p for p in student.parameters() if p.requires_grad] + list(relation.parameters())
    opt = torch.optim.Adam(params, lr=2e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=2e-5)
    gen = torch.Generator().manual_seed(0)
    prompts = sample_prompts(batch["mask"], "mixed", max_shift=2, generator=gen)
    out = train_step(
        student,
        opt,
        batch,
        prompts,
        LossConfig(),
        teacher=teacher,
        relation=relation,
        scheduler=sched,
    )
    gt = [m for m in batch["mask"]]
    metrics = eval_step(student, batch["image"], gt, prompts, batch["input_size"], protocol="clean")
    assert set(out) >= {
        "loss",
        "segmentation",
        "compression",
        "distillation",
        "infosam",
        "empty_prompts",
    }
    assert out["loss"] == pytest.approx(out["segmentation"] + out["infosam"], rel=1e-5)
    assert len(metrics) == 4 and all(
        0 <= m["iou"] <= 1 and m["protocol"] == "clean" for m in metrics
    )
    assert sched.last_epoch == 1


@pytest.mark.parametrize("baseline", ["logit", "feature"])
def test_distillation_baselines_in_a_step(teacher, batch, box_prompts, baseline):
    student = _student()
    cfg = LossConfig(infosam=False, distillation=baseline)
    _, losses, _ = compute_losses(
        student, batch["image"], batch["mask"], box_prompts, cfg, teacher=teacher
    )
    assert losses["kd"].item() > 0
    assert losses["loss"].item() == pytest.approx(
        losses["segmentation"].item() + losses["kd"].item(), rel=1e-5
    )


def test_infosam_without_teacher_or_with_batch_one_fails_loudly(teacher, batch, box_prompts):
    student = _student()
    with pytest.raises(ValueError, match="teacher"):
        compute_losses(student, batch["image"], batch["mask"], box_prompts, LossConfig())
    one = sample_prompts(batch["mask"][:1], "box")
    with pytest.raises(ValueError, match="at least 2 samples"):
        compute_losses(
            student,
            batch["image"][:1],
            batch["mask"][:1],
            one,
            LossConfig(),
            teacher=teacher,
            relation=RelationModule(128),
        )


def test_eval_at_original_resolution(teacher, batch, box_prompts):
    """Logits come back at each image's original size even when it is not square."""
    gt = [torch.zeros(300, 200), torch.zeros(120, 256), torch.zeros(256, 256), torch.zeros(64, 64)]
    sizes = torch.tensor([[256, 171], [120, 256], [256, 256], [256, 256]])
    logits = predict_logits(teacher, batch["image"], box_prompts, sizes, [g.shape for g in gt])
    assert [tuple(x.shape) for x in logits] == [(300, 200), (120, 256), (256, 256), (64, 64)]
    # A ground truth equal to the prediction scores IoU 1 at that size, whatever the shape.
    same = [(x > 0).float() for x in logits]
    metrics = eval_step(teacher, batch["image"], same, box_prompts, sizes, protocol="clean")
    paper = eval_step(teacher, batch["image"], same, box_prompts, sizes, protocol="paper")
    assert [m["protocol"] for m in paper] == ["paper"] * 4
    nonempty = [i for i, m in enumerate(same) if m.sum() > 0]
    assert nonempty and all(metrics[i]["iou"] == pytest.approx(1.0) for i in nonempty)
