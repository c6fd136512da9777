"""The Serve fast-path environment: Ray's own port allocator must hand out exactly PORT."""

from __future__ import annotations

import pytest
from ray.serve._private.node_port_manager import NoAvailablePortError, PortAllocator

from cluster.serve_app import serve_env


@pytest.mark.parametrize("port", [4000, 18080])
def test_direct_ingress_range_is_exactly_the_public_port(port: int) -> None:
    env = serve_env(port)
    assert env["RAY_SERVE_THROUGHPUT_OPTIMIZED"] == "1"
    allocator = PortAllocator(int(env["RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"]),
                              int(env["RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT"]),
                              protocol="HTTP", node_id="node")
    assert allocator.allocate("replica-1") == port
    with pytest.raises(NoAvailablePortError):  # one replica per node owns the port
        allocator.allocate("replica-2")


def test_all_values_are_strings_for_runtime_env() -> None:
    assert all(isinstance(v, str) for v in serve_env(4000).values())
