"""The methods a benchmark compares, as overrides of the base config, their labels, and the
pairs it compares by default.

To add a method: one entry in `METHODS` (its overrides), one in `LABELS`, and, if it is an
ablation of another method, a pair in `DEFAULT_PAIRS`.
"""

from __future__ import annotations

from typing import Any

# Each method is a set of overrides of the base config; `zero_shot` evaluates the teacher.
METHODS: dict[str, dict[str, Any] | None] = {
    "zero_shot": None,
    "decoder": {"tuning.method": "decoder", "loss.infosam": False},
    "bitfit": {"tuning.method": "bitfit", "loss.infosam": False},
    "lora": {"tuning.method": "lora", "loss.infosam": False},
    "adapter": {"tuning.method": "adapter", "loss.infosam": False},
    "lora_infosam": {"tuning.method": "lora", "loss.infosam": True},
    "adapter_infosam": {"tuning.method": "adapter", "loss.infosam": True},
    "adapter_logit_kd": {
        "tuning.method": "adapter",
        "loss.infosam": False,
        "loss.distillation": "logit",
    },
    "adapter_feature_kd": {
        "tuning.method": "adapter",
        "loss.infosam": False,
        "loss.distillation": "feature",
    },
    "adapter_ld_only": {
        "tuning.method": "adapter",
        "loss.infosam": True,
        "loss.weight_compression": 0.0,
    },
}


LABELS = {
    "zero_shot": "SAM zero-shot (teacher)",
    "decoder": "decoder-only",
    "bitfit": "BitFit",
    "lora": "LoRA",
    "adapter": "Adapter",
    "lora_infosam": "LoRA + InfoSAM",
    "adapter_infosam": "Adapter + InfoSAM",
    "adapter_logit_kd": "Adapter + logit KD",
    "adapter_feature_kd": "Adapter + feature KD",
    "adapter_ld_only": "Adapter + L_d only",
}


# What each method is compared with: the paper's ablations, then everything vs the teacher.
DEFAULT_PAIRS: list[tuple[str, str]] = [
    ("lora_infosam", "lora"),
    ("adapter_infosam", "adapter"),
    ("adapter_ld_only", "adapter"),
    ("adapter_logit_kd", "adapter"),
    ("adapter_feature_kd", "adapter"),
    *[(m, "zero_shot") for m in METHODS if m != "zero_shot"],
]
