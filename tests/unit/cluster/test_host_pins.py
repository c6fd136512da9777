"""Which nodes pin which hosts to their disks (cluster.actors.deploy), from Ray's node list
alone: no Ray runs."""

from __future__ import annotations

from typing import Any

import pytest
from cluster.actors.deploy import pinned_hosts


def _nodes(*pins: dict[str, float], alive: bool = True) -> list[dict[str, Any]]:
    return [{"NodeID": f"node-{i}", "Alive": alive, "Resources": {"CPU": 1.0, **extra}}
            for i, extra in enumerate(pins)]


def test_the_hosts_alive_nodes_pin_are_named() -> None:
    nodes = _nodes({"shardex-host:ledger": 1}, {"shardex-host:shard-SOL-0": 1}, {})
    nodes += _nodes({"shardex-host:shard-BTC-0": 1}, alive=False)
    assert pinned_hosts(nodes) == {"ledger", "shard-SOL-0"}


def test_a_host_two_nodes_pin_is_refused() -> None:
    # Ray could start (and restart) the ledger on either node: on the one without its
    # directory it would serve an empty ledger
    nodes = _nodes({"shardex-host:ledger": 1, "shardex-host:shard-SOL-0": 1},
                   {"shardex-host:ledger": 1})
    with pytest.raises(ValueError, match="more than one node pins ledger "):
        pinned_hosts(nodes)


def test_a_dead_node_that_pinned_a_host_leaves_it_to_its_replacement() -> None:
    nodes = _nodes({"shardex-host:ledger": 1}) + _nodes({"shardex-host:ledger": 1}, alive=False)
    assert pinned_hosts(nodes) == {"ledger"}
