"""Helpers shared by test modules (fixtures live in conftest.py)."""

from __future__ import annotations


def train_config(tmp_path, data_root, *overrides: str):
    """The shipped smoke config pointed at test-local data, storage and MLflow store."""
    from pathlib import Path

    from orchestrator.config import load_config

    smoke = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "smoke.yaml"
    base = [
        f"data.root={data_root}",
        "data.synthesize=false",
        f"storage.path={tmp_path / 'runs'}",
        "tracking.experiment=test",
        "tracking.overlays=2",
        "optim.eval_batch_size=8",
    ]
    return load_config(smoke, [*base, *overrides])
