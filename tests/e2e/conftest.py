"""tests/e2e/: the slow end-to-end scenarios (several nodes, spot drills, a real tracking server
behind PostgreSQL, `ray job submit`, sweeps driven by signals). Everything here is `-m slow`."""

import pytest


def pytest_collection_modifyitems(items):
    for item in items:
        if "/e2e/" in str(item.fspath):
            item.add_marker(pytest.mark.slow)
