"""A fine-tuned student as an MLflow model: registered, loaded where there is no checkpoint
folder, no Ray and no `orchestrator`, predicting the masks `infosam predict` writes."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from mlflow import MlflowClient
from PIL import Image
from pycocotools import mask as coco_mask

from orchestrator.tracking.logged_model import register_model
from orchestrator.train.checkpoints import log_student_model
from tests.helpers import ROOT
from tests.test_predict import _checkpoint, _images, _predict_with_box

pytestmark = pytest.mark.timeout(300)

BOX = [40.0, 30.0, 150.0, 130.0]  # the box _predict_with_box prompts with

FRESH = textwrap.dedent(
    """
    import json, sys
    sys.modules["ray"] = None  # importing Ray or the project here fails: the model needs neither
    sys.modules["orchestrator"] = None
    import mlflow, pandas as pd
    mlflow.set_tracking_uri(sys.argv[1])
    model = mlflow.pyfunc.load_model(sys.argv[2])
    import infosam
    frame = pd.DataFrame(json.load(open(sys.argv[3])))
    frame["image"] = [open(p, "rb").read() for p in frame["image"]]
    out = model.predict(frame)
    json.dump({"rows": out.to_dict("records"), "infosam": infosam.__file__}, sys.stdout)
    """
)


def _rle_mask(row: dict) -> np.ndarray:
    rle = {"size": [row["height"], row["width"]], "counts": row["mask"].encode()}
    return coco_mask.decode(rle).astype(bool)


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_registered_model_predicts_like_infosam_predict_in_a_fresh_process(
    tmp_path, synthetic_root, method
):
    ckpt, _ = _checkpoint(tmp_path, synthetic_root, method)
    paths = _images(tmp_path)
    _predict_with_box(ckpt, paths, tmp_path / "pred")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("models", str(tmp_path / "artifacts")))
    model_uri = log_student_model(uri, run.info.run_id, str(ckpt), step=0)
    assert log_student_model(uri, run.info.run_id, str(ckpt)) == model_uri  # once per run
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    version = register_model(uri, model_uri, f"sam-{method}")
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before  # MLflow's globals put back
    assert int(version.version) == 1
    logged = client.get_logged_model(model_uri.split("/")[-1])
    assert logged.source_run_id == run.info.run_id
    assert logged.experiment_id == run.info.experiment_id  # beside its run in the UI
    assert logged.tags["infosam.method"] == method
    shutil.rmtree(ckpt)  # the model carries its weights

    # one row per object: every image with the box, the first one again with a point
    (tmp_path / "rows.json").write_text(
        json.dumps(
            {
                "image": [str(p) for p in paths] + [str(paths[0])],
                "box": [BOX] * len(paths) + [None],
                "points": [None] * len(paths) + [[[95.0, 80.0, 1.0]]],
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run(
        [sys.executable, "-c", FRESH, uri, f"models:/sam-{method}@champion", "rows.json"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout)
    assert str(ROOT / "infosam") not in result["infosam"]  # the model's own copy of the method
    rows = result["rows"]
    assert len(rows) == len(paths) + 1
    for p, row in zip(paths, rows):
        expected = np.asarray(Image.open(tmp_path / "pred" / f"{p.stem}_mask.png")) > 0
        got = _rle_mask(row)
        assert got.shape == expected.shape == Image.open(p).size[::-1]
        assert np.array_equal(got, expected), p.name
        assert row["area"] == expected.sum() > 0
        assert -0.5 < row["score"] < 1.5
    point_mask = _rle_mask(rows[-1])
    assert point_mask.shape == _rle_mask(rows[0]).shape and point_mask.any()


def test_bad_rows_are_refused_with_the_row_and_the_fix(tmp_path, synthetic_root):
    import mlflow
    import pandas as pd

    ckpt, _ = _checkpoint(tmp_path, synthetic_root, "lora")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("models", str(tmp_path / "artifacts")))
    model_uri = log_student_model(uri, run.info.run_id, str(ckpt))
    where = client.get_logged_model(model_uri.removeprefix("models:/")).artifact_location
    model = mlflow.pyfunc.load_model(where)  # a local store: its folder, no fluent URI
    good = _images(tmp_path)[0].read_bytes()
    with pytest.raises(Exception, match=r"row 1: image: .*(cannot|not|unidentified)"):
        model.predict(pd.DataFrame({"image": [good, b"not an image"], "box": [BOX, BOX]}))
    with pytest.raises(Exception, match=r"row 0: give a `box`"):
        model.predict(pd.DataFrame({"image": [good], "box": [None]}))


@pytest.mark.slow  # a server process, about 25 s
def test_served_model_answers_a_request_with_infosam_predicts_masks(tmp_path, synthetic_root):
    """`mlflow models serve` of the registered alias on loopback, a real HTTP request."""
    from orchestrator.tracking.serving import ModelServer, invocation_body

    ckpt, _ = _checkpoint(tmp_path, synthetic_root, "lora")
    paths = _images(tmp_path)
    _predict_with_box(ckpt, paths, tmp_path / "pred")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("served", str(tmp_path / "artifacts")))
    register_model(uri, log_student_model(uri, run.info.run_id, str(ckpt)), "served")
    shutil.rmtree(ckpt)
    body = invocation_body([p.read_bytes() for p in paths], boxes=[BOX] * len(paths))
    with ModelServer("models:/served@champion", uri, log=tmp_path / "serve.log") as server:
        assert server.url.startswith("http://127.0.0.1:")
        rows = server.predict(body)
        pid = server.proc.pid
    assert server.proc.poll() is not None  # stopped with its process group
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)
    assert len(rows) == len(paths)
    for p, row in zip(paths, rows):
        expected = np.asarray(Image.open(tmp_path / "pred" / f"{p.stem}_mask.png")) > 0
        assert np.array_equal(_rle_mask(row), expected), p.name
