"""Main job. Until the benchmark matrix lands this runs one tiny end-to-end InfoSAM step on CPU."""

from __future__ import annotations

import time

import torch

from infosam.engine import LossConfig, eval_step, train_step
from infosam.prompts import sample_prompts
from infosam.relation import RelationModule
from infosam.sam import PromptableSam, build_sam
from infosam.tuning import apply_tuning


def main() -> None:
    torch.manual_seed(42)
    teacher = PromptableSam(build_sam("tiny")).requires_grad_(False)
    sam = build_sam("tiny")
    sam.load_state_dict(teacher.sam.state_dict())
    report = apply_tuning(sam, method="adapter")
    student, relation = PromptableSam(sam), RelationModule(128)
    params = [p for p in student.parameters() if p.requires_grad] + list(relation.parameters())
    opt = torch.optim.Adam(params, lr=2e-4)
    yy, xx = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    masks = torch.stack(
        [((yy - 128) ** 2 + (xx - 60 - 30 * i) ** 2 < 40**2) for i in range(4)]
    ).byte()
    images = (torch.rand(4, 3, 256, 256) * 80 + masks[:, None] * 120).byte()
    batch = {"image": images, "mask": masks, "input_size": torch.tensor([[256, 256]] * 4)}
    gen = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(3):
        prompts = sample_prompts(masks, "mixed", generator=gen)
        losses = train_step(
            student, opt, batch, prompts, LossConfig(), teacher=teacher, relation=relation
        )
        print(f"step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in losses.items()))
    metrics = eval_step(student, images, list(masks), prompts, batch["input_size"])
    miou = sum(m["iou"] for m in metrics) / len(metrics)
    print(
        f"adapter student: {report.trainable_params} trainable params; "
        f"mIoU {miou:.3f} (clean protocol) after 3 steps in {time.perf_counter() - start:.1f}s"
    )


if __name__ == "__main__":
    main()
