"""Import structure, read from the source (function-level imports included), as Ray's own
circular-import tests do: no cycles, and the method library stays framework-free."""

from __future__ import annotations

import ast

from tests.helpers import ROOT


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


# One direction of dependence: a module may import its own layer or a lower one, never a higher
# one. Shared modules first; `errors` names every stage's errors, so it sits beside the drivers
# that report through it, under the CLI.
LAYERS = [
    ("infosam",),
    (
        "orchestrator.storage",
        "orchestrator.config",
        "orchestrator.plots",
        "orchestrator.objective",
        "orchestrator.tracking",
        "orchestrator.cluster",
    ),
    ("orchestrator.data",),
    ("orchestrator.train",),
    (
        "orchestrator.benchmark",
        "orchestrator.sweep",
        "orchestrator.predict",
        "orchestrator.batch_predict",
        "orchestrator.errors",
    ),
    ("orchestrator.cli", "orchestrator"),
]


def _layer(module: str) -> int | None:
    best = None
    for rank, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            inside = module == prefix or module.startswith(prefix + ".")
            if inside and (best is None or len(prefix) > best[1]):
                best = (rank, len(prefix))
    return None if best is None else best[0]


def _upward(graph: dict[str, set[str]]) -> list[str]:
    return sorted(
        f"{m} -> {d}"
        for m, deps in graph.items()
        for d in deps
        if d in graph and _layer(d) is not None and _layer(m) is not None and _layer(d) > _layer(m)
    )


def test_dependencies_point_one_way():
    graph = _imports()
    assert all(_layer(m) is not None for m in graph), [m for m in graph if _layer(m) is None]
    assert _upward(graph) == []


def test_the_layer_check_finds_an_upward_import():
    graph = {
        "orchestrator.data.codec": {"orchestrator.train.worker"},
        "orchestrator.train.worker": set(),
    }
    assert _upward(graph) == ["orchestrator.data.codec -> orchestrator.train.worker"]


def _experiments_paths(source: str) -> list[str]:
    """String literals that build a path into experiments/ (docstrings and messages aside)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div):
            parts = [n.value for n in (node.left, node.right) if isinstance(n, ast.Constant)]
            found += [p for p in parts if isinstance(p, str) and p.split("/")[0] == "experiments"]
        elif isinstance(node, ast.Call) and getattr(node.func, "id", "") in ("Path", "open"):
            for arg in node.args:
                if isinstance(arg, ast.Constant) and str(arg.value).startswith("experiments/"):
                    found.append(arg.value)
    return found


def test_the_library_reads_nothing_under_experiments():
    readers = {
        str(p.relative_to(ROOT)): _experiments_paths(p.read_text())
        for package in ("infosam", "orchestrator")
        for p in (ROOT / package).rglob("*.py")
    }
    assert {k: v for k, v in readers.items() if v} == {}
    old = 'DEMO = Path(__file__).resolve().parents[1] / "experiments" / "configs" / "demo.yaml"'
    assert _experiments_paths(old) == ["experiments"]


def test_a_train_worker_starts_without_peft_or_scikit_learn():
    """Every Ray Train worker, controller and CLI process imports the worker module: peft
    (transformers) and pysodmetrics (scikit-learn) cost it 6 of its 15 s on 2 cores, so they
    load only where LoRA or saliency metrics are used."""
    import subprocess
    import sys

    code = (
        "import sys, orchestrator.train.worker; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & "
        "{'peft', 'transformers', 'sklearn', 'py_sod_metrics'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "[]", out.stdout
