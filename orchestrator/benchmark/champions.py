"""A benchmark's best model per dataset, registered in MLflow's model registry with an alias.

The champion of a dataset is the cell of the method with the best mean test score over seeds
(the results table's leader on the dataset's first metric) and, of that method's seeds, the
cell with the best test score. It is chosen after the comparison on the test split, so its test
score is an optimistic estimate: check it on data of your own before relying on it.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import mean
from typing import Any

from mlflow import MlflowClient

from orchestrator.benchmark.config import BenchmarkConfig, _metrics_for
from orchestrator.tracking.logged_model import register_model
from orchestrator.train.checkpoints import log_student_model

__all__ = ["ALIAS", "Champion", "pick_champions", "register_champions"]

ALIAS = "champion"


@dataclass
class Champion:
    dataset: str
    cell: str
    method: str
    seed: int
    metric: str
    score: float
    run_id: str
    registered_name: str
    model_uri: str = ""  # models:/<model_id>
    version: str = ""

    @property
    def alias_uri(self) -> str:
        return f"models:/{self.registered_name}@{ALIAS}"


def pick_champions(bench: BenchmarkConfig, cells: dict[str, dict[str, Any]]) -> list[Champion]:
    """Per dataset: the leading method's best seed, among FINISHED trained cells."""
    out = []
    for dataset in bench.datasets:
        metric = _metrics_for(bench, dataset)[0]
        key = f"test/{metric}"
        trained = {
            k: e
            for k, e in cells.items()
            if e.get("dataset") == dataset
            and e.get("status") == "FINISHED"
            and e.get("method") != "zero_shot"
            and key in (e.get("metrics") or {})
            and e.get("run_id")
        }
        if not trained:
            continue
        by_method: dict[str, list[str]] = {}
        for k, e in trained.items():
            by_method.setdefault(e["method"], []).append(k)
        leader = max(
            by_method, key=lambda m: mean(trained[k]["metrics"][key] for k in by_method[m])
        )
        cell = max(by_method[leader], key=lambda k: trained[k]["metrics"][key])
        e = trained[cell]
        out.append(
            Champion(
                dataset=dataset,
                cell=cell,
                method=leader,
                seed=int(e["seed"]),
                metric=metric,
                score=float(e["metrics"][key]),
                run_id=e["run_id"],
                registered_name=f"{bench.name}-{dataset}",
            )
        )
    return out


def register_champions(
    bench: BenchmarkConfig, cells: dict[str, dict[str, Any]], uri: str
) -> list[Champion]:
    """Log each champion cell's student as its run's MLflow model (once) and point the
    registered model's `champion` alias at it (a re-run with the same champion adds no
    version)."""
    client = MlflowClient(uri)
    champions = pick_champions(bench, cells)
    for champ in champions:
        checkpoint = client.get_run(champ.run_id).data.tags.get("infosam.checkpoint")
        if not checkpoint:
            continue  # a run that ended before its first checkpoint
        champ.model_uri = log_student_model(uri, champ.run_id, checkpoint)
        champ.version = str(register_model(uri, champ.model_uri, champ.registered_name).version)
        client.set_registered_model_tag(
            champ.registered_name,
            "infosam.selection",
            f"{champ.method} (best mean test {champ.metric} over seeds), seed {champ.seed}",
        )
    return [c for c in champions if c.model_uri]
