"""Slow end to end (-m slow): from test_teacher_cache.py."""

from pathlib import Path

import pytest

from infosam.sam import resolve_checkpoint
from orchestrator.config import BUILTIN_TEACHER
from orchestrator.data.teacher_cache import (
    build_teacher_cache,
    open_teacher_cache,
)
from tests.helpers import cache_key

pytestmark = pytest.mark.timeout(420)

TEACHER = resolve_checkpoint(BUILTIN_TEACHER)


@pytest.mark.slow
def test_a_rebuild_keeps_the_generation_a_running_reader_streams(ray_local, dataset):
    """A rebuild never deletes the files a run opened a moment ago: the superseded generation
    stays until the next rebuild, and only the one before it goes."""
    root = dataset / "camouflage"
    gens = []
    for _ in range(3):
        build_teacher_cache(root, ["val"], cache_key(), checkpoint=TEACHER, quiet=True)
        opened = open_teacher_cache(root, "val", cache_key())
        gens.append({Path(f).parent.name for f in opened["files"]})
        folders = {p.name for p in root.glob("teacher_cache/*/val-*")}
        assert gens[-1] <= folders
        if len(gens) > 1:
            assert gens[-2] <= folders, "the generation a reader may stream was deleted"
        if len(gens) > 2:
            assert not gens[0] & folders, "generations before the previous one are removed"
