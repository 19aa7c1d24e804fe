"""The MLflow tracking server a team shares: PostgreSQL behind it, basic auth in front of it.

On a cluster the runs' parameters, metrics and tags live in a PostgreSQL database that outlives
the cluster (a managed one such as RDS), so `ray down` deletes nothing; artifacts stay on S3.
The server runs MLflow's `basic-auth` app: every request carries HTTP Basic credentials
(`MLFLOW_TRACKING_USERNAME` / `MLFLOW_TRACKING_PASSWORD` on the client side), the admin password
comes from a secret and there is no default. Secrets are read from an environment variable or
from the file named by `<NAME>_FILE` (a mounted secret), never from the config or the repository.

`TrackingServer` runs `mlflow server` as a child process (tests, the load benchmark, a laptop
that wants the UI and many writers); `infosam tracking serve` is the same in the foreground,
for `cluster.yaml`. Schema migrations run once, before the server starts taking requests, so
clients never race to create tables. `LocalPostgres` is a throwaway PostgreSQL on loopback (the
test suite's and the load benchmark's; also a way to try the cluster setup on a laptop).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

__all__ = [
    "LocalPostgres",
    "TrackingServer",
    "TrackingServerError",
    "free_port",
    "migrate",
    "read_secret",
]


MIN_ADMIN_PASSWORD = 12  # MLflow's basic-auth app refuses shorter admin passwords


PG_BIN = Path(os.environ.get("INFOSAM_PG_BIN", "/usr/lib/postgresql/15/bin"))


class TrackingServerError(RuntimeError):
    """The tracking server (or its database) could not be started; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_secret(name: str, *, required: bool = True, min_length: int = 1) -> str | None:
    """`$NAME`, else the contents of the file at `$NAME_FILE` (a mounted secret)."""
    value = os.environ.get(name)
    source = f"${name}"
    if value is None and os.environ.get(f"{name}_FILE"):
        path = Path(os.environ[f"{name}_FILE"]).expanduser()
        source = f"{path} (${name}_FILE)"
        try:
            value = path.read_text().strip()
        except OSError as exc:
            raise TrackingServerError(f"cannot read secret {name} from {source}: {exc}") from exc
    if value is None:
        if required:
            raise TrackingServerError(
                f"secret {name} is not set: export {name}=... or point {name}_FILE at a file "
                "holding it (never commit it)"
            )
        return None
    if len(value) < min_length:
        raise TrackingServerError(
            f"secret {name} from {source} is {len(value)} characters; at least {min_length} needed"
        )
    return value


def redact(uri: str) -> str:
    """A database URI with its password replaced, for logs and error messages."""
    if "://" not in uri or "@" not in uri.split("://", 1)[1]:
        return uri
    scheme, rest = uri.split("://", 1)
    creds, host = rest.rsplit("@", 1)
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"


