"""Load on the MLflow tracking server: N writer processes x S steps, PostgreSQL vs SQLite.

Every writer opens its own run and logs S steps (one `log_batch` of the metric keys per step,
as a training loop does) through a real `mlflow server`; afterwards every run's history is read
back and checked: each step present once per key (none lost, none duplicated).

    python experiments/bench_tracking.py                     # both backends, 16 x 200
    python experiments/bench_tracking.py --backend postgresql --writers 16 --steps 200 --auth

PostgreSQL runs as a throwaway local server (`orchestrator.tracking.server.LocalPostgres`);
SQLite is a file behind a one-worker server (its single writer lock is the point of comparing).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.tracking.server import LocalPostgres, TrackingServer

KEYS = ("train/loss", "train/segmentation", "val/iou")


def _writer(url: str, experiment_id: str, index: int, steps: int, out: Any) -> None:
    """One process: one run, `steps` log_batch calls; reports (run id, errors, seconds)."""
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    run = client.create_run(experiment_id, run_name=f"writer-{index}")
    errors = 0
    t0 = time.perf_counter()
    for step in range(steps):
        now = int(time.time() * 1000)
        batch = [Metric(k, 1.0 / (step + 1) + i, now, step) for i, k in enumerate(KEYS)]
        try:
            client.log_batch(run.info.run_id, metrics=batch)
        except Exception:  # what a training loop would see after the client's own retries
            errors += 1
    seconds = time.perf_counter() - t0
    client.set_terminated(run.info.run_id)
    out.put((run.info.run_id, errors, seconds))


def load_test(url: str, writers: int = 16, steps: int = 200) -> dict[str, Any]:
    """Run the load through `url`; returns throughput, errors, lost and duplicated points."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    experiment_id = client.create_experiment(f"load-{time.time_ns()}")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_writer, args=(url, experiment_id, i, steps, out))
        for i in range(writers)
    ]
    t0 = time.perf_counter()
    for p in procs:
        p.start()
    results = [out.get(timeout=1800) for _ in procs]
    wall = time.perf_counter() - t0
    for p in procs:
        p.join(60)
    expected = writers * steps * len(KEYS)
    lost = duplicated = 0
    for run_id, _, _ in results:
        for key in KEYS:
            got = [m.step for m in client.get_metric_history(run_id, key)]
            lost += steps - len(set(got) & set(range(steps)))
            duplicated += len(got) - len(set(got))
    errors = sum(e for _, e, _ in results)
    busiest = max(s for _, _, s in results)
    return {
        "writers": writers,
        "steps": steps,
        "points_expected": expected,
        "requests": writers * steps,
        "errors": errors,
        "lost_points": lost,
        "duplicated_points": duplicated,
        "wall_s": round(wall, 1),
        "logging_s": round(busiest, 1),
        "points_per_s": round(expected / busiest, 1),
        "requests_per_s": round(writers * steps / busiest, 1),
    }


def run_backend(backend: str, writers: int, steps: int, auth: bool, workers: int | None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="infosam-load-"))
    pg = None
    if backend == "postgresql":
        pg = LocalPostgres().start()
        uri = pg.uri()
    else:
        uri = f"sqlite:///{root / 'mlflow.db'}"
    if auth:
        os.environ.setdefault("MLFLOW_AUTH_ADMIN_PASSWORD", "load-test-admin-pw")
        os.environ["MLFLOW_TRACKING_USERNAME"] = "admin"
        os.environ["MLFLOW_TRACKING_PASSWORD"] = os.environ["MLFLOW_AUTH_ADMIN_PASSWORD"]
    server = TrackingServer(
        uri, str(root / "artifacts"), workers=workers, auth=auth, log_path=root / "server.log"
    )
    try:
        server.start()
        result = load_test(server.url, writers, steps)
    finally:
        server.close()
        if pg is not None:
            pg.stop()
    return {"backend": backend, "server_workers": server.workers, "auth": auth, **result}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backend", choices=["postgresql", "sqlite", "both"], default="both")
    p.add_argument("--writers", type=int, default=16)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument(
        "--workers", type=int, default=None, help="server workers (default 4 PG, 1 SQLite)"
    )
    p.add_argument("--auth", action="store_true", help="basic-auth app in front (PostgreSQL too)")
    p.add_argument("--out", default=None, help="append one JSON line per backend here")
    args = p.parse_args(argv)
    backends = ["postgresql", "sqlite"] if args.backend == "both" else [args.backend]
    rows = []
    for backend in backends:
        row = run_backend(backend, args.writers, args.steps, args.auth, args.workers)
        row["machine"] = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.out:
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("\n| backend | server workers | points/s | requests/s | errors | lost | duplicated |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['server_workers']} | {r['points_per_s']} | "
            f"{r['requests_per_s']} | {r['errors']} | {r['lost_points']} | "
            f"{r['duplicated_points']} |"
        )
    return 0 if all(r["lost_points"] == r["duplicated_points"] == 0 for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
