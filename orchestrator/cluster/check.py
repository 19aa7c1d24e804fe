"""Offline checks of a Ray cluster-launcher YAML: Ray's own schema plus the project's rules.

`ray up` has no dry run. Ray's `prepare_config` + `validate_config` (private API of the pinned
Ray 2.60.0) fill defaults and check the schema without touching the cloud; the project rules
catch what the schema cannot see.
"""

from __future__ import annotations

import copy
import os
import re
from typing import Any

import yaml

from orchestrator.config import ConfigError

__all__ = ["check_cluster_config", "load_cluster_yaml"]


_IMAGE_VERSION = re.compile(r"^rayproject/ray(?:-ml)?:(\d+\.\d+\.\d+)")


def load_cluster_yaml(path: str | os.PathLike) -> dict[str, Any]:
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a YAML mapping (expected a Ray cluster-launcher config)")
    return data


def _images(cfg: dict[str, Any]) -> list[str]:
    docker = cfg.get("docker") or {}
    images = [docker.get(k) for k in ("image", "head_image", "worker_image")]
    for node in (cfg.get("available_node_types") or {}).values():
        nd = node.get("docker") or {}
        images += [nd.get(k) for k in ("image", "worker_image", "head_image")]
    return [i for i in images if i]


def _commands(cfg: dict[str, Any], *keys: str) -> str:
    return "\n".join(str(c) for k in keys for c in (cfg.get(k) or []))


# What only the tracking server may hold: its database URI (with the database password), the
# admin password and the Flask session key, as variables, files named by them, or the file
# cluster.yaml used to mount.
SERVER_SECRETS = (
    "INFOSAM_TRACKING_DB_URI",
    "MLFLOW_AUTH_ADMIN_PASSWORD",
    "MLFLOW_FLASK_SERVER_SECRET_KEY",
    "MLFLOW_BACKEND_STORE_URI",
    "mlflow-server.env",
)


_ALL_COMMANDS = (
    "initialization_commands",
    "setup_commands",
    "head_setup_commands",
    "worker_setup_commands",
    "head_start_ray_commands",
    "worker_start_ray_commands",
)


def _server_secret_problems(config: dict[str, Any]) -> list[str]:
    """A tracking-server secret on a Ray node is readable by every job there: jobs, the Ray
    processes and anything the setup starts run as one user in one container. File mounts
    reach every node, head included."""
    problems = []
    mounts = config.get("file_mounts") or {}
    synced = [*mounts.items(), *((f, f) for f in config.get("cluster_synced_files") or [])]
    node_commands = [
        str(c)
        for node in (config.get("available_node_types") or {}).values()
        for c in node.get("worker_setup_commands") or []
    ]
    commands = _commands(config, *_ALL_COMMANDS) + "\n" + "\n".join(node_commands)
    for secret in SERVER_SECRETS:
        hits = [f"file_mounts {target}" for target, src in synced if secret in f"{target} {src}"]
        if secret in commands:
            hits.append("the nodes' commands")
        if hits:
            problems.append(
                f"the tracking server's secret {secret} reaches the Ray nodes ({', '.join(hits)}): "
                "every job runs as the same user there and can read it; run `infosam tracking "
                "serve` on its own host and give the nodes only the jobs' account "
                "(MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"
            )
    if "tracking serve" in commands or "mlflow server" in commands:
        problems.append(
            "the MLflow server runs on a Ray node, where every job can read its environment "
            "(the database password, the admin password); run it on its own host"
        )
    return problems


def check_cluster_config(config: dict[str, Any]) -> list[str]:
    """Problems found (empty list = OK): Ray's own schema, then each of the project's rules
    (`RULES`, one function per concern, in the order a reader fixes them)."""
    return [problem for rule in RULES for problem in rule(config)]


