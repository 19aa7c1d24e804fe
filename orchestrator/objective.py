"""A sweep's declared objective over several metrics, and the trials no other trial beats on all.

A fine-tuning sweep trades the target domain against the pre-trained skill kept
(`data.retention`). `tune.objective` says how to rank trials on both:

    tune:
      objective:
        weights: {val/iou: 1.0, val/retention/general/iou: 0.5}   # maximise the weighted sum
        floors: {val/retention/general/iou: 0.6}                  # ... among trials keeping this

A trial below a floor ranks under every trial that meets all floors (by how far it falls
short), so the searcher and ASHA are steered to the feasible region first. Whatever the
weights, the non-dominated trials (the front) are reported too: no other trial is at least as
good on every component metric and better on one.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["OBJECTIVE_KEY", "Objective", "pareto_front"]

OBJECTIVE_KEY = "objective"
LOWER_IS_BETTER = frozenset({"mae"})


def lower_is_better(metric: str) -> bool:
    return metric.rsplit("/", 1)[-1] in LOWER_IS_BETTER


@dataclass(frozen=True)
class Objective:
    weights: dict[str, float] = field(default_factory=dict)
    floors: dict[str, float] = field(default_factory=dict)  # a ceiling for lower-is-better

    @classmethod
    def from_spec(cls, spec: Mapping[str, Any]) -> Objective:
        extra = set(spec) - {"weights", "floors"}
        if extra:
            raise ValueError(f"tune.objective: unknown key(s) {sorted(extra)}; use weights, floors")
        weights = {str(k): float(v) for k, v in (spec.get("weights") or {}).items()}
        floors = {str(k): float(v) for k, v in (spec.get("floors") or {}).items()}
        if not weights or not any(weights.values()):
            raise ValueError(
                "tune.objective.weights: give at least one metric with a non-zero weight, "
                "e.g. {val/iou: 1.0, val/retention/general/iou: 0.5}"
            )
        return cls(weights, floors)

    @property
    def metrics(self) -> list[str]:
        return list(dict.fromkeys([*self.weights, *self.floors]))

    def shortfall(self, values: Mapping[str, float]) -> float:
        """How far `values` fall below the floors (above the ceilings), summed; 0: feasible."""
        out = 0.0
        for k, bound in self.floors.items():
            v = float(values[k])
            out += max(0.0, v - bound) if lower_is_better(k) else max(0.0, bound - v)
        return out

    def value(self, values: Mapping[str, float]) -> float:
        """The weighted sum when every floor holds; below any feasible value otherwise.

        Metrics are fractions in [0, 1], so a feasible sum is at least the sum of the negative
        weights; an infeasible trial gets that minus 1 minus its shortfall."""
        total = sum(w * float(values[k]) for k, w in self.weights.items())
        short = self.shortfall(values)
        if short > 0:
            return sum(min(w, 0.0) for w in self.weights.values()) - 1.0 - short
        return total

    def describe(self) -> str:
        terms = " + ".join(f"{w:g} * {k}" for k, w in self.weights.items())
        floors = ", ".join(
            f"{k} {'<=' if lower_is_better(k) else '>='} {b:g}" for k, b in self.floors.items()
        )
        return terms + (f", subject to {floors}" if floors else "")


def pareto_front(rows: Iterable[Mapping[str, Any]], metrics: list[str]) -> list[bool]:
    """For each row: whether no other row is at least as good on every metric and strictly
    better on one (higher is better, except lower-is-better metrics such as mae)."""
    rows = list(rows)
    sign = [-1.0 if lower_is_better(m) else 1.0 for m in metrics]
    points = [[s * float(r[m]) for s, m in zip(sign, metrics)] for r in rows]
    out = []
    for i, p in enumerate(points):
        dominated = any(
            all(q_k >= p_k for q_k, p_k in zip(q, p)) and any(q_k > p_k for q_k, p_k in zip(q, p))
            for j, q in enumerate(points)
            if j != i
        )
        out.append(not dominated)
    return out
