"""Every command meets bad input with one `error: ...` line and exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from orchestrator.cli import main as cli
from orchestrator.data.formats.folders import ingest_folders
from tests.helpers import ROOT

TEACHER = ROOT / "infosam" / "assets" / "tiny_teacher.pth"


def _cases(tmp: Path) -> dict[str, list[str]]:
    (tmp / "not_a_dataset").mkdir()
    (tmp / "empty_ckpt").mkdir()
    (tmp / "bad.yaml").write_text("optim: [1, 2]\n")
    (tmp / "cluster.yaml").write_text("- a list\n")
    (tmp / "image.png").write_bytes(b"not a png")
    Image.fromarray(np.zeros((32, 48, 3), np.uint8)).save(tmp / "ok.png")
    for sub in ("images", "masks"):  # a one-split (train) dataset
        (tmp / "src" / sub).mkdir(parents=True)
        Image.fromarray(np.full((32, 48), 255 * (sub == "masks"), np.uint8)).save(
            tmp / "src" / sub / "a.png"
        )
    ingest_folders(tmp / "src", tmp / "ds")
    bad_set = ["--set", "optim.batch_size=0"]
    return {
        "synth: unknown domain": ["data", "synth", str(tmp / "s"), "--domains", "forest"],
        "ingest: missing source": [
            *("data", "ingest", "--format", "folders", str(tmp / "nope"), str(tmp / "o")),
        ],
        "ingest: coco without images dir": [
            *("data", "ingest", "--format", "coco", str(tmp / "a.json"), str(tmp / "o")),
        ],
        "inspect: not a dataset": ["data", "inspect", str(tmp / "not_a_dataset")],
        "teacher-cache: bad value": ["data", "teacher-cache", *bad_set],
        "train: bad value": ["train", *bad_set],
        "train: unknown key": ["train", "--set", "optim.learning_rate=1"],
        "train: bad config file": ["train", "--config", str(tmp / "bad.yaml")],
        "train: missing config file": ["train", "--config", str(tmp / "none.yaml")],
        "evaluate: missing checkpoint": [
            *("evaluate", "--checkpoint", str(tmp / "none"), "--data", str(tmp / "nd")),
        ],
        "evaluate: empty checkpoint dir": [
            *("evaluate", "--checkpoint", str(tmp / "empty_ckpt"), "--data", str(tmp)),
        ],
        "predict: missing checkpoint": [
            *("predict", "--checkpoint", str(tmp / "none.pth"), "--images", str(tmp / "image.png")),
            *("--box", "1,1,5,5", "--out", str(tmp / "p")),
        ],
        "predict: unreadable image": [
            *("predict", "--checkpoint", str(TEACHER), "--variant", "tiny"),
            *("--images", str(tmp / "image.png"), "--box", "1,1,5,5", "--out", str(tmp / "p")),
        ],
        "predict: weights of another variant": [
            *("predict", "--checkpoint", str(TEACHER), "--variant", "vit_b"),
            *("--images", str(tmp / "ok.png"), "--box", "1,1,5,5", "--out", str(tmp / "p")),
        ],
        "evaluate: a split the dataset lacks": [
            *("evaluate", "--reference", str(TEACHER), "--variant", "tiny"),
            *("--data", str(tmp / "ds" / "src"), "--split", "val"),
        ],
        "export: missing checkpoint": [
            *("export", "--checkpoint", str(tmp / "none"), "--out", str(tmp / "e.pth")),
        ],
        "export: empty checkpoint dir": [
            *("export", "--checkpoint", str(tmp / "empty_ckpt"), "--out", str(tmp / "e.pth")),
        ],
        "tune: bad value": ["tune", *bad_set],
        "benchmark: bad value": ["benchmark", *bad_set],
        "benchmark: unknown method": ["benchmark", "--set", "benchmark.methods=[lorax]"],
        "tracking serve: public host without auth": [
            *("tracking", "serve", "--backend-store-uri", f"sqlite:///{tmp}/m.db"),
            *("--artifacts-destination", str(tmp / "art"), "--host", "0.0.0.0"),
        ],
        "cluster check: missing file": ["cluster", "check", str(tmp / "none.yaml")],
        "cluster check: not a mapping": ["cluster", "check", str(tmp / "cluster.yaml")],
    }


def test_each_command_with_bad_input_prints_one_error_line(tmp_path, capsys):
    failures = []
    for name, argv in _cases(tmp_path).items():
        capsys.readouterr()
        try:
            code = cli(argv)
        except BaseException as exc:  # a traceback a user would see
            failures.append(f"{name}: raised {type(exc).__name__}: {exc}")
            continue
        err = capsys.readouterr().err
        if code != 2 or not err.startswith("error: ") or "Traceback" in err:
            failures.append(f"{name}: exit {code}, stderr {err[:300]!r}")
    assert not failures, "\n".join(failures)


@pytest.mark.parametrize("case", ["train: bad value", "ingest: missing source"])
def test_the_installed_command_exits_2_without_a_traceback(tmp_path, case):
    """The same through a real process: what a user's terminal shows."""
    argv = _cases(tmp_path)[case]
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", *argv],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1
