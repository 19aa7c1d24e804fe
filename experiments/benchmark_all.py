"""The main job: the paper's method x dataset x seed comparison, tracked in MLflow.

    python experiments/benchmark_all.py                       # embedded demo (CPU, minutes)
    python experiments/benchmark_all.py --config experiments/configs/paper.yaml
    ray job submit --working-dir . -- python experiments/benchmark_all.py

Same code locally (starts a Ray) and on a cluster (connects to RAY_ADDRESS). Re-running with the
same benchmark name resumes it; `--set benchmark.name=other` starts fresh.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the shipped code, also under `ray job submit --working-dir .`
DEMO = ROOT / "experiments" / "configs" / "demo.yaml"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=str(DEMO))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from orchestrator.benchmark import load_benchmark, run_benchmark
    from orchestrator.config import ConfigError

    start = time.perf_counter()
    try:
        bench, base = load_benchmark(args.config, args.overrides)
        result = run_benchmark(bench, base)
    except (ConfigError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C, or SIGTERM from `ray job stop`: runs closed as KILLED
        return 130
    print(
        f"[benchmark] {bench.name}: {len(result['raw'])} metric values in {time.perf_counter() - start:.0f}s"
    )
    for kind, path in result["files"].items():
        print(f"[benchmark] {kind}: {path}")
    print(
        f"[benchmark] MLflow parent run {result['parent_run_id']}: mlflow ui --backend-store-uri {result['tracking_uri']}"
    )
    if result["failed"]:
        print(
            f"[benchmark] {len(result['failed'])} cell(s) FAILED: {', '.join(result['failed'])}; "
            "re-run the same command to retry only those",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
