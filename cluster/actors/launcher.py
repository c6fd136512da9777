"""``shardex up | engine | status | audit``: the platform as a running Ray cluster.

``up`` starts (or joins, ``RAY_ADDRESS``) Ray, the embedded broker (unless ``KAFKA_BROKERS``),
the ledger host, one shard host per ``cluster.trading.placement.shard_layout`` spread over the
cluster's nodes (cluster.actors.deploy), the feed actor (Kafka -> shards), the feed source
(unless ``engine``), and the Serve API on ``PORT``; prints one banner and runs in the
foreground. Ctrl-C / SIGTERM stops, in reverse order, exactly what it started: the API
first, while the actors behind it still answer (its requests in flight finish, its WebSocket
clients get a close frame 1001), then the feed actor (its shard calls end, its candle store
closes), then the shards and the ledger are closed (final snapshots, at once, bounded) and
killed, then Ray and the broker. ``Platform`` is the same thing as an object, for tests and
benchmarks.

Actors are named (``cluster.actors.names``) in the ``shardex`` namespace and owned by the ``up``
process (not detached): ``status`` and ``audit`` find them by name while it runs, and a killed
``up`` takes them with it. ``up`` runs the durable platform (journaled ledger and shards in
DATA_DIR, restarted by Ray, reconciled before the API serves); ``audit --offline`` recovers
that state from DATA_DIR without Ray and without writing to it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import errno
import fcntl
import functools
import json
import logging
import os
import re
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from cluster.actors.names import FEED, LEDGER, NAMESPACE
from cluster.config import EMBEDDED_BROKER, MARKET_TOPIC, ConfigError, Settings, http_url
from cluster.live.topic_auth import new_secret
from cluster.trading.placement import ShardSpec, shard_layout, split_of_name
from engine.ledger import AuditDifference
from engine.market import Tick
from engine.messages import ShardStats
from engine.shard_machine import LastTick, Stats
from feed.broker import (
    BROKER_RECORD,
    BrokerError,
    BrokerPortInUse,
    ProcessIdentity,
    accepts_connections,
    aiokafka_quiet,
    check_bindable,
    ensure_topic,
)

log = logging.getLogger(__name__)

FEED_RESTART = {"max_restarts": -1, "max_task_retries": -1}  # its calls are safe to repeat
READY_TIMEOUT_S = 120.0  # actors and the API must be up within this
ADDRESS_FILE = "ray-address.json"  # in DATA_DIR while `up` runs (local or joined)
# in DATA_DIR: flock'd by the run using it, from before its first write there to its stop
# (the kernel lets go when that process dies, however it dies: a kill -9 leaves nothing held)
RUN_LOCK = "platform.lock"
BROKER_LOG = "embedded-broker.log"  # in DATA_DIR: its output, kept across starts and crashes
ATTACH_CHECK_TIMEOUT_S = 2.0  # status/audit: how long a recorded Ray may take to answer TCP
CRASHED_RUN_WAIT_S = 15.0  # how long a start waits for a killed run's workers to exit
HELD_JOURNAL_WAIT_S = 5.0  # ... and after a clean stop, for a journal another process holds
TIME_WAIT_S = 65.0  # ... and for its closed connections to leave the API port (Linux: 60 s)
# a stop waits this long for the API to finish its requests and close its WebSockets (the
# replicas' own bounds, cluster.actors.serve_app, plus Serve's control loop); then it goes on
API_STOP_TIMEOUT_S = 15.0
FEED_STOP_TIMEOUT_S = 10.0  # ... for the feed actor's calls to the shards to end
# ... and this long in all for the shards' and the ledger's final snapshots (a few ms to a
# second each, all at once); a host that has not closed by then is killed without one
HOST_CLOSE_TIMEOUT_S = 10.0
SUPERVISE_INTERVAL_S = 1.0  # how soon the supervisor notices a dead broker or feed actor
TOPIC_WAIT_S = 30.0  # how long a start waits for the broker to create the market topic
TOPIC_QUIET_S = 2.0  # ... before it says what it waits for (an embedded one elects itself)


class LaunchError(RuntimeError):
    """The platform could not start (port in use, broker failed, actor failed, ...)."""


def front_door_off_the_head(settings: Settings, nodes: list[dict[str, Any]],
                            node_id: str) -> str | None:
    """Why the API of ``settings`` cannot start on node ``node_id`` of ``nodes`` (Ray's node
    list), or None: with more than one replica it has HAProxy in front, which Serve runs on the
    head node only while the replicas go on this node, so nothing would answer PORT here (the
    start waited for it until READY_TIMEOUT_S) and the replicas would not take the client
    addresses HAProxy sends from another node."""
    from cluster.actors.deploy import HEAD_RESOURCE

    if settings.replica_slots <= 1:
        return None
    heads = [n["NodeID"] for n in nodes if n.get("Alive") and HEAD_RESOURCE in n.get(
        "Resources", {})]
    if not heads or node_id in heads:
        return None
    var = "API_MAX_REPLICAS" if settings.api_max_replicas else "API_REPLICAS"
    return (f"{var}={settings.replica_slots} puts HAProxy on PORT, which Serve runs on the "
            "head node of the Ray cluster only, and this node is not its head: start there, "
            "or with one API replica")


def embedded_broker_off_this_machine(nodes: list[dict[str, Any]], node_id: str) -> str | None:
    """Why the embedded broker cannot serve the cluster of ``nodes`` (Ray's node list) joined
    from node ``node_id``, or None: it listens on 127.0.0.1 of this machine, and Ray may place
    the ledger (which publishes account events) and the feed actor on any node: on another
    machine they could not reach it (the events lost without a sign, the feed failing late)."""
    here = next((n.get("NodeManagerAddress") for n in nodes if n.get("NodeID") == node_id),
                None)
    others = sorted({str(n.get("NodeManagerAddress")) for n in nodes if n.get("Alive")
                     and n.get("NodeManagerAddress") != here})
    if here is None or not others:
        return None
    return (f"KAFKA_BROKERS is unset: the embedded broker listens on 127.0.0.1 of this "
            f"machine ({here}), which the ledger and the feed actor cannot reach from the "
            f"cluster's other machines ({', '.join(others)}); set KAFKA_BROKERS to a Kafka "
            "every node reaches")


def port_is_free(host: str, port: int) -> bool:
    """Whether the API server could listen on ``host:port`` (bound the way it binds, so
    connections of a killed run left in TIME_WAIT do not count)."""
    try:
        check_bindable(host, port)
    except OSError:
        return False
    return True


@dataclass
class Platform:
    """Everything ``up`` starts, as one object: ``start()``, then ``stop()`` (or ``with``).

    ``with_feed``: run the FEED_SOURCE source in this process (a background thread publishing
    to the topic). ``bootstrap``: use this Kafka instead of starting the embedded broker (tests
    pass their session broker). ``ray_init``: extra ``ray.init`` keyword arguments for a local
    Ray. ``host``: where the API listens.
    """

    settings: Settings
    with_feed: bool = True
    bootstrap: str | None = None
    host: str = "127.0.0.1"
    namespace: str = NAMESPACE
    ray_init: dict[str, Any] = field(default_factory=dict)
    topic: str = MARKET_TOPIC
    direct_ingress: bool = True  # False: Serve's proxy on the port (slower: README figures)
    broker_port: int | None = None  # the embedded broker's port; None = config's default
    cancel: threading.Event | None = None  # set: a start waiting on a killed run gives up
    # journaled hosts in DATA_DIR that Ray restarts (what `up` runs); False: memory only
    durable: bool = False
    released_at_start: dict[int, int] = field(default_factory=dict)
    # what the ledger signs its account events with and the API replicas check them by
    # (cluster.live.topic_auth); new at each start, handed to both through Ray only
    account_secret: bytes = field(default=b"", repr=False)

    url: str = ""
    layout: tuple[ShardSpec, ...] = ()
    ledger: Any = None
    feed: Any = None
    shards: dict[str, Any] = field(default_factory=dict)
    source_name: str = "none"
    _broker: Any = None
    _ray_started: bool = False
    _ray_starting: bool = False  # ray.init of a local Ray is under way
    # the children seen by _ray_down while ray.init runs (Ray's processes among them)
    _init_children: dict[tuple[int, int], tuple[str, str]] = field(default_factory=dict)
    _serve_started: bool = False
    _api_deployed: bool = False  # the start got as far as deploying the API (stopped first)
    _recorded: bool = False  # this run wrote DATA_DIR's address file (removed at stop)
    _run_lock: int | None = None  # the descriptor holding DATA_DIR's RUN_LOCK
    _feed_thread: threading.Thread | None = None
    _feed_stop: Callable[[], object] | None = None  # asks the feed thread's loop to stop
    _supervisor: threading.Thread | None = None
    _supervising: threading.Event = field(default_factory=threading.Event)
    _broker_lock: threading.Lock = field(default_factory=threading.Lock)
    _starting: bool = False  # a start is under way (set and cleared under _broker_lock)
    # seconds each step of the last start took, in order (printed in the banner)
    phases_s: dict[str, float] = field(default_factory=dict)

    # ------------------------------------------------------------------ start
    def start(self) -> Platform:
        with self._broker_lock:
            self._starting = True
        try:
            self._start()
        except BaseException:
            self.stop()
            raise
        finally:
            with self._broker_lock:  # (what give_up_start holds)
                self._starting = False
        return self

    @property
    def starting(self) -> bool:
        """Whether a start is under way (its failure's stop included)."""
        return self._starting

    def _start(self) -> None:
        self._refuse_a_broker_on_the_api()
        self.account_secret = new_secret()
        if not self.settings.ray_address and "ray" not in sys.modules:
            # A Ray started here is single-host: without this, Ray advertises the host's first
            # interface instead of the loopback address it was asked for. Read at import.
            os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        import ray

        from cluster.actors.deploy import RAY_SYSTEM_CONFIG, ray_env
        from cluster.actors.serve_app import deploy_api, export_serve_env, start_serve
        from feed.source import make_source, parse_source

        settings = self.settings
        self.layout = shard_layout(settings)
        if self.durable:
            check_layout(settings)  # recorded once the start is sure to go ahead (below)
        source = None
        if self.with_feed:
            try:  # a bad FEED_SOURCE fails before anything starts
                source = make_source(settings)
            except ConfigError:
                raise
            except (ValueError, OSError) as exc:  # a recording it cannot play: a setting too
                raise ConfigError(str(exc)) from exc
            self.source_name = parse_source(settings.feed_source).kind if source else "none"
        self.phases_s.clear()
        mark = time.monotonic()

        def phase(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            self.phases_s[name] = now - mark
            mark = now
            if self.cancel is not None and self.cancel.is_set():
                # a stop signal during the start: what was started is stopped now, not after
                # the rest of the start (about 10 s)
                raise LaunchError(f"start cancelled after {name}")

        env = export_serve_env(settings.port, settings.replica_slots, self.direct_ingress,
                               settings.http_connections, self.host)
        joining = bool(settings.ray_address) and not ray.is_initialized()
        # a cluster someone else started has its own system config: this process reads the
        # platform's Ray settings from its environment, the actors it starts from their
        # runtime env
        joined_env = ray_env() if joining else {}
        if joining:
            if silent := _silent_ray_address(settings.ray_address or ""):
                raise LaunchError(silent)
            os.environ.update(joined_env)
            # first: the API a killed joined run left on the cluster holds PORT until removed
            _ray_init(address=settings.ray_address, namespace=self.namespace,
                      runtime_env={"env_vars": {**env, **joined_env}}, log_to_driver=False,
                      logging_level=logging.WARNING)
            self._refuse_what_this_machine_cannot_serve()
            self._refuse_a_second_platform()  # and remove the API a killed run left
            phase("ray")
        self._take_over_data_dir()
        phase("data dir")  # refused if in use, or waited for after a crashed run
        try:
            check_bindable(self.host, settings.port)
        except OSError as problem:
            if problem.errno != errno.EADDRINUSE:
                # a name that does not resolve, an address of another machine, a privileged port
                raise LaunchError(f"cannot listen on {self.host}:{settings.port}: "
                                  f"{problem.strerror or problem} (set HOST to a name or "
                                  "address of this machine, or PORT)") from None
            if accepts_connections(self.host, settings.port):
                raise LaunchError(f"port {settings.port} on {self.host} is already in use "
                                  "(set PORT, or stop what holds it)") from None
            raise LaunchError(f"port {settings.port} on {self.host} is still held by closed "
                              "connections of a server that ended (TIME_WAIT, up to 60 s); "
                              "retry in a minute, or set PORT") from None
        self._start_broker()
        assert self.bootstrap is not None
        asyncio.run(self._ensure_topic(self.bootstrap))
        phase("broker")

        if joining:
            self._write_address_file()  # `status`/`audit` from DATA_DIR find this cluster
        elif ray.is_initialized():
            log.info("using the Ray this process is already connected to")
        else:
            options: dict[str, Any] = {
                "num_cpus": max(2, os.cpu_count() or 2),
                "include_dashboard": False,
                "object_store_memory": 1 << 30,  # positions move as numpy arrays; 1 GiB is ample
                "log_to_driver": False,  # actor logs stay in the Ray session's log directory
                "logging_level": logging.WARNING,
                "_node_ip_address": "127.0.0.1",  # a local Ray needs no other interface
            }
            options.update(self.ray_init)
            # Ray prestarts a worker per CPU when the first driver connects: on a machine with
            # more CPUs than the platform has actors, the rest would only sit idle (~80 MiB and
            # ~0.007 cores each, README "Processes and idle cost"). Workers start when an actor
            # needs one instead.
            options["_system_config"] = {"prestart_worker_first_driver": False,
                                         **RAY_SYSTEM_CONFIG,
                                         **self.ray_init.get("_system_config", {})}
            # address="local": always a new Ray, never attach to one found on the machine
            options.setdefault("address", "local")
            # no runtime env: this Ray's raylet and workers inherit the Serve variables
            # exported above (cluster.actors.serve_app), and a worker needs no runtime env agent
            self._ray_starting = True
            try:
                _ray_init(namespace=self.namespace, **options)
            finally:
                self._ray_starting = False
            self._ray_started = True
            self._write_address_file()
            phase("ray")
        if self.durable:
            # before the hosts write anything; a start refused before here (its port, its
            # broker, its Ray) records no layout, so the next try may use another SHARDS
            check_layout(settings, record=True)
        # Serve's controller needs none of the actors: it starts while they recover
        serving = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="serve-start")
        self._serve_started = True
        controller = serving.submit(start_serve, settings, host=self.host,
                                    extra_env=joined_env, direct_ingress=self.direct_ingress,
                                    inherited=self._ray_started)
        try:
            consuming = self._start_actors(phase)
            controller.result(READY_TIMEOUT_S)
        finally:
            serving.shutdown(wait=True)
        phase("serve controller (the wait after the actors)")
        self._api_deployed = True
        self.url = deploy_api(settings, self.bootstrap, self.account_secret,
                              namespace=self.namespace, host=self.host,
                              extra_env=joined_env, direct_ingress=self.direct_ingress,
                              timeout_s=READY_TIMEOUT_S, inherited=self._ray_started)
        phase("api")
        if not ray.get(consuming, timeout=READY_TIMEOUT_S):
            raise LaunchError(f"the feed actor could not consume {self.topic} on "
                              f"{self.bootstrap}")
        phase("feed actor (the wait after the api)")
        self._supervising.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="feed-supervisor",
                                            daemon=True)
        self._supervisor.start()
        if source is not None:
            self._resume_source(source)
            self._start_feed_thread(source)

    def _refuse_a_broker_on_the_api(self) -> None:
        """LaunchError when the embedded broker would listen on a port of the API: it starts
        first and takes the port, and the API then fails to deploy after Ray has started."""
        if self.bootstrap is not None or self.settings.kafka_brokers:
            return  # no embedded broker
        broker = self.broker_port or int(EMBEDDED_BROKER.rpartition(":")[2])
        ports = self.settings.api_ports
        if broker in ports:
            taken = f"PORT {ports[0]}" if len(ports) == 1 else \
                f"PORT {ports[0]} and the front door's ports up to {ports[-1]}"
            raise LaunchError(f"the embedded broker's port {broker} is one the API listens on "
                              f"({taken}): set another PORT, or move the broker with "
                              "--broker-port")

    def _refuse_what_this_machine_cannot_serve(self) -> None:
        import ray

        nodes, here = ray.nodes(), ray.get_runtime_context().get_node_id()
        if self.direct_ingress and (fault := front_door_off_the_head(self.settings, nodes,
                                                                     here)):
            raise LaunchError(fault)
        if self.bootstrap is None and not self.settings.kafka_brokers and (
                fault := embedded_broker_off_this_machine(nodes, here)):
            raise LaunchError(fault)

    @property
    def address_file(self) -> Path:
        return self.settings.data_dir / ADDRESS_FILE

    def _refuse_a_second_platform(self) -> None:
        """One Ray cluster runs one platform (its actors and Serve app have fixed names): a
        start on a cluster where one answers stops here, before it could touch the other's
        API (stopping a half-started platform removes the cluster's Serve app).

        A joined ``up`` killed with ``kill -9`` takes its actors with it, but Serve's (the API
        app, its replica on PORT, HAProxy) outlive it on the cluster. With no ledger named on
        the cluster (not even one Ray is restarting) that API belongs to no platform: remove
        it as a stop would have, and wait for its port."""
        import ray

        from cluster.actors.serve_app import api_deployed, shutdown_api

        try:
            ledger = ray.get_actor(LEDGER, namespace=self.namespace)
        except ValueError:  # no ledger named: no platform here
            ledger = None
        except Exception:  # the cluster does not answer: leave whatever runs there alone
            return
        if ledger is not None:
            try:
                ray.get(ledger.ping.remote(), timeout=5.0)
            except Exception:  # its platform died, or its ledger is restarting: leave its API
                return
            raise LaunchError(f"a platform already runs on the Ray cluster at "
                              f"{self.settings.ray_address} (namespace {self.namespace}): a "
                              "cluster runs one platform; stop that one first, or use another "
                              "cluster")
        if not api_deployed():
            return
        log.warning("removing the API that a platform which did not stop left on the Ray "
                    "cluster at %s", self.settings.ray_address)
        shutdown_api()
        deadline = time.monotonic() + CRASHED_RUN_WAIT_S
        while not port_is_free(self.host, self.settings.port) and time.monotonic() < deadline:
            time.sleep(0.1)  # its replica or HAProxy exits a moment after Serve lets it go

    def _write_address_file(self) -> None:
        """Record this run's Ray address (local or joined) so ``status``/``audit`` join this
        cluster, not whichever local Ray started last; and who runs it (host, pid, start
        time), so a record a crashed run left is recognised as such."""
        import ray

        owner = ProcessIdentity.of(os.getpid())
        with contextlib.suppress(OSError):
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            self._recorded = True
            self.address_file.write_text(json.dumps({
                "ray_address": ray.get_runtime_context().gcs_address,
                # a new local Ray enables token auth (token in ~/.ray); joiners need the mode
                "ray_auth_mode": os.environ.get("RAY_AUTH_MODE"),
                "url": http_url(self.host, self.settings.port), "pid": os.getpid(),
                "host": socket.gethostname(), "owner": owner.to_json() if owner else None,
                # a copy of DATA_DIR (a backup restored elsewhere) is told by it
                "data_dir": str(self.settings.data_dir.resolve()),
                # what a start after a kill -9 of this run ends of its Ray (a local one only)
                "ray_session_dir": (node.get_session_dir_path()
                                    if (node := self._own_node()) is not None else None)}))

    def _take_over_data_dir(self) -> None:
        """Refuse a DATA_DIR a running platform uses; after a crashed run, wait for its
        processes to let go of the API port and the journals: at most ``CRASHED_RUN_WAIT_S``,
        or ``TIME_WAIT_S`` while only closed connections of the killed server hold the port.

        A killed ``up`` takes its local Ray with it, but Ray's workers (the API replica on
        the port, the actors holding their journal's lock) notice only a moment later.
        """
        where = self.settings.data_dir.resolve()
        self._hold_data_dir(where)
        try:
            self._wait_for_a_killed_run(where)
        except BaseException:  # refused: this start holds nothing
            self._release_data_dir()
            raise

    def _wait_for_a_killed_run(self, where: Path) -> None:
        """(:meth:`_take_over_data_dir` once DATA_DIR is this run's)"""
        recorded = _read_record(self.address_file)
        if recorded is not None and (copied := _copied_from(recorded, where)) is not None:
            log.warning("%s was written by the platform of DATA_DIR=%s (this directory is a "
                        "copy of it); removed", self.address_file, copied)
            with contextlib.suppress(OSError):
                self.address_file.unlink()
            recorded = None
        if recorded is None:
            # no run of ours to wait for; another process (an offline `shardex audit`...)
            # may still hold a journal, which would fail the host that opens it
            self._refuse_held_journal(where, "is locked by", "another process",
                                     HELD_JOURNAL_WAIT_S)
            return
        running = _recorded_state(recorded)
        if running == "running" and recorded.get("pid") != os.getpid():
            raise LaunchError(f"a platform already runs from DATA_DIR={where} (pid "
                              f"{recorded.get('pid')}, {recorded.get('url')}); stop it first, "
                              "or use another DATA_DIR")
        if running == "elsewhere":
            return  # another host's record: its processes are not ours to wait for
        log.warning("the platform last started from %s (pid %s) did not stop cleanly; "
                    "waiting for its processes to exit", where, recorded.get("pid"))
        if running == "gone" and (ended := _end_killed_ray(recorded.get("ray_session_dir"))):
            log.warning("ended %d processes the killed run's Ray left running (pids %s)",
                        len(ended), " ".join(map(str, ended)))
        host, port = self.host, self.settings.port
        started, limit_s = time.monotonic(), CRASHED_RUN_WAIT_S
        while not (port_free := port_is_free(host, port)) or _held_journal(where) is not None:
            waited_s = time.monotonic() - started
            if (waited_s >= limit_s and limit_s < TIME_WAIT_S and not port_free
                    and not accepts_connections(host, port)):
                # nothing listens: closed connections of the killed server hold the port
                log.warning("port %d still holds connections of the killed run in TIME_WAIT; "
                            "waiting for them to expire", port)
                limit_s = TIME_WAIT_S
            if waited_s >= limit_s:
                break  # the checks after this name what still holds the port
            self._pause("waiting for a killed run to end")
        self._refuse_held_journal(where, "is still locked by", "a process of the killed run",
                                  0.0)
        with contextlib.suppress(OSError):
            self.address_file.unlink()

    def _hold_data_dir(self, where: Path) -> None:
        """Take DATA_DIR's :data:`RUN_LOCK` until :meth:`stop`; LaunchError naming the process
        that holds it. The address record alone could not refuse a second start while the
        first was still starting: it is written seconds into a start (once Ray runs)."""
        if self._run_lock is not None:
            return
        path = self.settings.data_dir / RUN_LOCK
        try:
            self.settings.data_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise LaunchError(f"cannot write to DATA_DIR={self.settings.data_dir}: "
                              f"{exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            from cluster.durability.journal import lock_holders

            holders = ", ".join(lock_holders(path)) or "another process"
            raise LaunchError(f"a platform already runs from DATA_DIR={where} ({holders}); "
                              "stop it first, or use another DATA_DIR") from None
        self._run_lock = fd

    def _release_data_dir(self) -> None:
        if self._run_lock is not None:
            os.close(self._run_lock)
            self._run_lock = None

    def _refuse_held_journal(self, data_dir: Path, held_how: str, unnamed: str,
                             wait_s: float) -> None:
        """LaunchError ("<LOCK> <held_how> <holders>") naming who holds a journal under
        ``data_dir`` (``unnamed`` when the system does not say) if a process still does after
        ``wait_s`` (the workers of a run that just stopped let go a moment after it)."""
        deadline = time.monotonic() + wait_s
        while (held := _held_journal(data_dir)) is not None and time.monotonic() < deadline:
            self._pause("a journal was locked")
        if held is None:
            return
        from cluster.durability.journal import lock_holders

        holders = ", ".join(lock_holders(held)) or unnamed
        raise LaunchError(f"{held} {held_how} {holders}; stop that process (it writes or "
                          "reads the journal), then start again")

    def _pause(self, waiting: str) -> None:
        """0.1 s of a wait during the start; LaunchError once the start is cancelled."""
        if self.cancel is None:
            time.sleep(0.1)
        elif self.cancel.wait(0.1):
            raise LaunchError(f"start cancelled while {waiting}")

    def _start_broker(self) -> None:
        from cluster.actors.publisher import TRIMMED_AT
        from feed.service import embedded_broker_for

        if self.bootstrap is not None:
            return
        broker = embedded_broker_for(self.settings, self.broker_port)
        if broker is None:
            self.bootstrap = self.settings.feed.bootstrap_servers
            return
        # the account events are kept short like the market data: a reader that misses some
        # reads them from the ledger by its cursor
        broker.trim[self.settings.account_topic] = TRIMMED_AT
        # a broker a killed run left behind is found (and stopped) through this record
        broker.record_path = self.settings.data_dir / BROKER_RECORD
        broker.source = None if self.source_name == "none" else self.source_name
        # beside it, not in a temp file: a run killed with kill -9 leaves its log where the
        # next start appends to it, instead of one more file in /tmp per crash
        broker.log_path = self.settings.data_dir / BROKER_LOG
        try:
            broker.start()
        except BrokerPortInUse as exc:
            # most often the broker of another platform on this machine: both run with
            # another port for this one's
            raise LaunchError(f"{exc}; or start this platform's broker on a free port with "
                              "--broker-port") from exc
        except BrokerError as exc:
            raise LaunchError(str(exc)) from exc
        self._broker = broker
        self.bootstrap = broker.bootstrap

    async def _ensure_topic(self, bootstrap: str) -> None:
        """Create the market topic on ``bootstrap``, trying for up to :data:`TOPIC_WAIT_S` (an
        embedded broker may still be electing itself, an external one starting). aiokafka
        logs an error for every connection refused, five a second: while this tries, they are
        held back, and one warning says what it waits for."""
        began = time.monotonic()
        said = False
        with aiokafka_quiet():
            while True:
                try:
                    await ensure_topic(bootstrap, len(self.settings.assets.assets),
                                       topic=self.topic)
                    return
                except Exception as exc:
                    waited_s = time.monotonic() - began
                    if waited_s > TOPIC_WAIT_S:
                        raise LaunchError(f"cannot create topic {self.topic} on {bootstrap}: "
                                          f"{exc}") from exc
                    if waited_s > TOPIC_QUIET_S and not said:
                        log.warning("waiting up to %.0f s for the Kafka broker at %s: %s",
                                    TOPIC_WAIT_S, bootstrap, exc)
                        said = True
                    await asyncio.sleep(0.2)

    def _start_actors(self, phase: Callable[[str], None]) -> Any:
        """Start the ledger and shard hosts and reconcile what a crash left half done; the
        feed actor's process starts beside the hosts', its consuming once they are
        reconciled. Returns the ref of that ``FeedActor.start`` call (True once consuming)."""
        from cluster.actors.deploy import pinned_hosts, placement, reconcile_at_start, start_hosts
        from cluster.actors.feed import FeedActor

        settings = self.settings
        data_dir = str(settings.data_dir.resolve()) if self.durable else None
        # created first, called last: its worker starts (a second or so of imports) while
        # the hosts recover, and nothing reaches the shards before they are reconciled
        restart = FEED_RESTART if self.durable else {}
        self.feed = FeedActor.options(
            name=FEED, namespace=self.namespace, **placement(FEED, pinned_hosts(), None),
            **restart).remote(
            settings, self.bootstrap, namespace=self.namespace, topic=self.topic,
            candles_dir=data_dir)
        # a durable start recorded the layout under DATA_DIR on this node before it came here:
        # a host that does not see it has another DATA_DIR (DATA_DIR is not shared)
        made = self.durable and hosts_made(settings)
        self.ledger, self.shards = start_hosts(settings, self.namespace, data_dir,
                                               READY_TIMEOUT_S, self.bootstrap,
                                               self.account_secret,
                                               LAYOUT_FILE if self.durable else None, made)
        if self.durable and not made:
            record_hosts_made(settings)  # before anything is acknowledged
        phase("ledger and shards")
        if self.durable:
            # before the API serves: settle what requests cut off by a crash left half done
            self.released_at_start = reconcile_at_start(self.ledger, self.shards)
            phase("reconciliation")
        # the API deploys while the feed actor joins its consumer group (the caller waits)
        return self.feed.start.remote()

    def _supervise(self) -> None:
        """Every ``SUPERVISE_INTERVAL_S``: start the embedded broker again if it died, and ping
        the feed actor (a restarted feed actor resumes consuming on its first call), so the
        shards get prices again within seconds of either crash."""
        import ray

        pending: Any = None
        while not self._supervising.wait(SUPERVISE_INTERVAL_S):
            self._revive_broker()
            feed = self.feed
            if feed is None:
                continue
            if pending is not None:
                ready, _ = ray.wait([pending], timeout=0)
                if not ready:
                    continue
                with contextlib.suppress(Exception):
                    ray.get(pending)
            with contextlib.suppress(Exception):
                pending = feed.stats.remote()

    def _revive_broker(self) -> None:
        """Start the embedded broker again on its port when its process has ended (a crash,
        a kill, the OOM killer). It keeps nothing on disk, so nothing is lost that a restart
        could keep: the producers, the feed actor and the account stream's readers reconnect
        and recreate their topics, as they do after a trim (feed.broker)."""
        with self._broker_lock:
            broker = self._broker
            if broker is None or broker.running or self._supervising.is_set():
                return
            log.warning("the embedded broker on %s exited (code %s): starting it again; its "
                        "last output: %s", broker.bootstrap, broker.exit_code,
                        broker.log_tail(500))
            try:
                broker.restart()
                asyncio.run(self._ensure_topic(broker.bootstrap))
            # OSError: its log under DATA_DIR (a full or failing disk); the round must not
            # raise, which would end the supervisor's thread and every later restart
            except (BrokerError, LaunchError, OSError) as exc:  # tried again on the next round
                log.warning("cannot start the embedded broker again yet: %s", exc)
                return
            log.warning("the embedded broker runs again on %s (pid %s)", broker.bootstrap,
                        broker.pid)

    def _resume_source(self, source: Any) -> None:
        """A simulated market continues from the prices the shards saw last: a restart must
        not move every price back to the walk's start (a jump no market made, which alone
        could liquidate positions opened at high leverage)."""
        import ray

        if simulation_of(source) is None:
            return

        ticks: list[Tick | None] = []
        for spec in self.layout:
            try:
                ticks.append(ray.get(self.shards[spec.name].execute.remote([LastTick()]),
                                     timeout=10)[0])
            except Exception:  # a shard still recovering: its asset's other splits may tell
                log.warning("no last price of %s from %s to continue the simulation from",
                            spec.asset, spec.name)
        self.source_name += resume_simulation(source, ticks)

    def _start_feed_thread(self, source: Any) -> None:
        from feed.source import run_source

        loop, stop = asyncio.new_event_loop(), asyncio.Event()
        self._feed_stop = functools.partial(loop.call_soon_threadsafe, stop.set)

        def run() -> None:
            try:
                loop.run_until_complete(run_source(
                    self.settings, stop, bootstrap=self.bootstrap, topic=self.topic,
                    source=source))
            except Exception:
                log.exception("the feed source stopped with an error")
            finally:
                loop.close()

        self._feed_thread = threading.Thread(target=run, name="feed-source", daemon=True)
        self._feed_thread.start()

    # ------------------------------------------------------------------ stop
    def stop_feed_source(self) -> None:
        """Stop publishing the FEED_SOURCE source (the rest keeps running)."""
        if self._feed_thread is not None and self._feed_stop is not None:
            with contextlib.suppress(RuntimeError):  # its loop closed: the source ended
                self._feed_stop()
            self._feed_thread.join(10.0)
            self._feed_thread = self._feed_stop = None

    def stop(self) -> None:
        """Stop what ``start`` started, newest first; safe to call twice or after a failure."""
        self._supervising.set()
        if self._supervisor is not None:
            self._supervisor.join(5.0)
            self._supervisor = None
        self.stop_feed_source()
        import ray

        from cluster.actors.deploy import shutdown_ray

        if ray.is_initialized():
            if self._serve_started:
                from cluster.actors.serve_app import shutdown_api, stop_api

                # the API first, while the ledger and shards still answer it: its requests in
                # flight finish, its WebSockets get a close frame, later ones are refused (a
                # start that failed before deploying it has none to stop, nor to warn about)
                stopped = not self._api_deployed or stop_api(API_STOP_TIMEOUT_S,
                                                             self._ray_down)
                if not stopped and self._ray_down():  # its WebSockets end with no close frame
                    log.warning("Ray's own processes got the stop signal too (it was sent to "
                                "the whole process group); the API goes down with them")
                elif not stopped:
                    log.warning("the API did not stop within %.0f s; stopping the rest",
                                API_STOP_TIMEOUT_S)
                if not self._ray_started:
                    # on a joined cluster also Serve's actors; a Ray we started goes down
                    # whole below (serve.shutdown can wait 30 s on the controller's drain)
                    shutdown_api()
            self._serve_started = self._api_deployed = False
            # else the feed's stop waits 10 s and the hosts' closes HOST_CLOSE_TIMEOUT_S for
            # actors that cannot answer: they go down with Ray, as after a kill -9 of `up`
            if not self._ray_down():
                self._stop_feed()
                self._close_hosts()
            for handle in [self.feed, *self.shards.values(), self.ledger]:
                if handle is not None:
                    with contextlib.suppress(Exception):
                        ray.kill(handle)
            self.feed, self.ledger, self.shards = None, None, {}
            if self._ray_started:
                if self._ray_down():
                    self._end_ray_workers()
                shutdown_ray()
                self._ray_started = False
            if self.direct_ingress and self.settings.replica_slots > 1:
                from cluster.actors.serve_app import remove_front_files

                remove_front_files(self.settings.port)  # its HAProxy went with Serve above
            self._forget_address()
        with self._broker_lock:
            self._stop_broker()
        self._release_data_dir()  # last: the next start may take DATA_DIR from here

    def _forget_address(self) -> None:
        """Remove DATA_DIR's address file, if this run wrote it."""
        if self._recorded:
            with contextlib.suppress(OSError):
                self.address_file.unlink()
            self._recorded = False

    def _stop_broker(self) -> None:
        """Stop the embedded broker this platform started, if any (``_broker_lock`` held)."""
        if self._broker is not None:
            self._broker.stop()
            self._broker = None

    def give_up_start(self) -> bool:
        """What :meth:`stop` does without Ray, from another thread while the start waits on a
        Ray that is going (a stop signal sent to the whole process group): the feed source,
        the records, the broker, DATA_DIR. False, doing nothing, once the start has ended (the
        stop after it does it all); under ``_broker_lock``, which the start's end takes."""
        with self._broker_lock:
            if not self._starting:
                return False
            with contextlib.suppress(Exception):
                self.stop_feed_source()
            self._end_ray_workers()
            self._forget_address()
            self._stop_broker()
            self._release_data_dir()
            return True

    def _stop_feed(self) -> None:
        """Stop the feed actor (its calls to the shards end first, its candle store closes);
        one that does not stop in time is killed now: the hosts are closed next, and nothing
        may send to them any more (a host refuses what comes after its close anyway)."""
        import ray

        if self.feed is None:
            return
        try:
            ray.get(self.feed.stop.remote(), timeout=FEED_STOP_TIMEOUT_S)
        except Exception as exc:
            log.warning("the feed actor did not stop within %.0f s (%s); killed, its candle "
                        "store not closed", FEED_STOP_TIMEOUT_S, type(exc).__name__)
            with contextlib.suppress(Exception):
                ray.kill(self.feed)

    def _close_hosts(self) -> None:
        """Close the shards and the ledger (final snapshot, journal released: a shard's last
        prices, journaled only with its next change, are kept; the next start replays less),
        all at once, waiting HOST_CLOSE_TIMEOUT_S in all. Those that do not answer in time
        or fail are named in one warning and killed after as the others: their journals hold
        everything acknowledged."""
        import ray

        hosts = {**self.shards, LEDGER: self.ledger}
        calls: dict[Any, str] = {}
        missed: list[str] = []
        for name, handle in hosts.items():
            if handle is None:
                continue
            try:
                calls[handle.close.remote()] = name
            except Exception as exc:
                missed.append(f"{name} ({type(exc).__name__})")
        if not calls:
            return
        done, late = ray.wait(list(calls), num_returns=len(calls),
                              timeout=HOST_CLOSE_TIMEOUT_S)
        for ref in done:
            try:
                ray.get(ref)
            except Exception as exc:
                missed.append(f"{calls[ref]} ({type(exc).__name__})")
        missed += [f"{calls[ref]} (no answer within {HOST_CLOSE_TIMEOUT_S:.0f} s)"
                   for ref in late]
        if missed:
            log.warning("not closed, killed without a final snapshot (their journals keep "
                        "everything acknowledged): %s", ", ".join(sorted(missed)))

    def _own_node(self) -> Any:
        """Ray's node object of a local Ray this platform started (its processes' handles),
        None otherwise."""
        from cluster.actors.deploy import ray_node

        return ray_node() if self._ray_started else None

    def _ray_down(self) -> bool:
        """Whether a local Ray this platform started is going: its GCS or raylet has exited, or
        two of its own processes have. A SIGTERM to the whole process group, or to every
        process of a service manager's unit, reaches them as it reaches this one; the Python
        ones (dashboard, monitors) exit at once, the GCS and raylet up to 10 s later, and
        nothing on that Ray answers a stop meanwhile. One process alone exiting (a dashboard
        that crashed) leaves Ray serving. A joined cluster's processes are not ours."""
        from ray._private import ray_constants

        essential = {ray_constants.PROCESS_TYPE_GCS_SERVER, ray_constants.PROCESS_TYPE_RAYLET}
        node = self._own_node()
        if node is None:
            if not self._ray_starting:
                return False
            # within ray.init Ray's node object is not there yet; its processes are this
            # one's children: one seen before that is gone now, or a zombie, has exited
            now = _children()
            self._init_children.update(now)
            names = [name for key, (name, state) in self._init_children.items()
                     if state == "Z" or key not in now]
            return len(names) >= 2 or bool(essential.intersection(names))
        exited = {kind for kind, infos in node.all_processes.items()
                  for info in infos if info.process.poll() is not None}
        return len(exited) >= 2 or bool(exited & essential)

    def _end_ray_workers(self) -> None:
        """SIGKILL the processes of a local Ray this platform started, once it is going (see
        :func:`_end_ray_processes`). A worker has a process group of its own, which a signal
        to the whole group of ``up`` misses, and one still starting when the raylet went was
        seen alive 30 s later. Their hosts' journals hold everything acknowledged, as after a
        kill -9."""
        from ray._private import ray_constants

        node = self._own_node()
        if node is None:
            return
        raylets = node.all_processes.get(ray_constants.PROCESS_TYPE_RAYLET, [])
        _end_ray_processes(node.get_session_dir_path(), [info.process.pid for info in raylets])

    def __enter__(self) -> Platform:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ views
    def shard_nodes(self) -> dict[str, str]:
        """Shard actor name -> id of the node it runs on."""
        return {name: _actor_node(handle) for name, handle in self.shards.items()}

    def banner(self) -> str:
        import ray

        nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
        where = self.shard_nodes()
        lines = [
            f"shardex is up: {self.url}   (docs {self.url}/docs, Ctrl-C stops)",
            f"  feed source: {self.source_name if self.with_feed else 'none (engine only)'}"
            f"  -> topic {self.topic} on {self.bootstrap}"
            + (" (embedded broker)" if self._broker is not None else ""),
            f"  ray: {len(nodes)} node(s), namespace {self.namespace}"
            + ("" if self._ray_started else " (joined)"),
            "  started in " + ", ".join(f"{name} {s:.1f} s" for name, s in self.phases_s.items()),
            "  shards:",
        ]
        for spec in self.layout:
            node = nodes.get(where.get(spec.name, ""), {})
            split = f" split {spec.split}/{spec.split_count}" if spec.split_count > 1 else ""
            lines.append(f"    {spec.name:<16} {spec.asset}{split}  node "
                         f"{where.get(spec.name, '?')[:12]} {node.get('NodeManagerAddress', '')}")
        return "\n".join(lines)


def newest_tops(ticks: Iterable[Tick | None]) -> dict[str, tuple[int, int]]:
    """``asset -> (bid, ask)`` ticks of the newest (by ``ts_us``, then ``seq``) of ``ticks``,
    the shards' last ones (None: a shard without a price): the price an asset split over
    several shards was last given, which a split that missed the last ticks (down, or its
    journal's tail lost) does not hold."""
    newest: dict[str, Tick] = {}
    for tick in (t for t in ticks if t is not None):
        held = newest.setdefault(tick.asset, tick)
        if (tick.ts_us, tick.seq) > (held.ts_us, held.seq):
            newest[tick.asset] = tick
    return {asset: (t.bid_ticks, t.ask_ticks) for asset, t in newest.items()}


def simulation_of(source: Any) -> Any:
    """The SimSource ``source`` runs, or falls back to (``auto``), or None."""
    from feed.sim import SimSource
    from feed.source import AutoSource

    if isinstance(source, AutoSource):  # offline, the default source is the sim
        source = source.fallback
    return source if isinstance(source, SimSource) else None


def resume_simulation(source: Any, ticks: Iterable[Tick | None]) -> str:
    """Continue the simulation of ``source`` from ``ticks`` (the shards' last ones, None: a
    shard without a price); returns what the banner adds to the source's name ("" when
    nothing was taken)."""
    sim = simulation_of(source)
    taken = {} if sim is None else sim.walk.resume_from(newest_tops(ticks))
    if not taken:
        return ""
    # auto runs the sim only when Backpack gives no price in time
    lead = " (continuing from " if sim is source else " (its sim fallback continuing from "
    return lead + ", ".join(
        f"{name} {sim.assets[name].ticks_to_price(mid)}" for name, mid in taken.items()) + ")"


def _actor_node(handle: Any) -> str:
    """The node id an actor runs on, from the GCS (no dashboard needed)."""
    import ray

    actor_id = handle._actor_id.hex()
    info = ray._private.state.actors(actor_id)
    return str(info.get("Address", {}).get("NodeID", "")) if info else ""


# ---------------------------------------------------------------------- commands
LAYOUT_FILE = "layout.json"  # the shard layout DATA_DIR's ids were issued under


def check_layout(settings: Settings, record: bool = False) -> None:
    """Refuse a SHARDS/ASSETS whose layout is not the one DATA_DIR's ids were issued under
    (ids carry their shard's tag: another layout cannot read them); ``record``: write the
    layout when DATA_DIR has none yet (its first durable start). LaunchError names the values
    to use."""
    path = settings.data_dir / LAYOUT_FILE
    layout = shard_layout(settings)
    wanted = [list(dataclasses.astuple(spec)) for spec in layout]
    try:
        recorded = json.loads(path.read_text())["shards"]
    except FileNotFoundError:
        _refuse_other_shards(settings, layout)
        if record:
            # whole or not at all: a torn or empty file (a full disk, a kill, a power cut)
            # would refuse every later start
            from cluster.durability.journal import create_directory, write_whole

            try:  # the start's first write under DATA_DIR: one it cannot make is named so
                create_directory(path.parent)
                write_whole(path, json.dumps({"shards": wanted}).encode())
            except OSError as exc:
                raise LaunchError(f"cannot write to DATA_DIR={settings.data_dir}: "
                                  f"{exc.strerror or exc}") from None
        return
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise LaunchError(f"cannot read {path}: {exc}") from None
    if recorded != wanted:
        try:  # the ASSETS and SHARDS that give the recorded layout
            splits = {spec.asset: spec.split_count
                      for spec in (ShardSpec(*row) for row in recorded)}
        except TypeError:
            raise LaunchError(f"cannot read {path}: not a shard layout") from None
        raise LaunchError(f"DATA_DIR {settings.data_dir} was made with ASSETS={','.join(splits)} "
                          f"SHARDS={_shards_text(splits)}, and its "
                          "ids carry that layout: set those, or use a new DATA_DIR for another "
                          "layout")


HOSTS_MADE = "hosts_made"  # in LAYOUT_FILE once a start's hosts have made their journals


def hosts_made(settings: Settings) -> bool:
    """Whether DATA_DIR's layout record says an earlier start's hosts made their journals
    (:func:`record_hosts_made`); a host then refuses to begin without its own."""
    return (_read_record(settings.data_dir / LAYOUT_FILE) or {}).get(HOSTS_MADE) is True


def record_hosts_made(settings: Settings) -> None:
    """Note in DATA_DIR's layout record that every host has made its journal: from the next
    start on, a host whose journal is gone (a directory deleted, a backup restored in part)
    is refused instead of beginning empty, where the start's reconciliation released the
    margin of every position the ledger held on it."""
    from cluster.durability.journal import write_whole

    path = settings.data_dir / LAYOUT_FILE
    write_whole(path, json.dumps({**json.loads(path.read_text()), HOSTS_MADE: True}).encode())


def _refuse_other_shards(settings: Settings, layout: Iterable[ShardSpec]) -> None:
    """LaunchError when DATA_DIR, which records no layout, holds shards other than ``layout``'s
    (made before layouts were recorded, or its actor directories restored alone): a shard
    ``layout`` lacks would go unread, and the start's reconciliation would release its
    positions' margin; one it adds moves the book tags (in every id) of the shards after it,
    and the start failed to recover them only after recording the new layout as DATA_DIR's."""
    specs = list(layout)
    held = _shard_directories(settings.data_dir)
    names = [spec.name for spec in specs]
    if not held or set(held) == set(names):
        return
    differ = [name for name in held if name not in names] + \
        [f"no {name}" for name in names if name not in held]
    made: dict[str, int] = {}  # what the directories show of the layout they were made with
    for asset, split in filter(None, map(split_of_name, held)):
        made[asset] = max(made.get(asset, 0), split + 1)
    order = [a.name for a in settings.assets.assets]  # ASSETS' order, then the others
    made = dict(sorted(made.items(), key=lambda item: (
        order.index(item[0]) if item[0] in order else len(order), item[0])))
    raise LaunchError(
        f"DATA_DIR {settings.data_dir} holds {', '.join(differ)}, unlike SHARDS="
        f"{_shards_text({spec.asset: spec.split_count for spec in specs})}, and "
        f"no {LAYOUT_FILE} naming the layout its ids were issued under: its shard directories "
        f"were made with SHARDS={_shards_text(made)}: set that (and the ASSETS it was made "
        "with), or use a new DATA_DIR for another layout")


def _shards_text(splits: Mapping[str, int]) -> str:
    """``asset -> split count`` as SHARDS names every asset: ``SOL=2,BTC=1``."""
    return ",".join(f"{asset}={count}" for asset, count in splits.items())


def _shard_directories(data_dir: Path) -> list[str]:
    """The names of ``data_dir``'s directories named as a shard actor's (``shard-SOL-0``)."""
    try:
        entries = list(data_dir.iterdir())
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise LaunchError(f"cannot read DATA_DIR={data_dir}: {exc.strerror or exc}") from None
    return sorted(p.name for p in entries if split_of_name(p.name) and p.is_dir())


def up(settings: Settings, with_feed: bool, broker_port: int | None = None) -> int:
    """Start everything, print the banner, run until Ctrl-C / SIGTERM; returns the exit code.

    ``broker_port``: where the embedded broker listens (None: the configured default).
    Raises ``ConfigError`` for a setting found unusable while starting (the CLI prints it).
    """
    # a no-op where logging is configured already
    logging.basicConfig(level=logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        stopping.set()

    signals = stop_signals()
    previous = {sig: signal.signal(sig, on_signal) for sig in signals}
    # the platform users run keeps its state in DATA_DIR (journaled hosts Ray restarts)
    platform = Platform(settings, with_feed=with_feed, host=settings.host,
                        broker_port=broker_port, durable=True, cancel=stopping)
    # A signal's Python handler runs only once the main thread runs Python again, which a
    # call of Ray's start may not do for 30 s; the signal's number is written to this pipe at
    # once, for the start's watch
    signalled, wake = os.pipe()
    os.set_blocking(wake, False)
    previous_wakeup = signal.set_wakeup_fd(wake, warn_on_full_buffer=False)
    started = threading.Event()
    watch = threading.Thread(target=_give_up_a_start_whose_ray_goes, name="start-watch",
                             daemon=True, args=(platform, stopping, started, signalled,
                                                {int(sig) for sig in signals}))
    watch.start()
    try:
        try:
            platform.start()
        except ConfigError:
            raise
        except _start_failures() as exc:  # evaluated once it failed: Ray is imported then
            if stopping.is_set():
                return 0  # Ctrl-C while the start waited
            print(f"shardex: cannot start: {_start_failure_text(exc)}", file=sys.stderr)
            return 1
        finally:
            started.set()
            watch.join()
            signal.set_wakeup_fd(previous_wakeup)
            os.close(signalled)
            os.close(wake)
        # ours again, whatever the start installed (ray.init's own SIGTERM handler, which
        # exits without cleanup, is kept out by _ray_init)
        for sig in signals:
            signal.signal(sig, on_signal)
        if stopping.is_set():
            return 0
        print(platform.banner(), flush=True)
        while not stopping.wait(0.5):
            pass
        _say("shardex: stopping ...")
        return 0
    finally:
        platform.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if stopping.is_set():
            _say("shardex: stopped")


def _give_up_a_start_whose_ray_goes(platform: Platform, stopping: threading.Event,
                                    started: threading.Event, signalled: int,
                                    stops: set[int]) -> None:
    """Once a stop signal came while ``platform`` starts and its Ray is going (the signal went
    to the whole process group: :meth:`Platform._ray_down`), end the process here, exit 0,
    after what a stop does without Ray: the Ray call the start waits in (with a timeout: it
    takes no signal) would wait 30-60 s for Ray's processes, then end the process with exit 1,
    its records left. As after a stop that finds Ray going, the hosts are not closed: they go
    down with Ray, their journals holding everything acknowledged.

    ``started``: set once the start ended (this returns); ``signalled``: the read end of the
    process's signal wakeup pipe; ``stops``: the numbers of the stop signals."""
    while not stopping.is_set():
        if started.is_set():
            return
        ready, _, _ = select.select([signalled], [], [], 0.2)
        if ready and stops.intersection(os.read(signalled, 64)):
            stopping.set()  # what the handler does once the main thread gets to it
        elif platform._ray_starting:
            # Ray's processes as ray.init starts them: one the signal ends may be reaped by
            # ray.init before a first look after it
            platform._ray_down()
    while platform.starting and not started.is_set():
        if platform._ray_down():
            log.warning("Ray's own processes got the stop signal too (it was sent to the whole "
                        "process group) while the platform started; giving up the start")
            if platform.give_up_start():
                _say("shardex: stopped")
                os._exit(0)
            return
        time.sleep(0.2)


def _children() -> dict[tuple[int, int], tuple[str, str]]:
    """This process's children, exited ones not yet reaped included: ``{(pid, start time in
    clock ticks): (name, state)}`` (``comm`` and ``/proc`` state: ``Z`` once exited)."""
    me = str(os.getpid())
    found: dict[tuple[int, int], tuple[str, str]] = {}
    for entry in Path("/proc").glob("[0-9]*"):
        with contextlib.suppress(OSError, ValueError):  # gone meanwhile
            stat = (entry / "stat").read_text()
            name, _, rest = stat[stat.index("(") + 1:].rpartition(")")
            fields = rest.split()
            if fields[1] == me:
                found[int(entry.name), int(fields[19])] = (name, fields[0])
    return found


def stop_signals() -> list[signal.Signals]:
    """The signals that stop ``up`` cleanly: Ctrl-C, SIGTERM, and SIGHUP (its terminal closed,
    its ssh session dropped) unless it was started ignoring it (``nohup``, which asks it to
    outlive the terminal). Python's default for SIGHUP ended the process at once: the
    platform went down as after a ``kill -9``, its records left in DATA_DIR."""
    signals = [signal.SIGINT, signal.SIGTERM]
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signals.append(signal.SIGHUP)
    return signals


def _say(line: str) -> None:
    """Print ``line`` if stdout still takes it: after a hang-up the terminal is gone (EIO),
    and the stop must not end in a traceback for it (nor the exit in a failed last flush:
    what is left goes to /dev/null)."""
    try:
        print(line, flush=True)
    except OSError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def _ray_init(**options: Any) -> None:
    """``ray.init(**options)`` keeping this process's SIGTERM handler: ray.init installs one
    that exits at once (``sys.exit(15)`` from wherever the start is, once the call it waits in
    returns: up to 30 s when Ray's processes got the signal too), so a SIGTERM during a start
    ended ``up`` there with exit 15, without the stop its own handler makes (exit 0). It is
    not installed: ray.init runs with the handler this process has.

    From then on this process connects to a Ray only through here: a Ray call made after its
    stop shut Ray down (a Serve handle's router polls Serve's controller from a thread of its
    own until then, and goes on) would otherwise start a new local Ray, with Ray's defaults,
    that nobody stops (RAY_ENABLE_AUTO_CONNECT=0, which Ray reads only as it is imported)."""
    import ray
    from ray._private import auto_init_hook
    from ray._private import utils as ray_utils

    auto_init_hook.enable_auto_connect = False
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    install = ray_utils.set_sigterm_handler
    try:
        if main:
            ray_utils.set_sigterm_handler = lambda _handler: None
        ray.init(**options)
    except Exception as exc:
        # a node that never registered (its raylet ended as it started: "The current node
        # timed out during startup") is a bare Exception, after Ray's fixed 30 s: a start
        # that failed like the others, one line, not a traceback
        if type(exc) is Exception:
            raise LaunchError(f"Ray did not start: {exc}") from exc
        if isinstance(exc, ConnectionError) and options.get("address") not in (None, "local") \
                and os.environ.get("RAY_AUTH_MODE", "").strip().lower() != "token":
            # a cluster with token authentication refuses a join without the token after
            # about 20 s, only Ray's warnings naming why (InvalidAuthToken)
            raise LaunchError(f"{exc} (if its Ray enables token authentication, set "
                              "RAY_AUTH_MODE=token: see README, Scaling out)") from exc
        raise
    finally:
        ray_utils.set_sigterm_handler = install
        if handler is not None:
            # Ray's core puts a native SIGTERM handler of its own (a stack dump, then the
            # process ends) as it connects, whatever the line above kept out: this one
            # goes back over it
            signal.signal(signal.SIGTERM, handler)


def _start_failures() -> tuple[type[BaseException], ...]:
    """What a start that failed raises: ours, the system's, and Ray's and Serve's own (a host
    whose constructor failed, an API Serve could not deploy) once they are imported."""
    failures: tuple[type[BaseException], ...] = (RuntimeError, ValueError, OSError)
    for module, name in (("ray.exceptions", "RayError"),
                         ("ray.serve.exceptions", "RayServeException")):
        if module in sys.modules:
            failures += (getattr(sys.modules[module], name),)
    return failures


def _start_failure_text(exc: BaseException) -> str:
    """``exc``'s message; of a Ray error only its last line: it carries the remote traceback,
    whose last line names the exception that failed the start (by its class name alone, as
    a builtin's is: ``JournalDamagedError: ...``, not its module's path)."""
    text = str(exc)
    if type(exc).__module__.startswith("ray."):
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        text = _MODULE_PATH.sub("", lines[-1]) if lines else type(exc).__name__
    return text


_MODULE_PATH = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )")


class NotRunning(RuntimeError):
    """No running platform to attach to; the message says why and how to point at one."""


def _read_record(path: Path) -> dict[str, Any] | None:
    """A JSON record in DATA_DIR, or None if absent or unreadable (a torn write)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it runs, as another user
        pass
    return True


def _recorded_state(recorded: dict[str, Any]) -> Literal["running", "gone", "elsewhere"]:
    """Whether the ``up`` process of an address record still runs: "elsewhere" when it was
    recorded on another host (a shared DATA_DIR), where this one cannot tell."""
    host = recorded.get("host")
    if host is not None and host != socket.gethostname():
        return "elsewhere"
    try:
        owner = recorded.get("owner")
        if owner and ProcessIdentity.of(os.getpid()) is not None:  # /proc: compare exactly
            alive = ProcessIdentity.from_json(owner).alive(same_cmdline=False)
        else:  # no /proc here (or an older record): the pid is all there is
            alive = _pid_running(int(recorded["pid"]))
    except (KeyError, ValueError, TypeError):
        return "gone"
    return "running" if alive else "gone"


def _end_killed_ray(session_dir: object) -> list[int]:
    """SIGKILL what a killed run's local Ray left running (see :func:`_end_ray_processes`):
    its workers hold journal locks and the API port until they notice their raylet has gone,
    its dashboard agent Ray's fixed agent port for about two minutes (the next Ray's agent
    spent 3-4 s retrying it, then ran without it). Nothing of it holds anything its journals
    lack, as after the kill. Never this process's own Ray. Returns the pids ended."""
    if not isinstance(session_dir, str) or not os.path.isabs(session_dir) or \
            not os.path.basename(session_dir).startswith("session_"):
        return []
    import ray

    from cluster.actors.deploy import ray_node

    if ray.is_initialized() and (node := ray_node()) is not None \
            and node.get_session_dir_path() == session_dir:
        return []
    return _end_ray_processes(session_dir)


def _end_ray_processes(session_dir: str, raylet_pids: Iterable[int] = ()) -> list[int]:
    """SIGKILL a local Ray's processes but this one: each writing to a file of the session's
    ``logs`` directory, as each of Ray's own does (GCS, raylet, agents, workers; a reader of
    those logs opens them read-only, a driver connected to it is spared), and each whose
    environment names one of ``raylet_pids`` as its RAY_RAYLET_PID (a worker still starting
    has opened no log yet; only a running Ray's raylet pids are certain: a killed run's may
    name another Ray's since). Returns the pids ended."""
    logs = os.path.join(session_dir, "logs") + os.sep
    marks = {f"RAY_RAYLET_PID={pid}".encode() for pid in raylet_pids}
    ended = []
    for entry in Path("/proc").glob("[0-9]*"):
        if (pid := int(entry.name)) == os.getpid():
            continue
        with contextlib.suppress(OSError):  # gone, or not ours to read
            # a start after a crash passes no raylet pid: no process's environment is read
            if _writes_under(entry, logs) or (marks and marks.intersection(
                    (entry / "environ").read_bytes().split(b"\0"))):
                os.kill(pid, signal.SIGKILL)
                ended.append(pid)
    return ended


def _writes_under(process: Path, directory: str) -> bool:
    """Whether the process ``/proc/PID`` has a file under ``directory`` open for writing, and
    none of them a driver's log: a program connected to that Ray (``shardex status``, a
    user's script) writes one, and is not one of its processes."""
    writes = False
    with contextlib.suppress(OSError):  # gone, or not ours to read
        for fd in (process / "fd").iterdir():
            with contextlib.suppress(OSError, ValueError, IndexError):  # closed meanwhile
                target = os.readlink(fd)
                if not target.startswith(directory):
                    continue
                if os.path.basename(target).startswith("python-core-driver-"):
                    return False
                info = (process / "fdinfo" / fd.name).read_text()
                flags = int(info.split("flags:", 1)[1].split()[0], 8)
                writes = writes or flags & os.O_ACCMODE != os.O_RDONLY
    return writes


def _copied_from(recorded: dict[str, Any], where: Path) -> str | None:
    """The DATA_DIR an address record names when it is not ``where`` (the record came with a
    copy of that directory: a backup restored elsewhere while its platform ran); None for
    ``where``'s own (and a record that names none)."""
    named = recorded.get("data_dir")
    if not isinstance(named, str) or named == str(where):
        return None
    with contextlib.suppress(OSError):  # the same directory by another path (a mount)
        if os.path.samefile(named, where):
            return None
    return named


def _held_journal(data_dir: Path) -> Path | None:
    """The writer lock of a journal under ``data_dir`` some process holds, if any."""
    for lock in data_dir.glob("*/journal/LOCK"):
        try:
            fd = os.open(lock, os.O_RDWR)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            return lock
        finally:
            os.close(fd)  # closing drops the lock taken to test it
    return None


def _tcp_answers(address: str) -> bool:
    host, _, port = address.rpartition(":")
    return port.isdigit() and accepts_connections(host.strip("[]"), int(port),
                                                  ATTACH_CHECK_TIMEOUT_S)


def _silent_ray_address(address: str) -> str | None:
    """Why RAY_ADDRESS ``address`` cannot be joined, when a TCP connection tells at once: a
    host:port where nothing listens would hold ray.init for minutes, and a Ray Client's
    ray://host:port for 30 s."""
    scheme, sep, rest = address.partition("://")
    if sep and scheme != "ray":
        return None  # another kind of address: Ray's own error says what it wants instead
    target = rest.partition("/")[0] if sep else address
    if ":" in target and not _tcp_answers(target):
        return (f"nothing answers at RAY_ADDRESS={address} (its Ray refuses connections or "
                "the address is not host:port)")
    return None


def _recorded_address(settings: Settings) -> str:
    """``RAY_ADDRESS``, else the address a local ``up`` recorded in DATA_DIR.

    Raises :class:`NotRunning` (quickly, without starting Ray) when DATA_DIR records no
    platform, or records one that is gone (a crash left the record). Also restores the
    recorded auth mode: it must be in the environment before Ray is imported, since Ray reads
    it once at import.
    """
    if settings.ray_address:
        if silent := _silent_ray_address(settings.ray_address):
            raise NotRunning(silent)
        return settings.ray_address
    where = settings.data_dir.resolve()
    path = settings.data_dir / ADDRESS_FILE
    hint = ("start it with `shardex up`, or point at a running one with DATA_DIR=<the "
            "directory it was started with> or RAY_ADDRESS=<host:port of its Ray>")
    recorded = _read_record(path)
    if recorded is None or "ray_address" not in recorded:
        what = f"no {ADDRESS_FILE}" if not path.exists() else f"{ADDRESS_FILE} is unreadable"
        raise NotRunning(f"no platform is recorded in DATA_DIR={where} ({what}): {hint}")
    address = str(recorded["ray_address"])
    if (copied := _copied_from(recorded, where)) is not None:
        raise NotRunning(f"no platform runs from DATA_DIR={where}: its {ADDRESS_FILE} was "
                         f"written by the platform of DATA_DIR={copied}, of which this "
                         f"directory is a copy: {hint}")
    if _recorded_state(recorded) == "gone":
        raise NotRunning(f"the platform recorded in DATA_DIR={where} is not running (its "
                         f"process {recorded.get('pid')} is gone: the record is left from a "
                         f"run that did not stop cleanly): {hint}")
    if not _tcp_answers(address):
        raise NotRunning(f"the platform recorded in DATA_DIR={where} does not answer (its Ray "
                         f"at {address} refuses connections): {hint}")
    if recorded.get("ray_auth_mode") and "RAY_AUTH_MODE" not in os.environ:
        os.environ["RAY_AUTH_MODE"] = recorded["ray_auth_mode"]
    if address.startswith("127."):  # a single-host Ray on loopback (see Platform._start)
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    return address


def _on_cluster(settings: Settings, command: str, unreachable: int,
                report: Callable[[], int]) -> int:
    """``report()`` (its exit code) while connected to the running platform's Ray (see
    ``_recorded_address``; this process's own if it has one); when there is none to connect
    to, the reason on stderr and ``unreachable``."""
    connect = not ("ray" in sys.modules and sys.modules["ray"].is_initialized())
    try:
        check_layout(settings)  # another SHARDS would read the shards under wrong names
        if connect:
            address = _recorded_address(settings)  # sets what Ray reads as it is imported
            # (the hint for a cluster with token authentication joined without its mode)
            _ray_init(address=address, namespace=NAMESPACE, log_to_driver=False,
                      logging_level=logging.WARNING)
    except (LaunchError, NotRunning) as exc:
        print(f"shardex {command}: {exc}", file=sys.stderr)
        return unreachable
    except (ConnectionError, RuntimeError, ValueError) as exc:  # ValueError: a bad address
        print(f"shardex {command}: no running cluster ({exc})", file=sys.stderr)
        return unreachable
    import ray

    try:
        if not _platform_named(settings):
            # every actor's lookup would print Ray's "Failed to look up actor ..." instead
            where = ray.get_runtime_context().gcs_address
            print(f"shardex {command}: no platform runs on the Ray cluster at {where} "
                  f"(namespace {NAMESPACE}): start one there with RAY_ADDRESS={where} "
                  "shardex up", file=sys.stderr)
            return unreachable
        return report()
    finally:
        if connect:
            ray.shutdown()


def _platform_named(settings: Settings) -> bool:
    """Whether the connected cluster names any of the platform's actors (one Ray is
    restarting still is)."""
    import ray

    names = {FEED, LEDGER, *(spec.name for spec in shard_layout(settings))}
    return not names.isdisjoint(ray.util.list_named_actors())


def status(settings: Settings) -> int:
    """Print the live layout: nodes, actors, tick ages, positions per shard."""
    return _on_cluster(settings, "status", 1, lambda: _print_status(settings))


def _print_status(settings: Settings) -> int:
    import ray

    nodes = {n["NodeID"]: n for n in ray.nodes() if n.get("Alive")}
    print(f"ray: {len(nodes)} node(s)")
    for node_id, node in nodes.items():
        cpus = node.get("Resources", {}).get("CPU", 0)
        print(f"  node {node_id[:12]} {node.get('NodeManagerAddress', '')} cpus {cpus:g}")
    code = 0
    try:
        feed = ray.get_actor(FEED, namespace=NAMESPACE)
        fstats: Any = ray.get(feed.stats.remote(), timeout=10)
        lines, reading = feed_status(fstats, _actor_node(feed), MARKET_TOPIC)
        print("\n".join(lines))
        code = code or int(not reading)
        if stale := stale_prices(fstats.get("tick_age_s", {}), settings.assets,
                                 settings.max_price_age_s):
            print(stale)
            code = 1
    except (ValueError, ray.exceptions.RayError) as exc:
        print(f"feed: not available ({exc})")
        code = 1
    try:
        ledger = ray.get_actor(LEDGER, namespace=NAMESPACE)
        problem: object = ray.get(ledger.ping.remote(), timeout=10)
        print(f"ledger: node {_actor_node(ledger)[:12]}" + _problem_text(problem))
        code = code or int(problem is not True)
    except (ValueError, ray.exceptions.RayError) as exc:
        print(f"ledger: not available ({type(exc).__name__})")
        code = 1
    from cluster.actors.serve_app import api_replicas

    line, serving = api_status(api_replicas())
    print(line)
    code = code or int(not serving)
    print("shards:")
    for spec in shard_layout(settings):
        try:
            handle = ray.get_actor(spec.name, namespace=NAMESPACE)
            stats: Any = ray.get(handle.execute.remote([Stats()]), timeout=10)[0]
            problem = ray.get(handle.ping.remote(), timeout=10)
        except (ValueError, ray.exceptions.RayError) as exc:
            print(f"  {spec.name:<16} not available ({type(exc).__name__})")
            code = 1
            continue
        print(f"  {spec.name:<16} node {_actor_node(handle)[:12]} {_stats_text(stats)}"
              + _problem_text(problem))
        code = code or int(problem is not True)
    return code


def api_status(found: tuple[str, Mapping[str, int]] | None) -> tuple[str, bool]:
    """``status``'s line of the API from its app's state and its replicas counted by state
    (:func:`cluster.actors.serve_app.api_replicas`; None: no API app), and whether a replica
    runs: with none, no request is answered, so ``status`` exits 1."""
    if found is None:
        return "api: not deployed", False
    state, replicas = found
    counts = " ".join(f"{name.lower()}={count}" for name, count in sorted(replicas.items()))
    return (f"api: {state.lower()}, replicas {counts or 'none'}",
            replicas.get("RUNNING", 0) > 0)


def feed_status(stats: Mapping[str, Any], node_id: str, topic: str) -> tuple[list[str], bool]:
    """``status``'s lines of the feed actor (its ``stats()``, on node ``node_id``), and whether
    it reads the market topic: with no partition of it assigned (the broker does not answer,
    the topic is gone) no price comes in, which only stale ages showed, with ``status``
    exiting 0."""
    from feed.pipeline import drops_text

    ages = stats.get("tick_age_s", {})
    reading = bool(stats.get("assigned"))
    lines = [f"feed: node {node_id[:12]} assigned={stats.get('assigned')} "
             f"lag={stats.get('lag')} bootstrap={stats.get('bootstrap')}"]
    if not reading:
        lines.append(f"  no partition of {topic} is read: no price comes in")
    lines.append(f"  dropped: {drops_text(stats.get('dropped', {}))}; refused by shards: "
                 f"{stats.get('ticks_refused_by_shards', 0)}")
    lines.append(f"  candle_store_errors: {stats.get('candle_store_errors', 0)}")
    for asset, price in sorted(stats.get("prices", {}).items()):
        age = ages.get(asset)
        age_text = f"{age:.1f}s" if isinstance(age, (int, float)) else "?"
        lines.append(f"  {asset:<5} bid {price.get('bid')} ask {price.get('ask')} "
                     f"age {age_text} source {_shown(price.get('source'))}")
    return lines, reading


def stale_prices(ages_s: Mapping[str, object], assets: Iterable[str],
                 max_age_s: float) -> str | None:
    """``status``'s line of the assets whose newest price the feed saw (``ages_s``, seconds)
    is older than ``max_age_s`` (MAX_PRICE_AGE_S), or that have none: opens and closes of them
    are refused, so ``status`` exits 1; None when every asset's price is fresh. A feed reading
    its topic with nothing on it (a `shardex feed` stopped, a replay of one asset) showed
    only the ages, and ``status`` exited 0."""
    stale = []
    for asset in assets:
        age = ages_s.get(asset)
        if not isinstance(age, int | float):
            stale.append(f"{asset} (no price)")
        elif age > max_age_s:
            stale.append(f"{asset} ({age:.1f}s)")
    if not stale:
        return None
    return (f"  stale prices: {', '.join(stale)}: older than MAX_PRICE_AGE_S={max_age_s:g}s, "
            "opens and closes of them are refused")


def _shown(text: object) -> str:
    """``text`` as printed by ``status``, escaped when not all printable: a tick's source is
    whatever a message on the topic said (a control character could rewrite the terminal,
    and a lone surrogate made the print fail, reported as the feed not available)."""
    text = str(text)
    return text if text.isprintable() else ascii(text)[1:-1]


def _problem_text(ping: object) -> str:
    """What a host's ping says beyond "ok": why it may not take writes."""
    return "" if ping is True else f"\n    UNHEALTHY: {ping}"


def _stats_text(stats: ShardStats) -> str:
    """One line of a shard's ShardStats: positions, tick age, counters."""
    fields = stats._asdict()
    ts_us = fields.pop("last_tick_ts_us")
    age = f"{(time.time_ns() // 1000 - ts_us) / 1e6:.1f}s" if ts_us else "no tick yet"
    head = f"positions={fields.pop('positions')} tick_age={age}"
    del fields["name"]
    return head + " " + " ".join(f"{k}={v}" for k, v in fields.items())


def audit(settings: Settings, as_json: bool, offline: bool) -> int:
    """Check the ledger invariant on the live cluster; non-zero exit on any difference."""
    if offline:
        return _audit_offline(settings, as_json)
    return _on_cluster(settings, "audit", 2, lambda: _audit_live(settings, as_json))


def _audit_live(settings: Settings, as_json: bool) -> int:
    import ray

    from cluster.actors.deploy import service_from_names
    from cluster.actors.port import Unavailable

    try:
        problems, totals = asyncio.run(
            service_from_names(settings, namespace=NAMESPACE).audit())
    # Unavailable: the ports' one error for a host that does not answer (Ray's failures)
    except (ValueError, Unavailable, ray.exceptions.RayError) as exc:
        print(f"shardex audit: the platform does not answer: {exc}", file=sys.stderr)
        return 2
    return _print_audit(problems, totals, as_json)


def _print_audit(problems: list[AuditDifference], totals: dict[str, object], as_json: bool,
                 source: Path | None = None, released: dict[int, int] | None = None) -> int:
    """The audit's report on stdout (``source``: the DATA_DIR an offline audit recovered;
    ``released``: the margin its start reconciliation released, micros per user); its exit
    code, 1 on any difference. The JSON's ``differences`` are the differences' texts."""
    if as_json:
        report: dict[str, object] = {"ok": not problems,
                                     "differences": [p.text for p in problems],
                                     "totals": totals}
        if source is not None:
            report["source"] = str(source)
        if released is not None:
            report["released_at_start"] = released
        print(json.dumps(report, default=str))
    else:
        for problem in problems:
            print(f"DIFFERENCE: {problem.text}")
        if released:
            print(f"a start releases margin no open position or order backs (micros per "
                  f"user): {released}")
        head = "audit" if source is None else f"audit (offline, {source})"
        print(f"{head}: {'OK' if not problems else f'{len(problems)} difference(s)'}; "
              f"totals {totals}")
    return 0 if not problems else 1


def _audit_offline(settings: Settings, as_json: bool) -> int:
    """The audit over the state the next start would serve, made from DATA_DIR without
    writing to it (the platform must be stopped).

    The hosts recover read-only (cluster.durability.runner): the same recovery as a start, no
    repair of a torn journal tail, no snapshot, the journals' locks held shared (a running
    platform holds them: refused). Then what a start does before the API serves runs on them,
    in memory only: shards resume their numbering, and the reconciler's start round settles
    what a crash left half done (a settlement still in an outbox, a pending clientOrderId, a
    lock whose open never went out). Margin that round releases is not a difference, since
    the start releases it too; it is reported beside the audit (``released_at_start``).
    """
    from cluster.actors.local import LocalHosts

    root = settings.data_dir
    if not (root / LEDGER).is_dir():  # the ledger's directory
        print(f"shardex audit --offline: no recorded state in DATA_DIR={root.resolve()} (no "
              f"{LEDGER} directory in it): set DATA_DIR to the directory the platform was "
              "started with", file=sys.stderr)
        return 2
    try:
        check_layout(settings)
    except LaunchError as exc:
        print(f"shardex audit --offline: {exc}", file=sys.stderr)
        return 2
    try:
        hosts = LocalHosts(settings, str(root), readonly=True, made=hosts_made(settings))
    except Exception as exc:  # a held lock (platform running), an unreadable store, a journal gone
        print(f"shardex audit --offline: cannot recover {root}: {exc}", file=sys.stderr)
        return 2
    try:
        released, problems, totals = asyncio.run(_audit_as_started(hosts.service()))
    finally:
        hosts.close()
    return _print_audit(problems, totals, as_json, source=root, released=released)


async def _audit_as_started(service: Any) -> tuple[dict[int, int], list[AuditDifference],
                                                   dict[str, object]]:
    """The start's reconciliation over ``service``'s hosts, then one audit read:
    ``(released, differences, totals)``."""
    try:
        released: dict[int, int] = await service.reconciler.at_start()
        problems, totals = await service.audit(attempts=1)
    finally:
        await service.aclose()
    return released, problems, totals
