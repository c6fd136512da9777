"""Starting the platform's hosts on Ray (the ledger and one MachineHost per shard) and the
ports and TradingService over them.

Every host has ``max_restarts=-1``: Ray restarts a killed process and the host recovers its
machine from ``DATA_DIR`` before it answers. ``max_task_retries=0``: a call that was running
when the process died fails (the API answers 503) instead of being run a second time unseen;
the reconciler settles what it did; a call made while a host restarts fails at once
(:data:`RAY_SYSTEM_CONFIG`). Shards are spread round-robin over the nodes, workers
first, with soft affinity (a node that is gone does not stop a restart elsewhere).

A cluster whose ``DATA_DIR`` is each node's own disk pins each stateful host to the node that
holds its directory instead: that node advertises the custom resource ``shardex-host:<name>``
(``ray start --resources='{"shardex-host:shard-SOL-0": 1}'``), and the host asks for it, so Ray
starts and restarts it there only (a host whose node is gone waits for a node that advertises
it: the replacement its volume moved to). Once any node pins a host, every stateful host must
have one node that pins it: the start is refused otherwise, before a host could open an empty
directory on another node and serve without the state it had. A host Ray starts again on a node
without its journal refuses and ends for good (cluster.actors.host.HostSpec.runner), and so
does a host no node pins that runs where ``DATA_DIR`` is not the start's (:func:`marked`): a
node's own disk, which needs the pins.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from cluster.actors.host import HostSpec, host_class, host_specs
from cluster.actors.names import LEDGER
from cluster.actors.port import Port, RayPort
from cluster.config import Settings
from cluster.live.market import MarketSource
from cluster.live.topic_auth import SignedTopic
from cluster.trading.courier import Courier
from cluster.trading.placement import shard_layout
from cluster.trading.reconciler import Reconciler
from cluster.trading.service import TradingService
from engine.ledger_machine import AppliedSeq
from engine.shard_machine import ResumeSeq

RESTART = {"max_restarts": -1, "max_task_retries": 0}

RAY_SYSTEM_CONFIG: dict[str, int] = {
    # Ray parks a call that failed on a restarting actor, to learn why the actor died, and
    # releases it (ActorUnavailableError) only on its caller's once-a-second timer: 1-2 s
    # after the call, often long after the host was back, and a caller that tried again then
    # could be held for another round. At 0 the call fails at once (Unavailable, the API's
    # 503) and the next one reaches the new process as soon as it is up.
    "timeout_ms_task_wait_for_death_info": 0,
    # A process's shutdown first sends Ray's GCS its last task events (what `ray list tasks`
    # shows), waiting up to 5 s by default: all of it when the GCS has gone (a stop signal to
    # the whole process group of `up`, a head node that went). A GCS that is there takes
    # them in milliseconds.
    "task_events_shutdown_flush_timeout_ms": 1000,
}
"""Ray settings of every Ray the platform starts (``ray.init(_system_config=...)``: Ray hands
them to every process of that cluster); see :func:`ray_env` for a cluster it joins."""


def ray_env() -> dict[str, str]:
    """:data:`RAY_SYSTEM_CONFIG` as the ``RAY_<name>`` environment variables each Ray process
    reads when it starts: for the processes of a cluster someone else started (the launcher's
    own, and those it starts there through their runtime env); ``ray_config.yaml`` exports
    them on every node."""
    return {f"RAY_{name}": str(value) for name, value in RAY_SYSTEM_CONFIG.items()}


HEAD_RESOURCE = "node:__internal_head__"  # the resource only Ray's head node advertises


def ray_node() -> Any:
    """Ray's node object of this process (the handles of the processes a local Ray it started
    runs, its session directory), None before it connects (a driver that joined a cluster
    has one with no processes). Ray has no public call for it."""
    import ray

    return ray._private.worker._global_node


def shutdown_ray() -> None:
    """``ray.shutdown()``, a second sooner for a local Ray this process started: its
    autoscaler monitor is SIGKILLed first. Ray's shutdown ends the GCS before it, and the
    monitor's SIGTERM handler then waits on the GCS past Ray's second of grace, after which
    Ray kills it anyway. It holds nothing: a local Ray has no nodes for it to add. (A driver
    that joined a cluster has no processes of it.)"""
    import subprocess

    import ray
    from ray._private import ray_constants

    node = ray_node()
    processes: dict[str, list[Any]] = node.all_processes if node is not None else {}
    for info in processes.get(ray_constants.PROCESS_TYPE_MONITOR, []):
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            info.process.kill()
            info.process.wait(5.0)  # reaped: Ray's shutdown finds it gone
    ray.shutdown()


def placement_nodes() -> list[str]:
    """Alive node ids in shard placement order: worker nodes first, then the head."""
    import ray

    alive = [n for n in ray.nodes() if n.get("Alive")]
    alive.sort(key=lambda n: (HEAD_RESOURCE in n.get("Resources", {}), n["NodeID"]))
    return [n["NodeID"] for n in alive]


PIN_PREFIX = "shardex-host:"  # a node's custom resource that pins host <name> to it


def pinned_hosts(nodes: list[dict[str, Any]] | None = None) -> set[str]:
    """Names of the hosts that alive nodes pin (their ``shardex-host:<name>`` resources) of
    ``nodes`` (Ray's node list; None: ``ray.nodes()``). ValueError when two nodes pin one
    host: Ray would start it on either and could restart it on the other, in a directory
    without the state it had."""
    if nodes is None:
        import ray

        nodes = ray.nodes()
    pins = [key.removeprefix(PIN_PREFIX) for node in nodes if node.get("Alive")
            for key in node.get("Resources", {}) if key.startswith(PIN_PREFIX)]
    if twice := sorted({name for name in pins if pins.count(name) > 1}):
        raise ValueError(f"more than one node pins {', '.join(twice)} ({PIN_PREFIX}<name> "
                         "resources): pin each host to the one node that holds its directory")
    return set(pins)


def placement(name: str, pinned: set[str], node: str | None) -> dict[str, Any]:
    """Ray options placing host ``name``: on the node that pins it (hard), else softly on
    ``node`` (None: where Ray likes)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if name in pinned:
        # no CPU asked: an actor given resources of its own holds the CPU it is scheduled
        # with for as long as it runs (not only while it starts), so two hosts pinned to a
        # node of one CPU would leave the second one waiting for good
        return {"resources": {PIN_PREFIX + name: 1}, "num_cpus": 0}
    if node is None:
        return {}
    return {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}


def marked(spec: HostSpec, pinned: set[str], shared_mark: str | None) -> HostSpec:
    """``spec`` as started among the hosts ``pinned`` to their nodes: a host Ray may start
    on any node needs ``DATA_DIR`` to be one filesystem, so it checks that ``shared_mark``
    (a file the start wrote there) is under it on its node; a pinned one has its own disk."""
    if shared_mark is None or spec.name in pinned:
        return spec
    return dataclasses.replace(spec, shared_mark=shared_mark)


def start_hosts(settings: Settings, namespace: str, data_dir: str | None,
                ready_timeout_s: float, bootstrap: str | None = None,
                secret: bytes | None = None,
                shared_mark: str | None = None, made: bool = False) -> tuple[Any, dict[str, Any]]:
    """Start (named, in ``namespace``) the ledger host and every shard host; wait until each
    answers (recovered). Without ``data_dir`` the state lives in memory and a host is not
    restarted (it would come back empty). With ``bootstrap`` the ledger publishes its account
    events there, signed with ``secret`` (cluster.live.topic_auth; Ray restarts the ledger with the
    same one). ``shared_mark``: a file under ``data_dir`` that every host no node pins must
    find on its node (:func:`marked`). ``made``: an earlier start's hosts made their journals
    (HostSpec.made). Returns ``(ledger_handle, {shard name: handle})``."""
    import ray

    host = host_class()
    pinned = pinned_hosts()
    ledger_spec, shard_specs = host_specs(settings, data_dir, bootstrap=bootstrap,
                                          secret=secret, made=made)
    ledger_spec = marked(ledger_spec, pinned, shared_mark)
    shard_specs = {name: marked(spec, pinned, shared_mark)
                   for name, spec in shard_specs.items()}
    unpinned = [name for name in (LEDGER, *shard_specs) if name not in pinned]
    if pinned and unpinned:
        raise ValueError(f"nodes pin hosts to their disks ({PIN_PREFIX}<name> resources: "
                         f"{', '.join(sorted(pinned))}), but none pins {', '.join(unpinned)}: "
                         "pin every stateful host to the node that holds its directory, or "
                         "none")
    restart = RESTART if data_dir is not None else {}
    ledger = host.options(name=LEDGER, namespace=namespace, **placement(LEDGER, pinned, None),
                          **restart).remote(ledger_spec)
    nodes = placement_nodes()
    shards: dict[str, Any] = {
        name: host.options(name=name, namespace=namespace,
                           **placement(name, pinned, nodes[i % len(nodes)]),
                           **restart).remote(spec)
        for i, (name, spec) in enumerate(shard_specs.items())}
    ray.get([h.ping.remote() for h in [ledger, *shards.values()]], timeout=ready_timeout_s)
    # every shard continues the numbering the ledger knows (what Courier.resume does)
    names = list(shards)
    applied = ray.get(ledger.execute.remote([AppliedSeq(n) for n in names]),
                      timeout=ready_timeout_s)
    ray.get([shards[n].execute.remote([ResumeSeq(a)]) for n, a in zip(names, applied,
                                                                       strict=True)],
            timeout=ready_timeout_s)
    return ledger, shards


def ray_ports(ledger: Any, shards: Mapping[str, Any],
              timeout_s: float | None = 30.0) -> tuple[Port, dict[str, Port]]:
    """RayPorts over host handles."""
    return (RayPort(LEDGER, ledger, timeout_s),
            {name: RayPort(name, handle, timeout_s) for name, handle in shards.items()})


def reconcile_at_start(ledger: Any, shards: Mapping[str, Any]) -> dict[int, int]:
    """Before the API serves: the reconciler's start round (see Reconciler.start_round)."""
    async def run() -> dict[int, int]:
        ledger_port, shard_ports = ray_ports(ledger, shards)
        return await Reconciler(ledger_port, shard_ports,
                                Courier(ledger_port, shard_ports)).start_round()

    return asyncio.run(run())


def service_from_names(settings: Settings, *, namespace: str | None = None,
                       call_timeout_s: float | None = 30.0,
                       health_checks: Mapping[str, Callable[[], Awaitable[bool]]]
                       | None = None,
                       feed_stats: Callable[[], Awaitable[dict[str, Any]]] | None = None,
                       market: MarketSource | None = None,
                       account_topic: SignedTopic | None = None,
                       leading: Callable[[], bool] | None = None) -> TradingService:
    """A TradingService over the platform's named hosts in ``namespace`` (``ray.get_actor``),
    as an API replica, ``shardex audit`` and tests build it. Must run where Ray is
    initialised."""
    import ray

    ledger = ray.get_actor(LEDGER, namespace=namespace)
    shards = {spec.name: ray.get_actor(spec.name, namespace=namespace)
              for spec in shard_layout(settings)}
    ledger_port, shard_ports = ray_ports(ledger, shards, call_timeout_s)
    return TradingService(ledger_port, shard_ports, settings, health_checks=health_checks,
                          feed_stats=feed_stats, market=market, account_topic=account_topic,
                          leading=leading)