def migrate(backend_uri: str) -> None:
    """Create or upgrade the tracking schema, once, before any client connects.

    A fresh database gets every table; an older schema is upgraded (`mlflow db upgrade`); an
    up-to-date one is left alone. Parallel first opens by many clients would race instead.
    """
    from mlflow.store.db.utils import _get_latest_schema_revision, _get_schema_version
    from sqlalchemy import create_engine

    if backend_uri.startswith("sqlite:///"):
        Path(backend_uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
    engine = create_engine(backend_uri)
    try:
        current = _get_schema_version(engine)
    finally:
        engine.dispose()
    if current == _get_latest_schema_revision():
        return
    if current is None:  # empty database: the store creates and stamps every table
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        SqlAlchemyStore(backend_uri, tempfile.gettempdir()).engine.dispose()
        return
    # in this process, as `mlflow db upgrade` does: a child's argv would show the password
    from mlflow.store.db.utils import _upgrade_db

    engine = create_engine(backend_uri)
    try:
        _upgrade_db(engine)
    except Exception as exc:
        raise TrackingServerError(
            f"upgrading the schema of {redact(backend_uri)} failed: {type(exc).__name__}: "
            f"{redact(str(exc))[:2000]}"
        ) from None
    finally:
        engine.dispose()


class TrackingServer:
    """`mlflow server` as a child process: started, waited for, restarted, stopped by its PID.

    With `auth=True` the basic-auth app runs with its user table in `auth_db_uri` (default: the
    tracking database; MLflow keeps it in separate tables), the admin user from
    `admin_username` / the secret `MLFLOW_AUTH_ADMIN_PASSWORD`, and the Flask secret key from
    the secret `MLFLOW_FLASK_SERVER_SECRET_KEY`.
    """

    def __init__(
        self,
        backend_uri: str,
        artifacts_destination: str,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        workers: int | None = None,
        auth: bool = False,
        auth_db_uri: str | None = None,
        admin_username: str = "admin",
        default_permission: str = "READ",
        log_path: str | os.PathLike | None = None,
    ) -> None:
        self.backend_uri = backend_uri
        self.artifacts_destination = artifacts_destination
        self.host, self.port = host, port or free_port()
        # SQLite has one writer: several server workers only contend for its lock
        self.workers = workers or (1 if backend_uri.startswith("sqlite") else 4)
        self.auth, self.auth_db_uri = auth, auth_db_uri or backend_uri
        self.admin_username, self.default_permission = admin_username, default_permission
        self.log_path = Path(log_path) if log_path else None
        self.proc: subprocess.Popen | None = None
        self._auth_dir: tempfile.TemporaryDirectory | None = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.host in ("0.0.0.0", "") else self.host
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--artifacts-destination",
            self.artifacts_destination,
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            str(self.workers),
        ]
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
        return cmd

    def environment(self) -> dict[str, str]:
        """The server's environment: the database URI (it may hold a password, so it is not on
        the command line where `ps` shows it) and, with auth, the secrets and the auth ini."""
        env = dict(os.environ)
        env["MLFLOW_BACKEND_STORE_URI"] = self.backend_uri
        if not self.auth:
            return env
        env["MLFLOW_AUTH_ADMIN_PASSWORD"] = read_secret(
            "MLFLOW_AUTH_ADMIN_PASSWORD", min_length=MIN_ADMIN_PASSWORD
        )
        key = read_secret("MLFLOW_FLASK_SERVER_SECRET_KEY", required=False)
        env["MLFLOW_FLASK_SERVER_SECRET_KEY"] = key or secrets.token_hex(32)
        if self._auth_dir is None:
            self._auth_dir = tempfile.TemporaryDirectory(prefix="infosam-mlflow-auth-")
        ini = Path(self._auth_dir.name) / "basic_auth.ini"
        ini.write_text(
            "[mlflow]\n"
            f"default_permission = {self.default_permission}\n"
            f"database_uri = {self.auth_db_uri.replace('%', '%%')}\n"
            f"admin_username = {self.admin_username}\n"
            "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n"
            # Without a cache every request re-hashes the password (PBKDF2): measured ~0.5 s a
            # request on 2 cores. A changed password reaches every server worker within 60 s.
            "auth_cache_ttl_seconds = 60\n"
        )
        ini.chmod(0o600)
        env["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)
        env.pop("MLFLOW_AUTH_ADMIN_PASSWORD_FILE", None)
        return env

    def start(self, timeout_s: float = 90.0) -> TrackingServer:
        """Migrate the database, start the server, return once `/health` answers."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        env = self.environment()
        migrate(self.backend_uri)
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                self.command(),
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stop() reaches its workers
            )
        finally:
            if log is not subprocess.DEVNULL:
                log.close()
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                tail = self.log_path.read_text()[-3000:] if self.log_path else ""
                raise TrackingServerError(
                    f"mlflow server exited with {self.proc.returncode} before answering "
                    f"(backend {redact(self.backend_uri)}):\n{tail}"
                )
            if self.healthy():
                return self
            time.sleep(0.3)
        self.stop()
        raise TrackingServerError(f"mlflow server on {self.url} did not answer in {timeout_s}s")

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM to the server's own process group (its PID), SIGKILL if it lingers; returns
        once no process of the group is left (its job runners outlive the main process)."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        while _group_alive(proc.pid) and time.monotonic() < deadline:
            proc.poll()  # reaps the main process once it exits
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)

    def restart(self, down_s: float = 0.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()

    def close(self) -> None:
        self.stop()
        if self._auth_dir is not None:
            self._auth_dir.cleanup()
            self._auth_dir = None

    def __enter__(self) -> TrackingServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.close()


class LocalPostgres:
    """A throwaway PostgreSQL server on loopback, in a temporary data directory.

    PostgreSQL refuses to run as root; as root the server runs as an unprivileged user
    (`nobody` unless `user` says otherwise), and the data directory is chowned to it. Stopped
    with `pg_ctl stop` (which signals the postmaster by the PID in its own pid file).
    """

    def __init__(
        self,
        *,
        port: int | None = None,
        user: str | None = None,
        bin_dir: str | os.PathLike = PG_BIN,
        databases: tuple[str, ...] = ("mlflow",),
    ) -> None:
        self.port = port or free_port()
        self.bin_dir = Path(bin_dir)
        self.databases = databases
        self.superuser = "infosam"
        self.user = user or ("nobody" if os.geteuid() == 0 else None)
        self.root: Path | None = None

    @property
    def data_dir(self) -> Path:
        assert self.root is not None
        return self.root / "data"

    def uri(self, database: str = "mlflow") -> str:
        return f"postgresql://{self.superuser}@127.0.0.1:{self.port}/{database}"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        kwargs: dict[str, Any] = {"capture_output": True, "text": True}
        if self.user:
            kwargs.update(user=self.user, group=_group_of(self.user), extra_groups=[])
        done = subprocess.run([str(a) for a in args], cwd=self.root, **kwargs)
        if done.returncode != 0:
            raise TrackingServerError(
                f"{Path(args[0]).name} failed ({done.returncode}): {done.stderr.strip()[-1500:]}"
            )
        return done

    def start(self) -> LocalPostgres:
        if not (self.bin_dir / "initdb").exists():
            raise TrackingServerError(
                f"PostgreSQL binaries not found in {self.bin_dir}: install postgresql-15 "
                "(Debian: apt-get install postgresql) or set INFOSAM_PG_BIN"
            )
        self.root = Path(tempfile.mkdtemp(prefix="infosam-pg-"))
        if self.user:
            shutil.chown(self.root, self.user, _group_of(self.user))
        self._run(
            self.bin_dir / "initdb",
            "-D",
            self.data_dir,
            "-U",
            self.superuser,
            "-A",
            "trust",  # loopback only, throwaway data: no password
            "--no-sync",
        )
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.root} -c fsync=off "
            "-c max_connections=200 -c shared_buffers=64MB"
        )
        self._run(
            self.bin_dir / "pg_ctl",
            "-D",
            self.data_dir,
            "-l",
            self.root / "postgres.log",
            "-o",
            options,
            "-w",
            "start",
        )
        for db in self.databases:
            self._run(
                self.bin_dir / "createdb",
                "-h",
                "127.0.0.1",
                "-p",
                str(self.port),
                "-U",
                self.superuser,
                db,
            )
        return self

    def pid(self) -> int | None:
        pid_file = self.data_dir / "postmaster.pid"
        return int(pid_file.read_text().split()[0]) if pid_file.exists() else None

    def stop(self) -> None:
        if self.root is None:
            return
        if self.pid() is not None:
            with contextlib.suppress(TrackingServerError):
                self._run(self.bin_dir / "pg_ctl", "-D", self.data_dir, "-m", "fast", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)
        self.root = None

    def __enter__(self) -> LocalPostgres:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _group_of(user: str) -> int:
    import pwd

    return pwd.getpwnam(user).pw_gid


def _group_alive(pgid: int) -> bool:
    """A process of group `pgid` still runs (zombies waiting for their parent do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            return True
    return False


def is_loopback(host: str) -> bool:
    """127.0.0.0/8, ::1 or localhost: a server there is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(args: Any) -> int:
    """`infosam tracking serve`: migrate, then run the server in the foreground until signalled;
    its temporary auth ini is deleted when it stops."""
    if not args.auth and not is_loopback(args.host):
        raise TrackingServerError(
            f"--host {args.host} without --auth would let anyone who reaches that address read "
            "and write every run: add --auth (MLflow's basic-auth app), or bind 127.0.0.1"
        )
    backend = args.backend_store_uri or read_secret("INFOSAM_TRACKING_DB_URI", required=False)
    if not backend:
        raise TrackingServerError(
            "no tracking database: pass --backend-store-uri, or set INFOSAM_TRACKING_DB_URI "
            "(or INFOSAM_TRACKING_DB_URI_FILE, a file holding "
            "postgresql://user:password@host:5432/mlflow)"
        )
    server = TrackingServer(
        backend,
        args.artifacts_destination,
        host=args.host,
        port=args.port,
        workers=args.workers,
        auth=args.auth,
        auth_db_uri=args.auth_db_uri,
    )
    with server:  # migrates, starts, waits for /health; closing removes the auth ini
        print(
            f"[tracking] {redact(backend)} migrated; serving {server.url} "
            f"({'basic auth' if args.auth else 'NO authentication'}), artifacts in "
            f"{args.artifacts_destination}",
            flush=True,
        )
        return _wait(server)


def _wait(server: TrackingServer, grace_s: float = 20.0) -> int:
    """Until the server exits, or SIGTERM/SIGINT stop it: the handler only forwards the signal
    to the server's own process group; this loop waits, and kills what lingers past `grace_s`."""
    proc = server.proc
    if proc is None:
        return 0
    stopping: list[float] = []

    def forward(signum: int, frame: Any) -> None:
        stopping.append(time.monotonic())
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        while proc.poll() is None:
            if stopping and time.monotonic() - stopping[0] > grace_s:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
            time.sleep(0.2)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0 if stopping else proc.returncode
