"""``shardex up`` in a terminal that closes (the window shut, the ssh session dropped): the
kernel hangs up the terminal, sends SIGHUP to its foreground process group (``up`` and Ray's
own processes), and every later write to it fails with EIO. ``up`` stops as on Ctrl-C."""

from __future__ import annotations

import fcntl
import os
import pty
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest
from feed.broker import free_ports
from tests.integration.processes import descendants

REPO = Path(__file__).resolve().parents[2]
START_BUDGET_S = 120.0

pytestmark = pytest.mark.slow


def _own_terminal() -> None:
    """(in the child) a session of its own whose controlling terminal is its stdin, the pty."""
    os.setsid()
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


@pytest.mark.timeout(300)
def test_up_stops_cleanly_when_its_terminal_hangs_up(tmp_path: Path) -> None:
    """Exit 0, its records gone from DATA_DIR, nothing it started left running, the state
    audits clean offline. Python's default for SIGHUP ended ``up`` at once, as a ``kill -9``
    does: the records stayed, and the next start took it for a crash."""
    data_dir = tmp_path / "data"
    port = free_ports(2)  # the API's and the broker's, never one port twice
    env = {**os.environ, "PYTHONPATH": str(REPO), "PORT": str(port),
           "FEED_SOURCE": "sim", "DATA_DIR": str(data_dir)}
    for name in ("RAY_ADDRESS", "KAFKA_BROKERS"):
        env.pop(name, None)
    master, slave = pty.openpty()
    run = subprocess.Popen(
        [sys.executable, "-m", "cluster.cli", "up", "--broker-port", str(port + 1)],
        cwd=REPO, env=env, stdin=slave, stdout=slave, stderr=slave,
        preexec_fn=_own_terminal)
    os.close(slave)
    out = b""
    try:
        deadline = time.monotonic() + START_BUDGET_S
        while b"shardex is up" not in out:
            assert run.poll() is None and time.monotonic() < deadline, out.decode()
            try:
                out += os.read(master, 1 << 16)
            except OSError:  # EIO: every end of the slave closed, it exited
                break
        while b"shards:" not in out:  # the banner whole: its signal handlers are its own
            out += os.read(master, 1 << 16)
        below = descendants(run.pid)
        os.close(master)  # the terminal hangs up
        master = -1
        code = run.wait(60)
    finally:
        if master >= 0:
            os.close(master)
        if run.poll() is None:
            run.kill()
            run.wait(30)
    assert code == 0, out.decode()
    assert not (data_dir / "ray-address.json").exists()
    assert not (data_dir / "embedded-broker.json").exists()
    deadline = time.monotonic() + 30
    while left := [p for p in below if p.alive()]:
        assert time.monotonic() < deadline, f"left running after the stop: {left}"
        time.sleep(0.2)
    offline = subprocess.run([sys.executable, "-m", "cluster.cli", "audit", "--offline"],
                             cwd=REPO, env=env, capture_output=True, text=True, timeout=90)
    assert offline.returncode == 0, offline.stdout + offline.stderr
