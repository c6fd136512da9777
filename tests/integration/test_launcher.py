"""``shardex up`` as a user runs it: foreground process, one banner, prices served, ``status``
and ``audit --json`` against it from other processes, a clean stop on Ctrl-C, and
``audit --offline`` over the journaled state it left in DATA_DIR."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _cli(*args: str, env: dict[str, str], timeout_s: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout_s)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_up_serves_prices_reports_status_and_audit_and_stops_cleanly(
        kafka_broker: str, tmp_path: Path) -> None:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO), "PORT": str(port), "FEED_SOURCE": "sim",
           "KAFKA_BROKERS": kafka_broker, "DATA_DIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    log = (tmp_path / "up.log").open("w+")
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "up"], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT, text=True)
    try:
        started = time.monotonic()
        prices: dict[str, object] = {}
        while time.monotonic() - started < 120:
            assert proc.poll() is None, (tmp_path / "up.log").read_text()
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/api/v1/prices", timeout=2)
                prices = r.json() if r.status_code == 200 else {}
            except httpx.HTTPError:
                prices = {}
            if {"SOL", "BTC", "ETH"} <= set(prices):
                break
            time.sleep(0.5)
        assert {"SOL", "BTC", "ETH"} <= set(prices), (tmp_path / "up.log").read_text()
        out = (tmp_path / "up.log").read_text()
        assert out.count("shardex is up") == 1 and f"http://127.0.0.1:{port}" in out
        assert "feed source: sim" in out and "shard-SOL-0" in out

        status = _cli("status", env=env)
        assert status.returncode == 0, status.stdout + status.stderr
        for name in ("shard-SOL-0", "shard-BTC-0", "shard-ETH-0"):
            assert name in status.stdout
        assert "tick_age=" in status.stdout and "feed: node" in status.stdout
        # the feed's drops by reason (the sim source sends none: "none" until one is dropped)
        assert re.search(r"dropped: (none|[a-z_]+=\d+)", status.stdout), status.stdout

        base = f"http://127.0.0.1:{port}/api/v1"
        key = httpx.post(f"{base}/accounts", json={}, timeout=10).json()["apiKey"]
        opened = httpx.post(f"{base}/positions/open", timeout=10,
                            headers={"Authorization": f"Bearer {key}"},
                            json={"asset": "BTC", "type": "long", "margin": "25", "leverage": 3})
        assert opened.status_code == 201, opened.text

        audit = _cli("audit", "--json", env=env)
        assert audit.returncode == 0, audit.stdout + audit.stderr
        report = json.loads(audit.stdout.strip().splitlines()[-1])
        assert report["ok"] is True and report["totals"]["sum_micros"] == 0
        assert report["totals"]["users_margin_micros"] == 25_000_000
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise
    out = (tmp_path / "up.log").read_text()
    assert code == 0, out
    assert "shardex: stopped" in out
    with socket.socket() as s:  # the API port is free again
        s.bind(("127.0.0.1", port))
    assert not (tmp_path / "ray-address.json").exists()
    # the journaled state left in DATA_DIR audits clean offline, with the open position in it
    offline = _cli("audit", "--offline", "--json", env=env)
    assert offline.returncode == 0, offline.stdout + offline.stderr
    report = json.loads(offline.stdout.strip().splitlines()[-1])
    assert report["ok"] is True and report["totals"]["users_margin_micros"] == 25_000_000
