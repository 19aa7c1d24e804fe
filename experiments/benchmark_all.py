"""The main job: the paper's method x dataset x seed comparison, tracked in MLflow.

    python experiments/benchmark_all.py                       # embedded demo (CPU, minutes)
    python experiments/benchmark_all.py --config experiments/configs/paper.yaml
    ray job submit --working-dir . -- python experiments/benchmark_all.py

Same code locally (starts a Ray) and on a cluster (connects to RAY_ADDRESS). Re-running with the
same benchmark name resumes it; `--set benchmark.name=other` starts fresh.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the shipped code, also under `ray job submit --working-dir .`


def main(argv: list[str] | None = None) -> int:
    from orchestrator.benchmark.run import main as benchmark_main

    return benchmark_main(argv)  # default: the embedded demo, orchestrator/benchmark/demo.yaml


if __name__ == "__main__":
    sys.exit(main())
