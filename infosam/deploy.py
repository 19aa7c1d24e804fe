"""ONNX export of a student's prompt encoder + mask decoder, for interactive tools.

segment-anything's deployment split: the image encoder runs once per image (PyTorch, on a
server or a GPU: `PromptableSam.encode`, or `SamPredictor.get_image_embedding` on the exported
weights), and the light prompt encoder + mask decoder runs per click or box in ONNX Runtime
(its web demo runs it in the browser). `segment_anything.utils.onnx.SamOnnxModel` is that
decoder; InfoSAM students are trained and scored on SAM's single-mask output
(`multimask_output=False`), so this export always returns that mask instead of SAM's
click-count heuristic over the multimask outputs.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from segment_anything.modeling import Sam
from segment_anything.utils.onnx import SamOnnxModel

__all__ = ["ONNX_INPUTS", "SingleMaskOnnxModel", "export_decoder_onnx", "onnx_prompt_inputs"]

ONNX_INPUTS = (
    "image_embeddings",
    "point_coords",
    "point_labels",
    "mask_input",
    "has_mask_input",
    "orig_im_size",
)


class SingleMaskOnnxModel(SamOnnxModel):
    """SAM's ONNX decoder returning the single-mask output token, the one InfoSAM trains."""

    def select_masks(
        self, masks: torch.Tensor, iou_preds: torch.Tensor, num_points: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return masks[:, :1], iou_preds[:, :1]

    def mask_postprocessing(self, masks: torch.Tensor, orig_im_size: torch.Tensor) -> torch.Tensor:
        """segment-anything's, with the padding crop kept symbolic: its `int(...)` slice bounds
        become constants of the traced graph (masks of other aspect ratios came out wrong)."""
        size = self.img_size
        masks = F.interpolate(masks, size=(size, size), mode="bilinear", align_corners=False)
        kept = self.resize_longest_image_size(orig_im_size, size).to(torch.int64)
        masks = masks.index_select(2, torch.arange(kept[0])).index_select(3, torch.arange(kept[1]))
        orig = orig_im_size.to(torch.int64)
        return F.interpolate(masks, size=(orig[0], orig[1]), mode="bilinear", align_corners=False)


def export_decoder_onnx(sam: Sam, path: str | os.PathLike, *, opset: int = 17) -> None:
    """Write the prompt encoder + mask decoder of `sam` as ONNX (any number of points; outputs
    `masks` at `orig_im_size`, `iou_predictions`, `low_res_masks`)."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        raise ImportError(
            "ONNX export needs the `onnx` package: pip install 'infosam-at-scale[onnx]' "
            "(onnx and onnxruntime)"
        )
    model = SingleMaskOnnxModel(sam.eval(), return_single_mask=True)
    h, w = sam.prompt_encoder.image_embedding_size
    dummy = (
        torch.randn(1, sam.prompt_encoder.embed_dim, h, w),
        torch.randint(0, sam.image_encoder.img_size, (1, 5, 2)).float(),
        torch.randint(0, 4, (1, 5)).float(),
        torch.randn(1, 1, 4 * h, 4 * w),
        torch.tensor([1.0]),
        torch.tensor([480.0, 640.0]),
    )
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with warnings.catch_warnings():  # the TorchScript exporter's tracer warnings
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            dummy,
            tmp,
            input_names=list(ONNX_INPUTS),
            output_names=["masks", "iou_predictions", "low_res_masks"],
            dynamic_axes={"point_coords": {1: "num_points"}, "point_labels": {1: "num_points"}},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,  # segment-anything's export recipe: the TorchScript exporter
        )
    os.replace(tmp, path)


def onnx_prompt_inputs(
    image_embedding: np.ndarray,
    original_size: tuple[int, int],
    *,
    box: Sequence[float] | None = None,
    points: Sequence[Sequence[float]] | None = None,
) -> dict[str, np.ndarray]:
    """The decoder's inputs for one prompt given in the MODEL frame (coordinates already scaled
    to the resized image, as `infosam.predictor.prompt_batch` does): points with labels 1/0, a
    box as two corners labelled 2 and 3, and SAM's padding point (-1) when there is no box."""
    coords = [list(p[:2]) for p in points or []]
    labels = [float(p[2]) if len(p) == 3 else 1.0 for p in points or []]
    if box is not None:
        coords += [list(box[:2]), list(box[2:])]
        labels += [2.0, 3.0]
    else:
        coords.append([0.0, 0.0])
        labels.append(-1.0)
    h, w = image_embedding.shape[-2:]
    return {
        "image_embeddings": np.asarray(image_embedding, np.float32).reshape(1, -1, h, w),
        "point_coords": np.asarray([coords], np.float32),
        "point_labels": np.asarray([labels], np.float32),
        "mask_input": np.zeros((1, 1, 4 * h, 4 * w), np.float32),
        "has_mask_input": np.zeros(1, np.float32),
        "orig_im_size": np.asarray(original_size, np.float32),
    }
