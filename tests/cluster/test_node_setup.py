"""cluster.yaml's own setup commands, run as a node runs them (slow).

A fresh virtual environment holding only Ray stands for the node image; the checkout is copied
as `ray up` syncs it (the files git tracks or does not ignore) and bind-mounted where the yaml's
file_mounts puts it, inside a mount namespace this test makes (`unshare --mount`), so nothing
outside it sees /home/ray. Then every module of the project is imported and a benchmark cell
runs with the node's Python: what a paid cluster would otherwise find out at its last line.
"""

import os
import shutil
import subprocess
import sys

import pytest
import yaml

from tests.helpers import ROOT, benchmark_args

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1200)]

IMPORT_ALL = """
import importlib, pkgutil, infosam, orchestrator
names = []
for pkg in (infosam, orchestrator):
    for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(m.name)
        names.append(m.name)
print("imported", len(names), "modules")
"""


def _synced_copy(target):
    """The checkout as `ray up` syncs it: rsync_filter is .gitignore."""
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard", "-z"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)


@pytest.mark.skipif(shutil.which("unshare") is None or os.geteuid() != 0, reason="needs root")
def test_setup_commands_install_a_node_that_runs_a_benchmark_cell(tmp_path, synthetic_root):
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    mount = next(t for t, src in cluster["file_mounts"].items() if src == ".")
    setup = cluster["setup_commands"]
    top = mount.strip("/").split("/")[0]
    existed = os.path.exists(mount)
    checkout, venv = tmp_path / "checkout", tmp_path / "node-venv"
    checkout.mkdir()
    _synced_copy(checkout)
    # the node image: Python with Ray and nothing of the project's
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pin = next(
        line.strip()
        for line in (ROOT / "constraints.txt").read_text().splitlines()
        if line.startswith("ray==")
    )
    subprocess.run([venv / "bin" / "pip", "install", "-q", f"ray[default]=={pin[5:]}"], check=True)
    before = subprocess.run(
        [venv / "bin" / "python", "-c", "import torch"], capture_output=True
    ).returncode
    assert before != 0, "the fresh environment already has torch: it is not a bare node image"

    bench = " ".join(
        f"'{a}'" for a in benchmark_args(tmp_path, synthetic_root, "node-setup")
    )  # paths only, no quotes inside
    script = "\n".join(
        [
            "set -euo pipefail",
            f"mount -t tmpfs tmpfs /{top}",  # an empty /home (or whatever holds the mount) here only
            f"mkdir -p {mount}",
            f"mount --bind {checkout} {mount}",
            f"cd {mount}",
            *setup,  # exactly the yaml's lines
            f"python -c '{IMPORT_ALL}'",
            f"cd {tmp_path} && infosam benchmark {bench}",
        ]
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}:{env['PATH']}"
    done = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
        env=env,
        capture_output=True,
        text=True,
        timeout=1100,
    )
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert "imported" in out and "modules" in out, out[-2000:]
    results = tmp_path / "runs" / "node-setup" / "results.md"
    assert results.is_file(), out[-3000:]
    assert "Adapter + InfoSAM" in results.read_text(), results.read_text()
    assert os.path.exists(mount) == existed, "the mount leaked out of the test's namespace"
