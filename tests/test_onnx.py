"""The ONNX decoder of a fine-tuned student, run with onnxruntime on CPU, gives the masks
`infosam predict` gives (the deployment path for interactive tools)."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
import torch

from infosam.deploy import onnx_prompt_inputs
from infosam.engine import predict_scored
from infosam.predictor import Prompt, prompt_batch
from infosam.transforms import prepare_pair
from orchestrator.cli import main as cli
from orchestrator.predict import read_image_file
from tests.test_predict import _checkpoint, _images

LOGIT_TOL = 2e-3  # float32 ONNX Runtime vs PyTorch, at original resolution


@pytest.mark.parametrize("method", ["lora", "adapter"])
def test_onnx_decoder_matches_pytorch(tmp_path, synthetic_root, method):
    ckpt, student = _checkpoint(tmp_path, synthetic_root, method)
    out = tmp_path / "decoder.onnx"
    assert cli(["export", "--checkpoint", str(ckpt), "--onnx", str(out)]) == 0
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    size = student.image_size
    prompts = [
        Prompt(box=[40.0, 30.0, 150.0, 130.0]),
        Prompt(points=[[95.0, 80.0, 1.0]]),
        Prompt(box=[20.0, 20.0, 120.0, 160.0], points=[[60.0, 70.0, 1.0], [30.0, 30.0, 0.0]]),
    ]
    for path in _images(tmp_path):
        image = read_image_file(path)
        pixels, _, input_size = prepare_pair(image, np.zeros(image.shape[:2], np.uint8), size)
        sizes = torch.tensor([input_size])
        with torch.inference_mode():
            embedding = student.encode(torch.from_numpy(pixels)[None], sizes)
        for prompt in prompts:
            pb = prompt_batch([prompt], [image.shape[:2]], size)
            with torch.inference_mode():
                logits, scores = predict_scored(
                    student, pb, sizes, [image.shape[:2]], image_embeddings=embedding
                )
            box = None if pb.boxes is None else pb.boxes[0].tolist()
            points = None
            if pb.point_coords is not None:
                points = [
                    [*xy, lab]
                    for xy, lab in zip(pb.point_coords[0].tolist(), pb.point_labels[0].tolist())
                ]
            feeds = onnx_prompt_inputs(
                embedding[0].numpy(), image.shape[:2], box=box, points=points
            )
            masks, iou, _ = session.run(None, feeds)
            ref = logits[0].numpy()
            assert masks.shape == (1, 1, *image.shape[:2])
            assert np.abs(masks[0, 0] - ref).max() < LOGIT_TOL, (path.name, prompt)
            disagree = ((masks[0, 0] > 0) != (ref > 0)).mean()
            assert disagree < 1e-3, (path.name, prompt, disagree)
            assert iou[0, 0] == pytest.approx(float(scores[0]), abs=1e-4)
