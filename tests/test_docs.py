"""The README is a front page and every relative link in it and in docs/ resolves."""

from __future__ import annotations

import re
from pathlib import Path

from tests.helpers import ROOT

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")
CODE = re.compile(r"```.*?```|`[^`\n]*`", re.S)  # code is not prose: no links in it


def _links(page: Path) -> list[str]:
    return LINK.findall(CODE.sub("", page.read_text()))


def _pages() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def test_every_relative_link_resolves():
    broken = []
    for page in _pages():
        for target in _links(page):
            if "://" in target or target.startswith("mailto:"):
                continue
            if not (page.parent / target).exists():
                broken.append(f"{page.relative_to(ROOT)} -> {target}")
    assert not broken, broken


def test_the_readme_is_a_front_page_linking_every_docs_page():
    assert len((ROOT / "README.md").read_bytes()) <= 15_000
    linked = set(_links(ROOT / "README.md"))
    pages = {f"docs/{p.name}" for p in (ROOT / "docs").glob("*.md")}
    assert pages <= linked, pages - linked


CODE_PATH = re.compile(r"`((?:orchestrator|infosam|experiments|tests)/[\w/.-]+\.(?:py|yaml|sh))`")
MODULE = re.compile(r"`((?:orchestrator|infosam)(?:\.\w+)+)")


def test_every_code_path_and_module_the_docs_name_exists():
    """Paths and dotted names in README and docs point at code that is there (they were all
    moved once; a page must not send a reader to a file that no longer exists)."""
    import importlib

    missing = []
    for page in _pages():
        text = page.read_text()
        missing += [f"{page.name}: {p}" for p in CODE_PATH.findall(text) if not (ROOT / p).exists()]
        for dotted in MODULE.findall(text):
            parts = dotted.split(".")
            if parts[0] == "infosam" and not (ROOT / "infosam" / f"{parts[1]}.py").exists():
                continue  # an MLflow tag such as `infosam.error`, not a module
            for cut in range(len(parts), 0, -1):  # the longest importable prefix, then attributes
                try:
                    obj = importlib.import_module(".".join(parts[:cut]))
                except ImportError:
                    continue
                for attr in parts[cut:]:
                    obj = getattr(obj, attr, None)
                if obj is None:
                    missing.append(f"{page.name}: {dotted}")
                break
            else:
                missing.append(f"{page.name}: {dotted}")
    assert not missing, missing
