"""Import structure, read from the source (function-level imports included), as Ray's own
circular-import tests do: no cycles, and the method library stays framework-free."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _imports() -> dict[str, set[str]]:
    """module -> every module it imports anywhere in its file."""
    graph: dict[str, set[str]] = {}
    for package in ("infosam", "orchestrator"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
            found: set[str] = set()
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
                elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                    found.add(node.module)
                    found |= {f"{node.module}.{a.name}" for a in node.names}
            graph[name] = found
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    edges = {m: {d for d in deps if d in graph and d != m} for m, deps in graph.items()}
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in edges:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    assert _cycles(_imports()) == []


def test_the_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_infosam_imports_no_ray_mlflow_or_orchestrator():
    bad = {
        module: sorted(d for d in deps if d.split(".")[0] in ("ray", "mlflow", "orchestrator"))
        for module, deps in _imports().items()
        if module.startswith("infosam")
    }
    assert not {m: d for m, d in bad.items() if d}, bad


def test_the_cli_offers_every_registered_format():
    from orchestrator.cli import build_parser
    from orchestrator.data.formats import FORMATS

    ingest = build_parser().parse_args(["data", "ingest", "--format", "coco", "a", "b", "c"])
    assert ingest.format == "coco"
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices["data"]
    data_ingest = next(a for a in sub._actions if a.dest == "data_command").choices["ingest"]
    choices = next(a for a in data_ingest._actions if a.dest == "format").choices
    assert list(choices) == list(FORMATS)
