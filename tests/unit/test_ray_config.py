"""ray_config.yaml is a cluster-launcher file Ray itself accepts (checked offline, no Ray)."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from cluster.actors.deploy import ray_env
from ray.autoscaler._private.util import prepare_config
from ray.autoscaler._private.util import validate_config

REPO = Path(__file__).resolve().parents[2]
CONFIG_PATH = REPO / "ray_config.yaml"


def _load() -> dict[str, Any]:
    config = yaml.safe_load(CONFIG_PATH.read_text())
    assert isinstance(config, dict)
    return config


def test_ray_validator_accepts_the_cluster_file() -> None:
    import ray

    connected_before = ray.is_initialized()  # another suite's session Ray may be up
    prepared = prepare_config(_load())
    validate_config(prepared)  # raises on any schema or consistency error
    assert ray.is_initialized() == connected_before  # validation starts no Ray


def test_head_and_worker_node_types_and_commands() -> None:
    config = _load()
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [name for name in types if name != config["head_node_type"]]
    assert workers, "a worker node type is required to scale out"
    assert all(types[w]["min_workers"] >= 1 for w in workers)
    # The project itself is installed on every node from the checkout that is mounted there.
    assert any("pip install" in cmd and "~/shardex" in cmd for cmd in config["setup_commands"])
    assert config["file_mounts"]["~/shardex"] == "."
    assert (REPO / "pyproject.toml").exists()
    head = " ".join(config["head_start_ray_commands"])
    worker = " ".join(config["worker_start_ray_commands"])
    assert "ray start --head" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in worker
    # Serve's direct-ingress port range is half-open: [4000, 4001) is exactly port 4000.
    for text in (head, worker):
        assert "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT=4000" in text
        assert "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT=4001" in text
        # every process on every node has the Ray settings the launcher gives a Ray it starts
        for name, value in ray_env().items():
            assert f" {name}={value}" in f" {text.replace(chr(10), ' ')}", name


@pytest.mark.parametrize("breakage", ["unknown_field", "head_type_missing", "min_over_max"])
def test_validator_rejects_broken_variants(breakage: str) -> None:
    config = copy.deepcopy(_load())
    if breakage == "unknown_field":
        config["no_such_option"] = 1
    elif breakage == "head_type_missing":
        config["head_node_type"] = "not.a.type"
    else:
        config["max_workers"] = 0
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        validate_config(prepare_config(config))
