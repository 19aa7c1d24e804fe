import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from infosam.losses import (
    InfoSAMLoss,
    feature_distillation_loss,
    gram_matrix,
    joint_renyi_entropy,
    logit_distillation_loss,
    relation_compression_loss,
    relation_distillation_loss,
    renyi_entropy,
    structure_loss,
)
from infosam.relation import RelationModule


def test_entropy_of_identity_and_of_all_ones():
    for b in (2, 4, 8):
        assert renyi_entropy(torch.eye(b)).item() == pytest.approx(math.log2(b))
        assert renyi_entropy(torch.ones(b, b)).item() == pytest.approx(0.0, abs=1e-6)


def test_joint_entropy_is_hadamard_then_trace_normalised():
    torch.manual_seed(0)
    a, b = gram_matrix(torch.randn(5, 7)), gram_matrix(torch.randn(5, 3))
    h = a * b
    h = h / torch.trace(h)
    assert joint_renyi_entropy(a, b).item() == pytest.approx(
        -math.log2((h**2).sum().item()), rel=1e-6
    )


def test_distillation_loss_of_identical_orthogonal_relations_is_minus_log2_b():
    for b in (2, 4, 6):
        rel = torch.eye(b, 10)  # orthogonal unit rows
        assert relation_distillation_loss(rel, rel.clone()).item() == pytest.approx(-math.log2(b))


def test_batch_of_one_is_refused_not_silently_zero():
    rel = F.normalize(torch.randn(1, 10), dim=1)
    with pytest.raises(ValueError, match="at least 2 samples"):
        relation_distillation_loss(rel, rel)
    with pytest.raises(ValueError, match="at least 2 samples"):
        relation_compression_loss(torch.randn(1, 16, 8), torch.randn(1, 1, 8), rel)


def test_distillation_gradients_reach_relation_and_student_features():
    torch.manual_seed(0)
    rm = RelationModule(8)
    emb_t, tok_t = torch.randn(4, 16, 8), torch.randn(4, 1, 8)
    emb_s = torch.randn(4, 16, 8, requires_grad=True)
    tok_s = torch.randn(4, 1, 8, requires_grad=True)
    relation_distillation_loss(rm(emb_t, tok_t), rm(emb_s, tok_s)).backward()
    assert emb_s.grad.abs().sum() > 0 and tok_s.grad.abs().sum() > 0
    assert rm.key_proj.weight.grad.abs().sum() > 0


def test_losses_are_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    rm = RelationModule(8)
    emb, tok = torch.randn(4, 16, 8), torch.randn(4, 1, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        rel = rm(emb, tok)
        out = InfoSAMLoss()(emb, tok, rel, rel)
    assert all(v.dtype == torch.float32 for v in out.values())
    ref = InfoSAMLoss()(emb, tok, rel.float(), rel.float())
    torch.testing.assert_close(out["infosam"], ref["infosam"])


def test_infosam_loss_weights_and_switching_terms_off():
    torch.manual_seed(0)
    emb, tok = torch.randn(4, 16, 8), torch.randn(4, 1, 8)
    rel_t, rel_s = F.normalize(torch.randn(4, 16), dim=1), F.normalize(torch.randn(4, 16), dim=1)
    full = InfoSAMLoss(1.0, 0.5)(emb, tok, rel_t, rel_s)
    assert full["infosam"].item() == pytest.approx(
        full["compression"].item() + 0.5 * full["distillation"].item()
    )
    only_d = InfoSAMLoss(0.0, 1.0)(emb, tok, rel_t, rel_s)
    assert only_d["compression"].item() == 0 and only_d["infosam"].item() == pytest.approx(
        full["distillation"].item()
    )


def test_relation_diagnostics_read_signal_against_the_log2_batch_bound():
    """Identical relations across images carry nothing (rank 1, 0 bits); orthogonal ones
    reach the ceiling log2(B): what a user reads off the logged epoch metrics."""
    emb, tok = torch.randn(4, 16, 8), torch.randn(4, 1, 8)
    same = F.normalize(torch.randn(1, 16), dim=1).expand(4, 16)
    flat = InfoSAMLoss()(emb, tok, same, same)
    assert flat["mi_bound_bits"].item() == pytest.approx(2.0)
    assert flat["mi_bits"].item() == pytest.approx(0.0, abs=1e-5)
    assert flat["relation_rank_t"].item() == pytest.approx(1.0, abs=1e-4)
    distinct = torch.eye(4, 16)
    full = InfoSAMLoss()(emb, tok, distinct, distinct)
    assert full["mi_bits"].item() == pytest.approx(2.0, abs=1e-5)
    assert full["relation_rank_s"].item() == pytest.approx(4.0, abs=1e-4)
    # the logged MI is the negated L_d the loss trains on
    rel_t, rel_s = torch.randn(4, 16), torch.randn(4, 16)
    out = InfoSAMLoss()(emb, tok, rel_t, rel_s)
    assert out["mi_bits"].item() == pytest.approx(-out["distillation"].item(), abs=1e-5)
    assert not out["mi_bits"].requires_grad


def test_structure_loss_legacy_bce_is_the_plain_mean():
    torch.manual_seed(0)
    target = torch.zeros(2, 1, 64, 64)
    target[:, :, 16:48, 16:48] = 1
    logits = torch.randn(2, 1, 64, 64) * 3
    legacy = structure_loss(logits, target, legacy_bce=True)
    corrected = structure_loss(logits, target, legacy_bce=False)
    weit = 1 + 5 * torch.abs(F.avg_pool2d(target, 31, 1, 15) - target)
    p = torch.sigmoid(logits)
    inter = (p * target * weit).sum((2, 3))
    union = ((p + target) * weit).sum((2, 3))
    wiou = (1 - (inter + 1) / (union - inter + 1)).mean()
    plain_bce = F.binary_cross_entropy_with_logits(logits, target)
    weighted_bce = (
        (weit * F.binary_cross_entropy_with_logits(logits, target, reduction="none")).sum((2, 3))
        / weit.sum((2, 3))
    ).mean()
    torch.testing.assert_close(legacy, plain_bce + wiou)
    torch.testing.assert_close(corrected, weighted_bce + wiou)
    assert abs(legacy.item() - corrected.item()) > 1e-3


def test_distillation_baselines():
    t = torch.randn(3, 1, 8, 8)
    assert feature_distillation_loss(t, t).item() == 0
    assert feature_distillation_loss(t + 1, t).item() == pytest.approx(1.0)
    # Logit KD is minimised where the student copies the teacher.
    s = t.clone().requires_grad_(True)
    logit_distillation_loss(s, t).backward()
    assert s.grad.abs().max() < 1e-6
    assert logit_distillation_loss(t + 2, t) > logit_distillation_loss(t, t)


def test_importing_the_losses_pulls_in_neither_ray_nor_mlflow():
    code = (
        "import sys, infosam.losses, infosam.engine, infosam.tuning;"
        "bad = [m for m in sys.modules if m.split('.')[0] in ('ray', 'mlflow')];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
