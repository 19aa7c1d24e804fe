"""What a node installs: this project with its dependencies, pinned by `constraints.txt`.

`pyproject.toml` says what the project needs (ranges); `constraints.txt` pins the versions the
test suite ran with, for every package that list pulls in. Nodes (`cluster.yaml`) and CI
install with `-c constraints.txt`, so a cluster runs what CI tested. `python -m
orchestrator.cluster.deps` rewrites the file from the current environment.
"""

from __future__ import annotations

import re
import sys
from importlib import metadata
from pathlib import Path

PROJECT = "infosam-at-scale"
EXTRAS = ("server",)  # the tracking host installs the project with its server extra
CONSTRAINTS = Path(__file__).resolve().parents[2] / "constraints.txt"


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def dependency_closure(project: str = PROJECT, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{distribution: installed version} of everything `project[extras]` pulls in here."""
    from packaging.requirements import Requirement

    seen: dict[str, str] = {}
    todo = [(project, set(extras))]
    while todo:
        name, wanted = todo.pop()
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({"extra": e}) for e in (wanted or {""})):
                continue
            key = _norm(req.name)
            try:
                version = metadata.version(req.name)
            except metadata.PackageNotFoundError:
                continue  # an optional dependency for another platform
            if key not in seen:
                seen[key] = version
                todo.append((req.name, set(req.extras)))
            elif req.extras:
                todo.append((req.name, set(req.extras)))
    return dict(sorted(seen.items()))


def read_constraints(path: Path = CONSTRAINTS) -> dict[str, str]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[_norm(name)] = version.strip()
    return pins


def constraint_problems(path: Path = CONSTRAINTS) -> list[str]:
    """Packages the project pulls in that the file does not pin, or pins to another version
    than the one installed (and tested) here."""
    pins = read_constraints(path)
    problems = []
    for name, version in dependency_closure().items():
        if name not in pins:
            problems.append(f"{path.name} does not pin {name} (installed {version})")
        elif pins[name] != version:
            problems.append(f"{path.name} pins {name}=={pins[name]}, installed {version}")
    return problems


def main() -> int:
    lines = [f"{name}=={version}" for name, version in dependency_closure().items()]
    header = (
        f"# Pins for everything {PROJECT}[{','.join(EXTRAS)}] pulls in, as CI tested them.\n"
        "# Nodes and CI install with `pip install -c constraints.txt ...`; regenerate with\n"
        "# `python -m orchestrator.cluster.deps` after changing pyproject.toml.\n"
    )
    CONSTRAINTS.write_text(header + "\n".join(lines) + "\n")
    print(f"{CONSTRAINTS}: {len(lines)} pins")
    return 0


if __name__ == "__main__":
    sys.exit(main())
