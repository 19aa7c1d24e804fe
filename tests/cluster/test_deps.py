"""constraints.txt pins everything the project pulls in, at the versions installed and tested."""

from orchestrator.cluster.deps import constraint_problems, dependency_closure, read_constraints
from tests.helpers import ROOT


def test_constraints_pin_every_dependency_at_the_tested_version():
    closure = dependency_closure()
    # the closure walks pyproject's list: the packages a node once lacked are in it
    assert {"tabulate", "pycocotools", "tifffile", "scipy", "psutil", "ray", "mlflow"} <= set(
        closure
    )
    assert constraint_problems() == []


def test_a_missing_or_stale_pin_is_named(tmp_path):
    pins = read_constraints(ROOT / "constraints.txt")
    pins.pop("tabulate")
    pins["scipy"] = "0.1"
    path = tmp_path / "constraints.txt"
    path.write_text("".join(f"{k}=={v}\n" for k, v in pins.items()))
    problems = constraint_problems(path)
    assert any("does not pin tabulate" in p for p in problems)
    assert any("pins scipy==0.1" in p for p in problems)
