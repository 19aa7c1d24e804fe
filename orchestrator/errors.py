"""The project's own errors, shown to a user as one line: what is wrong, where, and the fix."""

from __future__ import annotations

import sys
from collections.abc import Callable

__all__ = ["project_errors", "reported"]


def project_errors() -> tuple[type[BaseException], ...]:
    """The errors whose message is the whole story for a user (a key, a file, a fix); any
    other exception is a bug and keeps its traceback. Imported when needed: the CLI starts
    without MLflow or Ray."""
    from infosam.sam import CheckpointMismatchError
    from orchestrator.config import ConfigError
    from orchestrator.data.codec import IngestError
    from orchestrator.data.teacher_cache import TeacherCacheError
    from orchestrator.storage import LockedError
    from orchestrator.tracking.runs import TrackingError
    from orchestrator.tracking.server import TrackingServerError

    return (
        CheckpointMismatchError,
        ConfigError,
        IngestError,
        LockedError,
        TeacherCacheError,
        TrackingError,
        TrackingServerError,
        FileNotFoundError,
    )


def reported(run: Callable[[], int]) -> int:
    """`run()`'s exit code; a project error printed as `error: ...` on stderr and exit 2."""
    try:
        return run()
    except Exception as exc:
        if not isinstance(exc, project_errors()):
            raise
        print(f"error: {_text(exc)}", file=sys.stderr)
        return 2


def _text(exc: BaseException) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"not found: {exc.filename} ({exc.strerror or 'no such file or directory'})"
    return str(exc)
