"""Latency of a served student: `mlflow models serve` on loopback, one image and one box a request.

    python experiments/bench_serving.py                      # the embedded tiny SAM, 1024 px
    python experiments/bench_serving.py --architecture vit_b # ViT-B's size, random weights
    python experiments/bench_serving.py --model models:/demo-camouflage@champion \\
        --tracking-uri sqlite:///$PWD/runs/mlflow.db --size 1024 --requests 20

Without --model it logs and registers the embedded tiny teacher (plain SAM weights) in a
throwaway SQLite store, so it needs no training run. `--architecture vit_b` (or vit_l, vit_h) logs that SAM variant with
random-initialised weights instead: no weights are downloaded, and the latency of a dense
network depends on its shapes, not on its values (the masks are meaningless). It prints one JSON line: the median, p90
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


def registered_model(store: Path, variant: str = "tiny") -> tuple[str, str]:
    """(tracking URI, models:/<variant>@champion): the embedded tiny SAM, or a random-initialised
    `variant`, as a registered model in a throwaway store."""
    import torch
    from mlflow import MlflowClient

    from infosam.sam import build_sam, resolve_checkpoint
    from orchestrator.tracking.logged_model import log_sam_model, register_model

    uri = f"sqlite:///{store / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("serving", str(store / "artifacts")))
    if variant == "tiny":
        weights = resolve_checkpoint("builtin:tiny_teacher")
    else:
        weights = store / f"sam_{variant}_random.pth"
        torch.save(build_sam(variant).state_dict(), weights)
    config = {"format": "plain-sam", "variant": variant}
    model = log_sam_model(uri, run.info.run_id, str(weights), config)
    client.set_terminated(run.info.run_id)
    register_model(uri, model, variant.replace("_", "-"))
    return uri, f"models:/{variant.replace('_', '-')}@champion"


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
    ap.add_argument(
        "--architecture",
        default="tiny",
        choices=["tiny", "vit_b", "vit_l", "vit_h"],
        help="without --model: the embedded tiny SAM, or this variant with random weights",
    )
    ap.add_argument("--size", type=int, default=1024, help="the image's long side, pixels")
    ap.add_argument("--requests", type=int, default=20)
    args = ap.parse_args()
    image = test_image(args.size)
    s = args.size
    box = [s / 3 - 10, s * 3 / 16 - 10, 2 * s / 3 + 10, s * 9 / 16 + 10]
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        uri, model_uri = (
            (args.tracking_uri, args.model)
            if args.model
            else registered_model(Path(tmp), args.architecture)
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
                "machine": f"{cpu_model()}, {os.cpu_count()} CPUs",
            }
        )
    )


if __name__ == "__main__":
    main()
