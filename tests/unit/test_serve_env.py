"""The Serve fast-path environment: Ray's own port allocator must hand out exactly PORT."""

from __future__ import annotations

import ipaddress
import os
from concurrent import futures

import pytest
from cluster.actors.serve_app import serve_env
from ray.serve._private.node_port_manager import NoAvailablePortError
from ray.serve._private.node_port_manager import PortAllocator


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


def test_export_leaves_only_the_variables_of_this_platform(monkeypatch: pytest.MonkeyPatch
                                                          ) -> None:
    """A local Ray inherits this process's environment: a front door's variables exported
    for an earlier platform must not reach the next one's workers."""
    from cluster.actors.serve_app import CONTROLLER_ENV
    from cluster.actors.serve_app import export_serve_env

    # this process's environment is put back afterwards, whatever the exports did to it
    monkeypatch.setattr(os, "environ", {k: v for k, v in os.environ.items()
                                        if k not in {*serve_env(4000, 2), *CONTROLLER_ENV}})
    export_serve_env(4000, 2)
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "1"

    env = export_serve_env(5000, 1)
    assert env == serve_env(5000, 1)
    assert {k: os.environ.get(k) for k in serve_env(5000, 2)} == {
        k: env.get(k) for k in serve_env(5000, 2)}  # the front door's are gone
    assert os.environ["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"] == \
        CONTROLLER_ENV["RAY_SERVE_CONTROL_LOOP_INTERVAL_S"]

    assert export_serve_env(5000, 1, direct_ingress=False) == {}
    assert not any(k in os.environ for k in serve_env(5000, 2))


def test_the_front_door_is_given_the_connections_per_address() -> None:
    """HAProxy (several replicas) reads ``HTTP_CONNECTIONS`` from the variable its command
    reads (cluster.http.front_door); one replica bounds its own."""
    from cluster.config import Settings
    from cluster.http import front_door

    settings = Settings(http_connections=7, api_replicas=2)
    assert serve_env(4000, settings.replica_slots,
                     settings.http_connections)[front_door.CONNECTIONS_VAR] == "7"
    assert front_door.CONNECTIONS_VAR not in serve_env(4000, 1, 7)


def test_the_front_door_is_given_the_host() -> None:
    """HAProxy reads ``HOST`` (where it listens, where the replicas listen) from the variable
    its command reads (cluster.http.front_door), as the launcher binds it."""
    from cluster.http import front_door

    assert serve_env(4000, 2, 0, "::1")[front_door.HOST_VAR] == "::1"
    assert serve_env(4000, 2)[front_door.HOST_VAR] == "127.0.0.1"
    assert front_door.HOST_VAR not in serve_env(4000, 1, 0, "::1")


@pytest.mark.parametrize("node_ip", ["127.0.0.1", "::1"])
def test_the_inter_deployment_grpc_server_binds_the_node_address(
        node_ip: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Serve binds each replica's inter-deployment gRPC server on ``[::]:0``; wrapped, a real
    server listens on the node's address only (an IPv6 one in brackets)."""
    import grpc
    from cluster.actors.serve_app import _bind_internal_grpc_to
    from ray.serve._private import replica
    from tests.integration.processes import listening_addresses

    monkeypatch.setattr(replica, "add_port_to_grpc_server", replica.add_port_to_grpc_server)
    _bind_internal_grpc_to(node_ip)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
    try:
        port = replica.add_port_to_grpc_server(server, "[::]:0")
        server.start()
        mine = {ipaddress.ip_address(address) for (address, p)
                in listening_addresses([os.getpid()]) if p == port}
        # (gRPC listens on an IPv6 socket: an IPv4 address as its IPv4-mapped form)
        assert {getattr(ip, "ipv4_mapped", None) or ip for ip in mine} == {
            ipaddress.ip_address(node_ip)}
    finally:
        server.stop(None)


def test_a_single_replica_takes_the_clients_address_from_no_proxy() -> None:
    """X-Forwarded-For is read from the addresses the front door connects from, which runs
    where more than one replica can; a single replica has none to trust."""
    from cluster.actors.serve_app import front_door_sources

    assert front_door_sources("127.0.0.1", "10.0.0.5", 1) == ()
    assert front_door_sources("0.0.0.0", "10.0.0.5", 1) == ()
    assert {"127.0.0.1", "10.0.0.5", "::ffff:127.0.0.1"} <= set(
        front_door_sources("127.0.0.1", "10.0.0.5", 2))
