"""Autoscaling from zero, simulated on this machine: cluster.yaml's node types on Ray's fake
multi-node provider, a demo-shaped benchmark submitted with `ray job submit`, and the figures
(first node after submit, peak nodes, makespan vs ideal, idle node-minutes, removal).

    python experiments/bench_autoscaler.py --max-nodes 3 --json autoscaler.json

It re-runs itself in its own PID namespace (`unshare`), so its `ray stop` touches nothing else.
The logic is `orchestrator.cluster.simulate`.
"""

import sys

from orchestrator.cluster.simulate import in_own_pid_namespace, main

if __name__ == "__main__":
    in_own_pid_namespace(sys.argv)
    sys.exit(main(sys.argv[1:]))
