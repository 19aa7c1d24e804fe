"""Per-image segmentation metrics, each tagged with the protocol that produced it.

Protocols:
- `paper`: the InfoSAM reference. IoU/Dice are averaged over thresholds {0.1, 0.3, 0.5, 0.7, 0.9}
  applied to raw LOGITS; saliency metrics are computed on clip(logits, 0, 1).
- `clean`: sigmoid probabilities; IoU/Dice at probability 0.5; saliency metrics on sigmoid maps.
Saliency metrics (S-measure alpha 0.5, adaptive E-measure, weighted F with beta^2 = 0.3, MAE) come
from `pysodmetrics`, fed uint8 0..255 maps as the reference does.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = [
    "METRICS",
    "PAPER_THRESHOLDS",
    "PROTOCOLS",
    "evaluate_prediction",
    "iou_dice",
    "saliency_metrics",
]

PROTOCOLS = ("paper", "clean")
PAPER_THRESHOLDS = (0.1, 0.3, 0.5, 0.7, 0.9)
METRICS = ("iou", "dice", "s_measure", "e_measure", "weighted_f", "mae")


def _check_protocol(protocol: str) -> None:
    if protocol not in PROTOCOLS:
        raise ValueError(f"unknown protocol {protocol!r}; choose one of {PROTOCOLS}")


def _iou_dice_binary(pred: torch.Tensor, gt: torch.Tensor) -> tuple[float, float]:
    inter = (pred & gt).sum().item()
    p, g = pred.sum().item(), gt.sum().item()
    union = p + g - inter
    if union == 0:  # empty prediction of an empty mask is perfect
        return 1.0, 1.0
    return inter / union, 2 * inter / (p + g)


def iou_dice(logits: torch.Tensor, gt: torch.Tensor, protocol: str = "clean") -> dict[str, float]:
    """IoU (Jaccard) and Dice of one (H, W) logit map against a (H, W) 0/1 mask."""
    _check_protocol(protocol)
    gt = gt > 0
    thresholds = PAPER_THRESHOLDS if protocol == "paper" else (0.0,)  # sigmoid > 0.5 <=> logit > 0
    pairs = [_iou_dice_binary(logits > t, gt) for t in thresholds]
    return {
        "iou": float(np.mean([p[0] for p in pairs])),
        "dice": float(np.mean([p[1] for p in pairs])),
    }


def _saliency_map(logits: torch.Tensor, protocol: str) -> np.ndarray:
    prob = logits.float().clamp(0, 1) if protocol == "paper" else torch.sigmoid(logits.float())
    return (prob * 255).round().to(torch.uint8).cpu().numpy()


def saliency_metrics(
    logits: torch.Tensor, gt: torch.Tensor, protocol: str = "clean"
) -> dict[str, float]:
    """S-measure, adaptive E-measure, weighted F (beta^2 = 0.3) and MAE of one (H, W) map."""
    _check_protocol(protocol)
    pred = _saliency_map(logits, protocol)
    gt_u8 = ((gt > 0).to(torch.uint8) * 255).cpu().numpy()
    import py_sod_metrics as sod  # here: it pulls in scikit-learn, 3 s of every worker's start

    sm, em, wfm, mae = sod.Smeasure(), sod.Emeasure(), sod.WeightedFmeasure(beta=0.3), sod.MAE()
    for metric in (sm, em, wfm, mae):
        metric.step(pred, gt_u8)
    return {
        "s_measure": float(sm.sms[-1]),
        "e_measure": float(em.adaptive_ems[-1]),
        "weighted_f": float(wfm.weighted_fms[-1]),
        "mae": float(mae.maes[-1]),
    }


def evaluate_prediction(
    logits: torch.Tensor,
    gt: torch.Tensor,
    protocol: str = "clean",
    metrics: tuple[str, ...] = ("iou", "dice"),
) -> dict[str, float | str]:
    """The requested metrics for one image at original resolution, plus `protocol`."""
    unknown = set(metrics) - set(METRICS)
    if unknown:
        raise ValueError(f"unknown metrics {sorted(unknown)}; choose from {METRICS}")
    logits = logits.squeeze()
    gt = gt.squeeze()
    out: dict[str, float | str] = {"protocol": protocol}
    if {"iou", "dice"} & set(metrics):
        out.update({k: v for k, v in iou_dice(logits, gt, protocol).items() if k in metrics})
    if set(metrics) - {"iou", "dice"}:
        out.update(
            {k: v for k, v in saliency_metrics(logits, gt, protocol).items() if k in metrics}
        )
    return out
