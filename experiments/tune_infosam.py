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
    from orchestrator.cli import main as cli

    return cli(["tune", "--config", args.config, *[f"--set={o}" for o in args.overrides]])


if __name__ == "__main__":
    sys.exit(main())
