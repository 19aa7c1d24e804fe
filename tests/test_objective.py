"""Ranking sweep trials by a declared gain-vs-retention objective, and the non-dominated front."""

import pytest

from orchestrator.objective import Objective, pareto_front


def test_weighted_sum_with_a_floor_ranks_every_feasible_trial_first():
    obj = Objective.from_spec(
        {
            "weights": {"val/iou": 1.0, "val/retention/general/iou": 0.5},
            "floors": {"val/retention/general/iou": 0.6},
        }
    )
    keeps = {"val/iou": 0.55, "val/retention/general/iou": 0.70}
    gains = {"val/iou": 0.80, "val/retention/general/iou": 0.40}  # higher sum, below the floor
    assert obj.value(keeps) == pytest.approx(0.55 + 0.35)
    assert obj.value(gains) < 0 < obj.value(keeps)
    closer = {"val/iou": 0.10, "val/retention/general/iou": 0.55}
    assert obj.value(gains) < obj.value(closer) < obj.value(keeps)  # nearer the floor: higher
    assert "subject to val/retention/general/iou >= 0.6" in obj.describe()
    mae = Objective.from_spec({"weights": {"val/mae": -1.0}, "floors": {"val/mae": 0.1}})
    assert mae.value({"val/mae": 0.05}) == pytest.approx(-0.05)
    assert mae.value({"val/mae": 0.2}) < mae.value({"val/mae": 0.05})


def test_objective_needs_a_weight_and_known_keys():
    with pytest.raises(ValueError, match="at least one metric"):
        Objective.from_spec({"floors": {"val/iou": 0.5}})
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['floor'\]"):
        Objective.from_spec({"weights": {"val/iou": 1}, "floor": {}})


def test_pareto_front_keeps_the_trials_nothing_beats_on_both():
    rows = [
        {"a": 0.9, "b": 0.2},  # best a
        {"a": 0.5, "b": 0.8},  # best b
        {"a": 0.6, "b": 0.6},  # a trade-off nobody beats on both
        {"a": 0.5, "b": 0.5},  # dominated by the one above
        {"a": 0.9, "b": 0.1},  # dominated by the first (equal a, worse b)
    ]
    assert pareto_front(rows, ["a", "b"]) == [True, True, True, False, False]
    assert pareto_front([{"mae": 0.1}, {"mae": 0.2}], ["mae"]) == [True, False]
