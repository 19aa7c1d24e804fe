"""`mlflow models serve` of a registered student, started and stopped by its own PID, and the
JSON a client posts to it (one row per object: base64 image bytes plus a box and/or points)."""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["ModelServer", "free_port", "invocation_body"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def invocation_body(
    images: Sequence[bytes],
    boxes: Sequence[Sequence[float] | None] | None = None,
    points: Sequence[Sequence[Sequence[float]] | None] | None = None,
) -> dict[str, Any]:
    """The `POST /invocations` payload (MLflow's `dataframe_split`): one row per object."""
    columns = ["image"] + (["box"] if boxes is not None else []) + (["points"] if points else [])
    rows = []
    for i, data in enumerate(images):
        row: list[Any] = [base64.b64encode(data).decode("ascii")]
        if boxes is not None:
            row.append(None if boxes[i] is None else [float(v) for v in boxes[i]])
        if points:
            row.append(points[i])
        rows.append(row)
    return {"dataframe_split": {"columns": columns, "data": rows}}


def _group_alive(group: int) -> bool:
    try:
        os.killpg(group, 0)
    except ProcessLookupError:
        return False
    return True


class ModelServer:
    """`mlflow models serve -m MODEL_URI --env-manager local` on 127.0.0.1 (a context manager).

    It runs in a session of its own, so stopping it stops its workers too; the log goes to a
    file (named in any error)."""

    def __init__(
        self,
        model_uri: str,
        tracking_uri: str,
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        workers: int = 1,
        log: str | os.PathLike | None = None,
        start_timeout_s: float = 180.0,
    ) -> None:
        self.model_uri, self.tracking_uri = model_uri, tracking_uri
        self.host, self.port = host, port or free_port()
        self.workers, self.start_timeout_s = workers, start_timeout_s
        self.log = Path(log or f"mlflow-serve-{self.port}.log")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def __enter__(self) -> ModelServer:
        cmd = [sys.executable, "-m", "mlflow", "models", "serve", "-m", self.model_uri]
        cmd += ["--env-manager", "local", "-h", self.host, "-p", str(self.port)]
        cmd += ["-w", str(self.workers)]
        env = {**os.environ, "MLFLOW_TRACKING_URI": self.tracking_uri}
        # it runs `uvicorn` by name: this interpreter's environment first, activated or not
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self) -> None:
        import requests

        deadline = time.monotonic() + self.start_timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"mlflow models serve exited with {self.proc.returncode}; see {self.log}:\n"
                    + self.log.read_text(errors="replace")[-2000:]
                )
            try:
                if requests.get(f"{self.url}/ping", timeout=2).status_code == 200:
                    return
            except requests.ConnectionError:
                pass
            time.sleep(0.5)
        raise TimeoutError(f"{self.url} did not answer /ping in {self.start_timeout_s:.0f}s")

    def stop(self) -> None:
        """SIGTERM to the server's own process group (`mlflow` and the uvicorn workers it
        starts), SIGKILL to what is left after 20 s; returns once the group is gone."""
        if self.proc is None:
            return
        group = self.proc.pid
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGTERM)
        deadline = time.monotonic() + 20
        while _group_alive(group):
            self.proc.poll()  # reap the leader so the group can empty
            if time.monotonic() > deadline:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
                deadline = time.monotonic() + 10
            time.sleep(0.2)
        self.proc.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def predict(self, body: dict[str, Any], timeout_s: float = 120.0) -> list[dict[str, Any]]:
        """One `POST /invocations`; the rows of its `predictions`."""
        import requests

        response = requests.post(f"{self.url}/invocations", json=body, timeout=timeout_s)
        if response.status_code != 200:
            raise RuntimeError(f"{response.status_code} from /invocations: {response.text[:2000]}")
        return response.json()["predictions"]
