"""The MLflow model of a fine-tuned SAM, logged as code (MLflow's models-from-code).

MLflow copies this file into every logged model, with `infosam/` as its code path and the
image codec as an artifact, so `mlflow.pyfunc.load_model("models:/NAME@champion")` and
`mlflow models serve` work where neither this project, its checkpoints nor Ray are installed.
It imports nothing else of `orchestrator`.

One input row is one object: an encoded image file (`image`, bytes; base64 in JSON) and a
prompt in the image's own pixels, a `box` [x0, y0, x1, y1] and/or `points` [[x, y, label],
...] (label 1 foreground, 0 background). Rows with the same image bytes are decoded and
encoded once. One output row per input row: the mask at the image's resolution as COCO RLE
(`mask`: the `counts` string; `pycocotools.mask.decode({"size": [height, width], "counts":
mask})`), `height`, `width`, SAM's predicted IoU (`score`) and the mask's pixel count (`area`).
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import sys
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

CODEC_MODULE = "infosam_logged_model_codec"  # the artifact's module name: shadows nothing


def _load_codec(path: str) -> Any:
    """The project's image codec from the model's artifacts (ingest's decoding rules)."""
    if CODEC_MODULE in sys.modules:
        return sys.modules[CODEC_MODULE]
    spec = importlib.util.spec_from_file_location(CODEC_MODULE, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[CODEC_MODULE] = module  # dataclasses in it look their module up while defined
    spec.loader.exec_module(module)
    return module


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and np.isnan(value):
        return True
    return hasattr(value, "__len__") and len(value) == 0


def _as_list(value: Any) -> list | None:
    if _missing(value):
        return None
    return [_as_list(v) if hasattr(v, "__len__") else float(v) for v in value]


class SamModel(PythonModel):
    """Prompted masks from the exported student; predictions equal `infosam predict`'s."""

    def load_context(self, context: Any) -> None:
        import torch

        from infosam.sam import PromptableSam, build_sam
        from infosam.sam2 import PromptableSam2, build_sam2_model, load_exported

        config = context.model_config or {}
        weights = context.artifacts["weights"]
        family = config.get("family", "sam")
        if config.get("format") == "self-contained":
            sam, family = load_exported(weights)
        elif family == "sam2":
            sam = build_sam2_model(config["variant"], weights)
        else:
            sam = build_sam(config["variant"], weights)
        wanted = config.get("device", "auto")
        self.device = "cuda" if wanted != "cpu" and torch.cuda.is_available() else "cpu"
        wrap = PromptableSam2 if family == "sam2" else PromptableSam
        self.model = wrap(sam).to(self.device).eval()
        self.codec = _load_codec(context.artifacts["codec"])

    def _image(self, value: Any, row: int) -> np.ndarray:
        data = base64.b64decode(value) if isinstance(value, str) else bytes(value)
        try:
            return self.codec.decode_image(data)[0]
        except self.codec.Rejected as exc:
            raise ValueError(f"row {row}: image: {exc}") from None

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> pd.DataFrame:
        from infosam.predictor import Prompt, segment

        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "image" not in frame.columns:
            raise ValueError("each row needs an `image` column: the bytes of an image file")
        batch_size = int((params or {}).get("batch_size", 8))
        images: dict[str, np.ndarray] = {}
        rows = []
        for i, record in enumerate(frame.to_dict("records")):
            raw = record["image"]
            key = hashlib.sha1(raw.encode() if isinstance(raw, str) else bytes(raw)).hexdigest()
            if key not in images:
                images[key] = self._image(raw, i)
            prompt = Prompt(_as_list(record.get("box")), _as_list(record.get("points")))
            if prompt.box is None and prompt.points is None:
                raise ValueError(f"row {i}: give a `box` [x0, y0, x1, y1] and/or `points`")
            kind = (prompt.box is not None, prompt.points is not None)
            rows.append((i, kind, images[key], prompt))
        out: list[dict[str, Any] | None] = [None] * len(rows)
        for kind in sorted({r[1] for r in rows}):  # one prompt kind per model call
            same = [r for r in rows if r[1] == kind]
            for start in range(0, len(same), batch_size):
                chunk = same[start : start + batch_size]
                masks = segment(
                    self.model, [r[2] for r in chunk], [r[3] for r in chunk], device=self.device
                )
                for (i, _, _, _), (mask, score) in zip(chunk, masks):
                    out[i] = _encode(mask, score)
        return pd.DataFrame(out, columns=["mask", "height", "width", "score", "area"])


def _encode(mask: np.ndarray, score: float) -> dict[str, Any]:
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {
        "mask": rle["counts"].decode("ascii"),
        "height": int(mask.shape[0]),
        "width": int(mask.shape[1]),
        "score": float(score),
        "area": int(mask.sum()),
    }


mlflow.models.set_model(SamModel())
