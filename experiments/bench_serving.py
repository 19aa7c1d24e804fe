"""Latency of a served student: `mlflow models serve` on loopback, one image and one box a request.

    python experiments/bench_serving.py                      # the embedded tiny SAM, 1024 px
    python experiments/bench_serving.py --model models:/demo-camouflage@champion \\
        --tracking-uri sqlite:///$PWD/runs/mlflow.db --size 1024 --requests 20

Without --model it logs and registers the embedded tiny teacher (plain SAM weights) in a
throwaway SQLite store, so it needs no training run. It prints one JSON line: the median, p90
and max of `--requests` timed requests after one warm-up (client-side wall time: base64 +
JSON + HTTP + decode + model + RLE), the same rows through the pyfunc in this process, and the
machine.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

from orchestrator.tracking.serving import ModelServer, invocation_body


def test_image(size: int) -> bytes:
    """A JPEG (size x 3/4 size) with texture and a bright object, as a camera would give."""
    rng = np.random.default_rng(0)
    h, w = size * 3 // 4, size
    img = rng.integers(30, 110, (h, w, 3), dtype=np.uint8)
    img[h // 4 : 3 * h // 4, w // 3 : 2 * w // 3] += 110
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def tiny_teacher_model(store: Path) -> tuple[str, str]:
    """(tracking URI, models:/tiny@champion): the embedded tiny SAM as a registered model."""
    from mlflow import MlflowClient

    from infosam.sam import resolve_checkpoint
    from orchestrator.tracking.logged_model import log_sam_model, register_model

    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("serving", str(store / "artifacts")))
    weights = resolve_checkpoint("builtin:tiny_teacher")
    model = log_sam_model(uri, run.info.run_id, weights, {"format": "plain-sam", "variant": "tiny"})
    client.set_terminated(run.info.run_id)
    register_model(uri, model, "tiny")
    return uri, "models:/tiny@champion"


def cpu_model() -> str:
    """The CPU's name (timings on this machine kind differ 3-4x between CPU models)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def timed(fn, n: int) -> list[float]:
    fn()  # warm-up: first request loads lazily-initialised kernels
    out = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        out.append(1000 * (time.perf_counter() - t))
    return out


def summary(ms: list[float]) -> dict[str, float]:
    ms = sorted(ms)
    return {
        "median_ms": round(statistics.median(ms), 1),
        "p90_ms": round(ms[int(0.9 * (len(ms) - 1))], 1),
        "max_ms": round(ms[-1], 1),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="a models:/ URI (default: the embedded tiny SAM)")
    ap.add_argument("--tracking-uri", help="where --model is registered")
    ap.add_argument("--size", type=int, default=1024, help="the image's long side, pixels")
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    image = test_image(args.size)
    s = args.size
    box = [s / 3 - 10, s * 3 / 16 - 10, 2 * s / 3 + 10, s * 9 / 16 + 10]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        uri, model_uri = (
            (args.tracking_uri, args.model) if args.model else tiny_teacher_model(Path(tmp))
        )
        body = invocation_body([image], boxes=[box])
        with ModelServer(model_uri, uri, log=Path(tmp) / "serve.log") as server:
            served = timed(lambda: server.predict(body), args.requests)
            area = server.predict(body)[0]["area"]
        import mlflow
        import pandas as pd

        mlflow.set_tracking_uri(uri)
        pyfunc = mlflow.pyfunc.load_model(model_uri)
        frame = pd.DataFrame({"image": [image], "box": [box]})
        local = timed(lambda: pyfunc.predict(frame), args.requests)
    print(
        json.dumps(
            {
                "model": model_uri,
                "image": f"{s}x{s * 3 // 4} JPEG, {len(image) >> 10} KiB",
                "requests": args.requests,
                "served": summary(served),
                "in_process_pyfunc": summary(local),
                "mask_area": area,
                "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
            }
        )
    )


if __name__ == "__main__":
    main()
