"""Search InfoSAM's loss weights, PEFT method/capacity and learning rate with Ray Tune.

python experiments/tune_infosam.py --config experiments/configs/tune_smoke.yaml
ray job submit --working-dir . -- python experiments/tune_infosam.py --config <sweep.yaml>
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--config", default=str(ROOT / "experiments" / "configs" / "tune_smoke.yaml"))
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = p.parse_args(argv)
    from orchestrator.config import ConfigError
    from orchestrator.tuner import load_tune, run_sweep

    try:
        tcfg, base = load_tune(args.config, args.overrides)
        result = run_sweep(tcfg, base)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(
        f"[tune] best config: {result['best_yaml']}  (infosam train --config {result['best_yaml']})"
    )
    print(
        f"[tune] MLflow parent run {result['parent_run_id']}: mlflow ui --backend-store-uri {result['tracking_uri']}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