def _ray_schema(config: dict[str, Any]) -> list[str]:
    """What `ray up` itself would refuse, found offline."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    try:
        validate_config(prepare_config(copy.deepcopy(config)))
    except Exception as exc:  # jsonschema / ValueError from Ray
        return [f"Ray schema: {str(exc).splitlines()[0]}"]
    return []


def _node_types(config: dict[str, Any]) -> list[str]:
    """Explicit resources and instance profiles; a CPU-less, GPU-less head that runs drivers;
    GPU workers that scale from zero."""
    problems: list[str] = []
    nodes: dict[str, Any] = config.get("available_node_types") or {}
    head = config.get("head_node_type")
    if head not in nodes:
        problems.append(
            f"head_node_type {head!r} is not one of available_node_types {sorted(nodes)}"
        )
    for name, node in nodes.items():
        res = node.get("resources")
        if not res:
            problems.append(
                f"node type {name!r} declares no resources (set them explicitly, e.g. {{CPU: 8, GPU: 1}})"
            )
            res = {}
        if not (node.get("node_config") or {}).get("InstanceType"):
            problems.append(f"node type {name!r} has no node_config.InstanceType")
        if not (node.get("node_config") or {}).get("IamInstanceProfile"):
            problems.append(
                f"node type {name!r} has no IamInstanceProfile: it cannot reach S3 storage"
            )
        problems += _head_rules(name, res) if name == head else _worker_rules(name, node, res)
    if not any(n.get("resources", {}).get("GPU", 0) for k, n in nodes.items() if k != head):
        problems.append("no worker node type has GPUs")
    return problems


def _head_rules(name: str, res: dict[str, Any]) -> list[str]:
    problems = []
    if res.get("GPU", 0):
        problems.append(f"head node {name!r} advertises GPUs: training must run on worker nodes")
    if res.get("CPU", 0):
        problems.append(
            f"head node {name!r} advertises CPU {res['CPU']}: it would run training/data tasks; set CPU: 0"
        )
    if not res.get("driver"):
        problems.append(
            f"head node {name!r} lacks the custom `driver` resource that benchmark/tune drivers request"
        )
    return problems


def _worker_rules(name: str, node: dict[str, Any], res: dict[str, Any]) -> list[str]:
    problems = []
    if res.get("driver"):
        problems.append(f"worker type {name!r} advertises `driver`: only the head may run drivers")
    if res.get("GPU", 0) and node.get("min_workers", 0) != 0:
        problems.append(
            f"GPU worker type {name!r} has min_workers {node.get('min_workers')}: idle GPUs cost money; use 0 and autoscale"
        )
    return problems


def _image_rules(config: dict[str, Any]) -> list[str]:
    """A current rayproject/ray image running the Ray this project pins."""
    import ray

    images = _images(config)
    if not images:
        return ["no docker image: use rayproject/ray:<installed version>-py311-gpu"]
    problems = []
    for image in images:
        if "ray-ml" in image:
            problems.append(
                f"image {image!r}: rayproject/ray-ml images are deprecated; use rayproject/ray:{ray.__version__}-py311-gpu"
            )
        m = _IMAGE_VERSION.match(image)
        if m and m.group(1) != ray.__version__:
            problems.append(
                f"image {image!r} runs Ray {m.group(1)} but this project pins Ray {ray.__version__}"
            )
    return problems


def _auth_and_binds(config: dict[str, Any]) -> list[str]:
    """Token authentication on every node; nothing listening on every interface."""
    problems = []
    start = _commands(config, "head_start_ray_commands", "worker_start_ray_commands")
    if "RAY_AUTH_MODE=token" not in _commands(
        config, "head_start_ray_commands"
    ) or "RAY_AUTH_MODE=token" not in _commands(config, "worker_start_ray_commands"):
        problems.append(
            "token authentication is not enabled on every node (export RAY_AUTH_MODE=token before `ray start`)"
        )
    if "0.0.0.0" in _commands(config, *_ALL_COMMANDS):
        problems.append(
            "a command binds to 0.0.0.0; bind to 127.0.0.1 (dashboard) or the private address (MLflow)"
        )
    if "--dashboard-host" in start and "--dashboard-host=127.0.0.1" not in start:
        problems.append(
            "the dashboard must bind to 127.0.0.1 (reach it with `ray dashboard cluster.yaml`)"
        )
    return problems


def _tracking_server_rules(config: dict[str, Any]) -> list[str]:
    """No runs in SQLite on a disposable head; no MLflow server without authentication."""
    problems = []
    head = _commands(config, "head_setup_commands")
    if "sqlite" in head:
        problems.append(
            "the MLflow server keeps runs in SQLite on the head: `ray down` deletes them; use "
            "PostgreSQL (INFOSAM_TRACKING_DB_URI) and `infosam tracking serve`"
        )
    if ("mlflow server" in head or "tracking serve" in head) and not (
        "--auth" in head or "basic-auth" in head
    ):
        problems.append(
            "the MLflow server runs without authentication: anyone in the VPC can read and "
            "write every run; add --auth (`infosam tracking serve --auth`)"
        )
    return problems


def _installs_project(config: dict[str, Any]) -> list[str]:
    """Every node installs the mounted checkout with its dependencies, pinned by the repo's
    constraints file, not a hand-written package list (one that lacked tabulate, pycocotools,
    tifffile, scipy and psutil would fail a paid benchmark at its last line)."""
    mounts = config.get("file_mounts") or {}
    checkout = next((t for t, src in mounts.items() if str(src).strip() in (".", "./")), None)
    if checkout is None:
        return ["file_mounts does not mount this checkout ('.') on the nodes"]
    setup = _commands(config, "setup_commands")
    lines = [line for line in setup.splitlines() if "pip install" in line]
    ok = any(
        re.search(rf"(-c|--constraint)[ =]{re.escape(checkout)}/constraints\.txt", line)
        and re.search(rf"(-e )?{re.escape(checkout)}(\[[\w,]+\])?(\s|$)", line)
        and "--no-deps" not in line
        for line in lines
    )
    if ok:
        return []
    return [
        f"setup_commands do not install the project on every node: use `pip install -c "
        f"{checkout}/constraints.txt -e {checkout}` (its pyproject.toml dependencies, pinned as "
        "CI tested them)"
    ]


RULES = (
    _ray_schema,
    _node_types,
    _image_rules,
    _auth_and_binds,
    _tracking_server_rules,
    _server_secret_problems,
    _installs_project,
)
