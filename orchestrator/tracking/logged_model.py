"""A fine-tuned student as an MLflow model: logged with its run, registered with an alias.

The model is `sam_pyfunc.py` (models-from-code) plus the exported weights (segment-anything's
format, or the self-contained export for adapters), `infosam/` as its code path, a signature,
an input example and pinned pip requirements: `mlflow.pyfunc.load_model("models:/<id>")` and
`mlflow models serve` need neither the checkpoint folder nor Ray.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tempfile
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.models import Model
from mlflow.models.signature import ModelSignature
from mlflow.types.schema import Array, ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

__all__ = [
    "MODEL_NAME",
    "log_sam_model",
    "model_requirements",
    "register_model",
    "sam_signature",
]

MODEL_NAME = "model"  # the logged model's name within its run
HERE = Path(__file__).resolve().parent
PACKAGE_ROOT = HERE.parent.parent
CODEC = PACKAGE_ROOT / "orchestrator" / "data" / "codec.py"  # ingest's decoding rules
# distributions the model imports when it loads (torchvision: segment-anything's transforms)
REQUIREMENTS = (
    "mlflow",
    "torch",
    "torchvision",
    "segment-anything",
    "rf-sam-2",  # SAM 2.1 (Meta's code) and its config system
    "hydra-core",
    "iopath",
    "peft",
    "pysodmetrics",
    "numpy",
    "pandas",
    "pillow",
    "tifffile",
    "pycocotools",
)


@contextlib.contextmanager
def _tracking(uri: str, experiment_id: str) -> Iterator[None]:
    """MLflow's fluent API (which `Model.log` uses) pointed at `uri` and the run's experiment
    for one call. Both are process-global and `set_tracking_uri` also writes
    $MLFLOW_TRACKING_URI (which `resolve_tracking_uri` reads), so all three are put back."""
    from mlflow.tracking import fluent
    from mlflow.tracking._tracking_service import utils as tracking_utils

    before_uri = tracking_utils._tracking_uri  # the unresolved value: None when never set
    before_env = os.environ.get("MLFLOW_TRACKING_URI")
    before_experiment = fluent._active_experiment_id
    mlflow.set_tracking_uri(uri)
    try:
        mlflow.set_experiment(experiment_id=experiment_id)
        yield
    finally:
        fluent._active_experiment_id = before_experiment
        tracking_utils._tracking_uri = before_uri
        if before_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = before_env


def sam_signature() -> ModelSignature:
    """One row per object: image bytes + a box and/or points in; an RLE mask and scores out."""
    inputs = Schema(
        [
            ColSpec("binary", "image"),
            ColSpec(Array("double"), "box", required=False),
            ColSpec(Array(Array("double")), "points", required=False),
        ]
    )
    outputs = Schema(
        [
            ColSpec("string", "mask"),
            ColSpec("long", "height"),
            ColSpec("long", "width"),
            ColSpec("double", "score"),
            ColSpec("long", "area"),
        ]
    )
    return ModelSignature(inputs, outputs, ParamSchema([ParamSpec("batch_size", "long", 8)]))


def model_requirements() -> list[str]:
    """The model's pip requirements, pinned to what trained it (local version tags dropped)."""
    pins = []
    for dist in REQUIREMENTS:
        version = metadata.version(dist).split("+", 1)[0]
        pins.append(f"{dist}=={version}")
    return pins


def _input_example() -> pd.DataFrame:
    """A small image with a bright square and a box around it: the UI's and serving's example."""
    img = np.full((96, 128, 3), 60, np.uint8)
    img[24:72, 40:96] = 200
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="PNG")
    return pd.DataFrame({"image": [buf.getvalue()], "box": [[36.0, 20.0, 100.0, 76.0]]})


def _staged(source: str | Path, tmp: Path) -> str:
    """A copy of `source` in the staging folder (MLflow copies artifacts from there)."""
    target = tmp / "artifacts" / Path(source).name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return str(target)


def _stage_code(tmp: Path) -> Path:
    """`infosam/` (the package in use) without its assets (the weights travel as an artifact)."""
    import infosam

    target = tmp / "infosam"
    source = Path(infosam.__file__).parent
    shutil.copytree(source, target, ignore=shutil.ignore_patterns("assets", "__pycache__"))
    return target


def find_logged_model(uri: str, run_id: str, checkpoint: str) -> str | None:
    """`models:/<model_id>` of the model `run_id` already logged from `checkpoint`, if any."""
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    found = client.search_logged_models(
        experiment_ids=[run.info.experiment_id],
        filter_string=f"source_run_id = '{run_id}'",
    )
    for model in found:
        if model.tags.get("infosam.checkpoint") == checkpoint:
            return f"models:/{model.model_id}"
    return None


def log_sam_model(
    uri: str,
    run_id: str,
    weights: str | Path,
    config: dict[str, Any],
    *,
    step: int = 0,
    tags: dict[str, str] | None = None,
    codec: str | Path | None = None,
) -> str:
    """Log exported student weights as run `run_id`'s MLflow model; returns `models:/<id>`.

    `codec` is the image codec's source file (default: the one beside this package); callers
    that imported it pass `orchestrator.data.codec.__file__`, the file actually in use (in a
    `ray job submit` working dir the default path was not there).

    `config` is the model's: `format` (`plain-sam` or `self-contained`), `variant`, and
    optionally `device` (`auto` uses a GPU where the model is loaded, `cpu` never does). The
    model's params are the run's; its metrics are the run's at `step` (the last epoch)."""
    experiment_id = MlflowClient(uri).get_run(run_id).info.experiment_id
    with (
        tempfile.TemporaryDirectory(prefix="infosam-model-code-") as tmp,
        _tracking(uri, experiment_id),
    ):
        info = Model.log(
            artifact_path=None,
            name=MODEL_NAME,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            step=step,
            python_model=str(HERE / "sam_pyfunc.py"),
            artifacts={"weights": str(weights), "codec": _staged(codec or CODEC, Path(tmp))},
            code_paths=[str(_stage_code(Path(tmp)))],
            model_config={"device": "auto", **config},
            signature=sam_signature(),
            input_example=_input_example(),
            pip_requirements=model_requirements(),
            tags=tags,
        )
    return f"models:/{info.model_id}"


def _model_experiment(uri: str, model_uri: str) -> str:
    return MlflowClient(uri).get_logged_model(model_uri.rsplit("/", 1)[-1]).experiment_id


def register_model(uri: str, model_uri: str, name: str, alias: str = "champion") -> Any:
    """A version of registered model `name` from `model_uri` with `alias` pointing at it; when
    the alias already points at this model, that version (a resumed caller adds none)."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(uri, registry_uri=uri)
    try:
        current = client.get_model_version_by_alias(name, alias)
    except MlflowException:
        current = None  # no such registered model or alias yet
    if current is not None and current.source == model_uri:  # (model_id is unset in 3.17)
        return current
    with _tracking(uri, _model_experiment(uri, model_uri)):
        version = mlflow.register_model(model_uri, name)
    client.set_registered_model_alias(name, alias, version.version)
    return version
