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
    "ResultsDir",
    "atomic_file",
    "atomic_write",
    "atomic_write_json",
    "exclusive",
    "has_password",
    "is_remote",
    "local_copy",
    "local_target",
    "password_refusal",
    "safe_component",
    "staging_root",
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


def staging_root(kind: str, location: str) -> Path:
    """This machine's working folder for a remote `location` (`$INFOSAM_STAGING`, else the
    temp folder): one per (kind, location), so two locations never share one."""
    import hashlib
    import tempfile

    key = hashlib.sha256(location.encode()).hexdigest()[:16]
    root = Path(os.environ.get("INFOSAM_STAGING", tempfile.gettempdir())) / "infosam"
    return root / f"{kind}-{key}"


def local_copy(location: str | os.PathLike, what: str = "checkpoint") -> Path:
    """A local path for reading `location`: the path itself, or for a URI a fresh copy of the
    file or folder under the staging folder (`$INFOSAM_STAGING`, else the temp folder), so that
    torch and PIL read plain files. A missing object is a `FileNotFoundError` naming it."""
    if not is_remote(location):
        return Path(location).expanduser()
    import shutil

    import pyarrow.fs as pafs

    uri = resolve_location(location)
    fs, where = filesystem(uri)
    kind = fs.get_file_info(where).type
    if kind == pafs.FileType.NotFound:
        raise FileNotFoundError(f"{what} not found: {uri} (no such object or folder in the bucket)")
    target = staging_root("copy", uri) / uri.rsplit("/", 1)[-1]
    shutil.rmtree(target.parent, ignore_errors=True)  # the bucket is the truth: no stale copy
    target.parent.mkdir(parents=True)
    if kind == pafs.FileType.Directory:
        target.mkdir()
        pafs.copy_files(where, str(target), source_filesystem=fs)
    else:
        with fs.open_input_stream(where) as f:
            atomic_write(target, f.read())
    return target


@contextlib.contextmanager
def local_target(location: str | os.PathLike) -> Iterator[Path]:
    """A local file path to write `location` through: the path itself, or for a URI a
    temporary file that is uploaded (one PUT) when the block ends without an error."""
    if not is_remote(location):
        yield Path(location).expanduser()
        return
    import tempfile

    with tempfile.TemporaryDirectory(prefix="infosam-out-") as tmp:
        path = Path(tmp) / os.fspath(location).rsplit("/", 1)[-1]
        yield path
        atomic_write(location, path.read_bytes())


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


class ResultsDir:
    """A folder of results a driver writes and a later driver resumes from, on local disk or
    on object storage (`s3://bucket/prefix`, endpoint and credentials from the standard AWS
    variables, so S3-compatible stores work too).

    Local: the folder itself. Remote: a local working copy (`local`) that `pull` fills with
    the named entries from the bucket, and `push` sends each written file back under the same relative path, so the
    bucket always holds what the driver has recorded. Writers and readers use `local` only:
    pandas, matplotlib and torch keep writing plain files.
    """

    def __init__(self, location: str | os.PathLike) -> None:
        self.location = resolve_location(location)
        self.remote = is_remote(self.location)
        if self.remote:
            self.local = staging_root("results", self.location)
            self.lock_path = self.local.with_name(f"{self.local.name}.lock")  # `pull` replaces it
        else:
            self.local = Path(self.location)
            self.lock_path = self.local / ".lock"

    def pull(self, names: tuple[str, ...]) -> None:
        """Local: make the folder. Remote: replace the working copy with the entries `names`
        (files or folders) of the bucket's folder, and only those: a benchmark folder in a
        bucket also holds its cells' run folders, checkpoints included, never read here."""
        if not self.remote:
            self.local.mkdir(parents=True, exist_ok=True)
            return
        import shutil

        import pyarrow.fs as pafs

        shutil.rmtree(self.local, ignore_errors=True)
        self.local.mkdir(parents=True)
        fs, root = filesystem(self.location)
        for name in names:
            source = f"{root}/{name}"
            kind = fs.get_file_info(source).type
            target = self.local / name
            if kind == pafs.FileType.Directory:
                target.mkdir(parents=True, exist_ok=True)
                pafs.copy_files(source, str(target), source_filesystem=fs)
            elif kind == pafs.FileType.File:
                with fs.open_input_stream(source) as f:
                    atomic_write(target, f.read())

    def pull_files(self, names: list[str]) -> None:
        """Remote: fetch these top-level files of the bucket's folder (those that exist) into
        the working copy, and nothing else (a run folder also holds large checkpoints)."""
        self.local.mkdir(parents=True, exist_ok=True)
        if not self.remote:
            return
        fs, root = filesystem(self.location)
        for name in names:
            try:
                with fs.open_input_stream(f"{root}/{name}") as f:
                    atomic_write(self.local / name, f.read())
            except FileNotFoundError:
                (self.local / name).unlink(missing_ok=True)  # the bucket is the truth

    def pull_latest(self, pattern: str, marker: str) -> Path | None:
        """Remote only: fetch the newest sub-folder matching `pattern` that holds `marker` (a
        complete checkpoint); returns its working-copy path."""
        import fnmatch
        import shutil

        import pyarrow.fs as pafs

        fs, root = filesystem(self.location)
        if fs.get_file_info(root).type != pafs.FileType.Directory:
            return None
        infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
        names = sorted(i.base_name for i in infos if fnmatch.fnmatch(i.base_name, pattern))
        for name in reversed(names):
            if fs.get_file_info(f"{root}/{name}/{marker}").type == pafs.FileType.File:
                target = self.local / name
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                pafs.copy_files(f"{root}/{name}", str(target), source_filesystem=fs)
                return target
        return None

    def push_tree(self, folder: str | os.PathLike, keep: str | None = None, last: int = 2) -> str:
        """Send a whole working-copy folder to the bucket (a checkpoint); with `keep`, only the
        `last` folders matching that pattern stay in the bucket. Returns its location."""
        target = self.where(folder)
        if not self.remote:
            return target
        import fnmatch

        import pyarrow.fs as pafs

        fs, root = filesystem(self.location)
        _, where = filesystem(target)
        pafs.copy_files(str(folder), where, destination_filesystem=fs)
        if keep:
            infos = fs.get_file_info(pafs.FileSelector(root, recursive=False))
            names = sorted(i.base_name for i in infos if fnmatch.fnmatch(i.base_name, keep))
            for old in names[:-last]:
                fs.delete_dir(f"{root}/{old}")
        return target

    def push(self, path: str | os.PathLike) -> str:
        """Send one file of the working copy to the bucket (nothing to do locally); returns
        where it now lives."""
        rel = Path(path).resolve().relative_to(self.local.resolve())
        if not self.remote:
            return str(self.local / rel)
        target = join(self.location, *rel.parts)
        atomic_write(target, Path(path).read_bytes())
        return target

    def where(self, path: str | os.PathLike) -> str:
        """The lasting location of a working-copy file (the bucket's URI when remote)."""
        rel = Path(path).resolve().relative_to(self.local.resolve())
        return join(self.location, *rel.parts)
