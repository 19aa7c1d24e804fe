import pytest
import torch

from infosam.metrics import evaluate_prediction, iou_dice, saliency_metrics


def test_iou_dice_hand_computed():
    gt = torch.zeros(4, 4)
    gt[:2, :2] = 1  # 4 px
    logits = torch.full((4, 4), -5.0)
    logits[:2, :] = 5.0  # predicts 8 px, 4 overlap
    r = iou_dice(logits, gt, "clean")
    assert r["iou"] == pytest.approx(4 / 8)
    assert r["dice"] == pytest.approx(2 * 4 / (8 + 4))


def test_paper_protocol_thresholds_logits_not_probabilities():
    gt = torch.ones(2, 2)
    logits = torch.tensor([[0.2, 0.2], [0.6, 0.6]])
    # logits > {0.1,0.3,0.5,0.7,0.9}: 4, 2, 2, 0, 0 px predicted
    expected_iou = (1 + 0.5 + 0.5 + 0 + 0) / 5
    assert iou_dice(logits, gt, "paper")["iou"] == pytest.approx(expected_iou)
    assert iou_dice(logits, gt, "clean")["iou"] == pytest.approx(1.0)  # sigmoid > 0.5 everywhere


def test_empty_prediction_of_empty_mask_is_perfect():
    assert iou_dice(torch.full((3, 3), -4.0), torch.zeros(3, 3))["iou"] == 1.0


def test_saliency_metrics_perfect_and_wrong():
    gt = torch.zeros(32, 32)
    gt[8:24, 8:24] = 1
    perfect = saliency_metrics(gt * 20 - 10, gt, "clean")
    assert perfect["mae"] < 1e-3 and perfect["s_measure"] > 0.99 and perfect["weighted_f"] > 0.99
    assert perfect["e_measure"] > 0.99
    wrong = saliency_metrics((1 - gt) * 20 - 10, gt, "clean")
    assert wrong["mae"] > 0.99 and wrong["s_measure"] < 0.1


def test_results_say_which_protocol_produced_them():
    gt = torch.zeros(8, 8)
    gt[2:6, 2:6] = 1
    r = evaluate_prediction(gt * 4 - 2, gt, "paper", ("iou", "s_measure"))
    assert r["protocol"] == "paper" and set(r) == {"protocol", "iou", "s_measure"}
    with pytest.raises(ValueError, match="protocol"):
        evaluate_prediction(gt, gt, "other")
