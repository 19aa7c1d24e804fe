"""cluster.yaml passes Ray's own offline validation and the project's rules; broken ones fail."""

import copy

import pytest

from orchestrator.cli import main as cli
from orchestrator.cluster.check import check_cluster_config, load_cluster_yaml
from tests.helpers import ROOT

CLUSTER = ROOT / "cluster.yaml"


@pytest.fixture(scope="module")
def good():
    return load_cluster_yaml(CLUSTER)


def test_shipped_cluster_yaml_passes(good, capsys):
    assert check_cluster_config(good) == []
    assert cli(["cluster", "check", str(CLUSTER)]) == 0


def _break(cfg, how):
    c = copy.deepcopy(cfg)
    how(c)
    return c


def _set(path, value):
    def f(c):
        node = c
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value

    return f


def _drop(path):
    def f(c):
        node = c
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]

    return f


BROKEN = {
    "head runs GPU work": (
        _set(["available_node_types", "head", "resources"], {"CPU": 0, "GPU": 1, "driver": 4}),
        "advertises GPUs",
    ),
    "head runs CPU tasks": (
        _set(["available_node_types", "head", "resources"], {"CPU": 8, "driver": 4}),
        "set CPU: 0",
    ),
    "no driver resource": (
        _set(["available_node_types", "head", "resources"], {"CPU": 0}),
        "driver",
    ),
    "undeclared resources": (
        _drop(["available_node_types", "gpu_4x", "resources"]),
        "declares no resources",
    ),
    "ray version mismatch": (
        _set(["docker", "image"], "rayproject/ray:2.40.0-py311-gpu"),
        "runs Ray 2.40.0",
    ),
    "ray-ml image": (_set(["docker", "image"], "rayproject/ray-ml:2.60.0-py311-gpu"), "deprecated"),
    "no instance type": (
        _drop(["available_node_types", "gpu_1x_spot", "node_config", "InstanceType"]),
        "InstanceType",
    ),
    "no IAM profile": (
        _drop(["available_node_types", "gpu_4x", "node_config", "IamInstanceProfile"]),
        "S3",
    ),
    "always-on GPUs": (_set(["available_node_types", "gpu_4x", "min_workers"], 2), "min_workers"),
    "no token auth": (
        _set(["worker_start_ray_commands"], ["ray stop", "ray start --address=$RAY_HEAD_IP:6379"]),
        "token authentication",
    ),
    "public bind": (
        _set(["head_setup_commands"], ["mlflow server --host 0.0.0.0 --auth"]),
        "0.0.0.0",
    ),
    "runs on the head's disk": (
        _set(["head_setup_commands"], ["mlflow server --backend-store-uri sqlite:///m.db --auth"]),
        "ray down",
    ),
    "no tracking auth": (
        _set(["head_setup_commands"], ["infosam tracking serve --host 10.0.0.1"]),
        "without authentication",
    ),
    "server secrets mounted on every node": (
        _set(
            ["file_mounts", "/home/ray/secrets/mlflow-server.env"], "~/.infosam/mlflow-server.env"
        ),
        "secret mlflow-server.env reaches the Ray nodes (file_mounts",
    ),
    "server secrets in a setup command": (
        _set(["head_setup_commands"], ["export MLFLOW_AUTH_ADMIN_PASSWORD=$(cat /tmp/pw)"]),
        "secret MLFLOW_AUTH_ADMIN_PASSWORD reaches the Ray nodes (the nodes' commands)",
    ),
    "server on a Ray node": (
        _set(["head_setup_commands"], ["infosam tracking serve --auth --host 10.0.0.1"]),
        "the MLflow server runs on a Ray node",
    ),
    "a hand-written package list": (
        _set(["setup_commands"], ["pip install torch segment-anything mlflow pandas"]),
        "do not install the project on every node",
    ),
    "the project without its dependencies": (
        _set(
            ["setup_commands"],
            ["pip install --no-deps -c /home/ray/infosam/constraints.txt -e /home/ray/infosam"],
        ),
        "do not install the project on every node",
    ),
    "the project unpinned": (
        _set(["setup_commands"], ["pip install -e /home/ray/infosam"]),
        "constraints.txt",
    ),
    "schema violation": (_set(["max_workers"], "many"), "Ray schema"),
    "unknown head type": (_set(["head_node_type"], "nope"), "head_node_type"),
}


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_broken_variant_is_rejected(good, name, tmp_path, capsys):
    how, fragment = BROKEN[name]
    cfg = _break(good, how)
    problems = check_cluster_config(cfg)
    assert any(fragment in p for p in problems), problems
    import yaml

    (tmp_path / "c.yaml").write_text(yaml.safe_dump(cfg))
    assert cli(["cluster", "check", str(tmp_path / "c.yaml")]) == 1
