"""Shared fixtures: a tiny SAM on CPU and a small deterministic batch of shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from infosam.prompts import sample_prompts
from infosam.sam import PromptableSam, build_sam

torch.set_num_threads(2)


def make_batch(n: int = 4, size: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """Ellipses on a noisy background, brighter inside: learnable in a few steps."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    images, masks = [], []
    for _ in range(n):
        cy, cx = rng.uniform(0.3, 0.7, 2) * size
        ry, rx = rng.uniform(0.1, 0.25, 2) * size
        m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        img = rng.normal(90, 25, (size, size, 3)) + m[..., None] * rng.uniform(60, 100, 3)
        images.append(np.clip(img, 0, 255).astype(np.uint8).transpose(2, 0, 1))
        masks.append(m.astype(np.uint8))
    return {
        "image": torch.from_numpy(np.stack(images)),
        "mask": torch.from_numpy(np.stack(masks)),
        "input_size": torch.tensor([[size, size]] * n),
    }


@pytest.fixture
def batch() -> dict[str, torch.Tensor]:
    return make_batch()


@pytest.fixture
def box_prompts(batch):
    return sample_prompts(batch["mask"], "box", generator=torch.Generator().manual_seed(0))


@pytest.fixture
def tiny_sam():
    torch.manual_seed(0)
    return build_sam("tiny")


@pytest.fixture
def teacher():
    torch.manual_seed(0)
    model = PromptableSam(build_sam("tiny")).eval()
    model.requires_grad_(False)
    return model


@pytest.fixture(scope="session")
def _ray_session():
    import ray

    yield
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def ray_local(_ray_session):
    """A real local Ray on the 2 CPUs of a CI machine, shared by the Ray tests of a session
    (started again if a multi-node test shut it down to start its own cluster)."""
    import os

    import ray

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    if not ray.is_initialized():
        ray.init(
            num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False
        )
    return ray


@pytest.fixture(scope="session")
def synthetic_root(tmp_path_factory):
    """Small synthetic camouflage datasets shared by the training tests."""
    from orchestrator.data.synthetic import synthesize

    root = tmp_path_factory.mktemp("synthetic")
    synthesize(
        root, ["camouflage"], seed=0, counts={"train": 32, "val": 8, "test": 8}, sheets=False
    )
    # the teacher's own domain, for benchmark.retention (only its test split is scored)
    synthesize(root, ["general"], seed=0, counts={"train": 2, "val": 2, "test": 8}, sheets=False)
    return root


@pytest.fixture
def dataset(tmp_path, synthetic_root):
    """A private copy of the synthetic camouflage dataset (caches are written next to shards)."""
    import shutil

    root = tmp_path / "data"
    shutil.copytree(synthetic_root / "camouflage", root / "camouflage")
    return root


@pytest.fixture
def ray_s3(_ray_session, s3):
    """A local Ray whose workers reach the `s3` server (its AWS_* variables in the job's
    runtime env, as an instance profile gives every node on a cluster); stopped after, so the
    next `ray_local` starts one without them."""
    import os

    import ray

    if ray.is_initialized():
        ray.shutdown()
    aws = {k: v for k, v in os.environ.items() if k.startswith("AWS_")}
    ray.init(num_cpus=2, log_to_driver=False, runtime_env={"env_vars": aws})
    yield ray
    ray.shutdown()


@pytest.fixture
def s3(monkeypatch):
    """A real S3-protocol server on loopback (moto's server mode, as Ray's and MLflow's own tests
    use), with bucket `bkt`; the project reaches it through AWS_ENDPOINT_URL like any
    S3-compatible store. Yields a boto3 client for assertions; the server is stopped after."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "test-key",
        "AWS_SECRET_ACCESS_KEY": "test-secret",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    import urllib.request

    # moto keeps its buckets in process-wide state: start every test from an empty store
    urllib.request.urlopen(
        urllib.request.Request(f"{env['AWS_ENDPOINT_URL']}/moto-api/reset", method="POST")
    )
    client = boto3.client("s3")
    client.create_bucket(Bucket="bkt")
    try:
        yield client
    finally:
        server.stop()
