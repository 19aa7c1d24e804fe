"""Writing state that resume or a reader trusts, and keeping one writer per name.

Three rules every module follows through these helpers:
  * a file is replaced whole or not at all (`atomic_write`): a crash or a full disk leaves the
    previous version, never a truncated one;
  * a folder is replaced by renames (`swap_dir`): at every instant one complete copy exists;
  * one process at a time writes a given name (`exclusive`): the second is told who holds it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "LockedError",
    "atomic_file",
    "atomic_write",
    "atomic_write_json",
    "exclusive",
    "has_password",
    "is_remote",
    "password_refusal",
    "safe_component",
    "swap_dir",
]


class LockedError(RuntimeError):
    """Another process holds the lock; the message names it."""


def is_remote(location: str | os.PathLike) -> bool:
    """A URI such as s3://bucket/x (object storage), not a local path. The one place that
    tells the two apart: every module asks here."""
    return "://" in os.fspath(location)


def resolve_location(location: str | os.PathLike) -> str:
    """A URI as given (no trailing slash), a local path made absolute (workers change cwd)."""
    text = os.fspath(location)
    if is_remote(text):
        return text.rstrip("/")
    return str(Path(text).expanduser().resolve())


def join(location: str | os.PathLike, *names: str) -> str:
    """`location/name/...` for a URI or a local path alike."""
    text = os.fspath(location)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *names])
    return str(Path(text).joinpath(*names))


def filesystem(location: str | os.PathLike) -> tuple[Any, str]:
    """(pyarrow filesystem, path in it) for a local folder or a URI such as s3://bucket/data."""
    import pyarrow.fs as pafs

    text = os.fspath(location)
    if is_remote(text):
        return pafs.FileSystem.from_uri(text)
    return pafs.LocalFileSystem(), resolve_location(text)


def has_password(uri: str) -> bool:
    """A URI whose user-info holds a password (`scheme://user:pw@host`)."""
    from urllib.parse import urlsplit

    try:
        return urlsplit(uri).password is not None
    except ValueError:
        return False


def password_refusal(where: str) -> str:
    """Why a URI with a password is refused, and where credentials go instead."""
    return (
        f"{where} holds a password, which would be printed, logged as a run parameter and saved "
        "in checkpoints: drop it from the URI and give it as MLFLOW_TRACKING_USERNAME / "
        "MLFLOW_TRACKING_PASSWORD (an MLflow server) or PGPASSWORD / ~/.pgpass (PostgreSQL)"
    )


def safe_component(name: str, what: str = "name") -> str:
    """`name` as one path component: not empty, not `.`/`..`, no separator, no NUL. A dataset,
    run or benchmark name becomes a folder that may be replaced: it must not climb out."""
    if not isinstance(name, str) or name.strip() in ("", ".", ".."):
        raise ValueError(
            f"{what} {name!r} is not a usable folder name: give a plain name such as 'kvasir'"
        )
    if "/" in name or "\\" in name or "\x00" in name or name != name.strip():
        raise ValueError(
            f"{what} {name!r} must be one folder name (no '/', '\\', NUL or surrounding "
            "spaces): give a plain name such as 'kvasir'"
        )
    return name


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # some filesystems refuse fsync on a directory
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file object whose content replaces `path` only when the block ends without an
    error: a temporary file in the same folder, fsync, rename, fsync the folder (for writers
    such as `torch.save` that want a file, not bytes)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Write `data` to `path` so that readers see the old file or the new one, never a part.

    Local: `atomic_file`. Remote (s3://...): one PUT, which object stores apply whole."""
    raw = data.encode() if isinstance(data, str) else data
    if is_remote(path):
        import pyarrow.fs as pafs

        fs, where = pafs.FileSystem.from_uri(os.fspath(path))
        with fs.open_output_stream(where) as f:
            f.write(raw)
        return
    with atomic_file(path) as f:
        f.write(raw)


def atomic_write_json(path: str | os.PathLike, data: object, **dumps: object) -> None:
    """`atomic_write` of `json.dumps(data, **dumps)` and a final newline."""
    atomic_write(path, json.dumps(data, **dumps) + "\n")


def swap_dir(new: Path, final: Path) -> None:
    """Put the complete folder `new` at `final`: the old one is renamed aside, the new one
    renamed in, then the old one deleted, so one whole copy exists at every instant (a crash
    between the renames leaves `final.old-*`, complete, beside it)."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        if old is not None:
            os.replace(old, final)
        raise
    _fsync_dir(final.parent)
    if old is not None:
        import shutil

        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def exclusive(lock_path: str | os.PathLike, what: str, *, wait: bool = False) -> Iterator[None]:
    """Hold an exclusive `flock` on `lock_path` (created beside the state it guards) while the
    block runs. Without `wait` a second holder gets `LockedError` naming the first (its pid,
    host and command line, written into the lock file); with `wait` it queues."""
    lock_path = Path(lock_path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise LockedError(
                f"{what} is in use by {holder} (lock {lock_path}); wait for it to finish or "
                "stop it, then run again"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}: {' '.join(sys.argv)[:300]}\n")
        f.flush()
        try:
            yield
        finally:
            with contextlib.suppress(OSError):
                f.seek(0)
                f.truncate()
            fcntl.flock(f, fcntl.LOCK_UN)
