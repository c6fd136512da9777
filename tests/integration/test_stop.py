"""What a Ctrl-C (SIGINT) of ``shardex up`` does for the clients connected to it.

One real ``shardex up`` process (tests/integration/up_platform.py: durable, its own embedded
broker, ``FEED_SOURCE=none`` with the test's prices on the topic). While two WebSocket clients
follow ``bookTicker.SOL`` and an ``account`` stream, one HTTP client reads ``GET /api/v1/state``
and another opens positions, all over real sockets, the process gets SIGINT:

- each WebSocket client receives a close frame with code 1001 (going away) before its connection
  ends: the server closes it, it does not just vanish;
- every HTTP answer during the stop is the normal one (200, 201): the API stops before the
  ledger and shards behind it, so no request meets an API whose actors are gone (a 503);
  once the API has stopped, a request is refused at the connection;
- every open acknowledged during the stop is in the state the stop leaves in DATA_DIR
  (``audit --offline``), which is clean.

Kept apart from tests/integration/test_launcher.py's Ctrl-C case, which checks that a stop with
no client connected leaves nothing at all on the API port: a connection the server closes
leaves the kernel's TIME_WAIT record of it there.
"""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
from engine.assets import DEFAULT_ASSETS
from tests.integration.processes import descendants
from tests.integration.up_platform import UpPlatform
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.slow

PRICES = {"SOL": ("100.00", "100.01")}
START_BUDGET_S = 150.0
STOP_BUDGET_S = 60.0  # a stop that takes longer is a hang (the launcher bounds every step)
GOING_AWAY = 1001  # RFC 6455: the server is going down
MARGIN_MICROS = 1_000_000  # each open of the writer: margin 1
MAX_OPENS = 150  # below the 200 open positions an account may have


class Follower:
    """A WebSocket client of ``/ws`` that sends ``requests``, then reads every frame from a
    thread of its own until its connection ends; ``closed`` is how it ended."""

    def __init__(self, url: str, *requests: dict[str, Any]) -> None:
        self.url = url.replace("http://", "ws://") + "/ws"
        self.requests = requests
        self.frames: list[dict[str, Any]] = []
        self.closed: ConnectionClosed | None = None
        self.failed: BaseException | None = None
        self.ws: ClientConnection | None = None
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()

    def _read(self) -> None:
        try:
            with ws_connect(self.url, open_timeout=10) as ws:
                self.ws = ws
                for request in self.requests:
                    ws.send(json.dumps(request))
                while True:
                    self.frames.append(json.loads(ws.recv()))
        except ConnectionClosed as exc:
            self.closed = exc
        except BaseException as exc:
            self.failed = exc

    def wait_frame(self, stream: str, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(f.get("stream") == stream for f in self.frames):
            assert self.failed is None and self.closed is None, (self.failed, self.closed)
            assert time.monotonic() < deadline, f"no {stream} frame: {self.frames[:5]}"
            time.sleep(0.05)


class Client:
    """An HTTP client sending one kind of request in a loop from its own thread until
    ``done`` is set, counting its outcomes: a status code, or ``refused`` (no connection,
    nothing sent), or ``cut`` (the connection ended without an answer: the request may or
    may not have reached the server). ``after_stop`` counts those seen after ``stop_at``;
    ``pause_s`` is the wait between two requests, ``limit`` the most it sends."""

    def __init__(self, url: str, send: Any, pause_s: float, limit: int = 1 << 30) -> None:
        self.client = httpx.Client(base_url=url, timeout=10)
        self.send = send
        self.pause_s = pause_s
        self.limit = limit
        self.outcomes: Counter[str] = Counter()
        self.after_stop: Counter[str] = Counter()
        self.last = ""
        self.stop_at: float | None = None
        self.done = threading.Event()
        self.count = 0
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.done.is_set() and self.count < self.limit:
            self.count += 1
            try:
                outcome = str(self.send(self.client, self.count).status_code)
            except httpx.ConnectError:
                outcome = "refused"
            except httpx.TransportError:
                outcome = "cut"
            self.outcomes[outcome] += 1
            if self.stop_at is not None:
                self.after_stop[outcome] += 1
            self.last = outcome
            time.sleep(self.pause_s)
        self.client.close()


@pytest.mark.timeout(420)
def test_ctrl_c_closes_websockets_with_1001_and_answers_every_request(tmp_path: Path) -> None:
    # as from a shell that exported Serve's fast path (or a process that started a platform
    # before): Serve, imported with it set, runs a handle's router in the caller's event loop
    platform = UpPlatform(tmp_path, DEFAULT_ASSETS, PRICES,
                          env={"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1"})
    followers: list[Follower] = []
    clients: list[Client] = []
    try:
        started_s = platform.start(START_BUDGET_S)
        print(f"\nshardex up serving after {started_s:.1f} s")
        assert platform.proc is not None
        key = httpx.post(f"{platform.url}/api/v1/accounts", json={},
                         timeout=10).json()["apiKey"]
        auth = {"Authorization": f"Bearer {key}"}

        market = Follower(platform.url, {"method": "SUBSCRIBE", "params": ["bookTicker.SOL"]})
        account = Follower(platform.url, {"method": "AUTH", "params": [key]},
                           {"method": "SUBSCRIBE", "params": ["account"]})
        followers += [market, account]
        market.wait_frame("bookTicker.SOL")
        account.wait_frame("account")

        reader = Client(platform.url, lambda c, _: c.get("/api/v1/state", headers=auth),
                        pause_s=0.05)
        writer = Client(platform.url, lambda c, n: c.post(
            "/api/v1/positions/open", headers=auth,
            json={"asset": "SOL", "type": "long", "margin": "1", "leverage": 2,
                  "clientOrderId": f"during-the-stop-{n}"}), pause_s=0.2, limit=MAX_OPENS)
        clients += [reader, writer]
        for client in clients:
            client.thread.start()
        deadline = time.monotonic() + 30
        while not (reader.outcomes["200"] and writer.outcomes["201"]):
            assert time.monotonic() < deadline, (reader.outcomes, writer.outcomes)
            time.sleep(0.05)

        platform.started_below += descendants(platform.proc.pid)  # for the cleanup
        stopped_at = time.monotonic()
        for client in clients:
            client.stop_at = stopped_at
        platform.proc.send_signal(signal.SIGINT)
        try:
            code = platform.proc.wait(STOP_BUDGET_S)
        except subprocess.TimeoutExpired:
            platform.proc.kill()
            raise
        stop_s = time.monotonic() - stopped_at
        # what the clients meet once the process is gone: a refused connection
        deadline = time.monotonic() + 30
        for client in clients:
            refused = client.outcomes["refused"]
            while client.outcomes["refused"] == refused and client.thread.is_alive():
                assert time.monotonic() < deadline, \
                    f"the API still answers after its process exited: {client.outcomes}"
                time.sleep(0.05)
            client.done.set()
            client.thread.join(30)
        for follower in followers:
            follower.thread.join(30)
        closes = [f.closed.rcvd if f.closed is not None else None for f in followers]
        print(f"stop took {stop_s:.1f} s; state reads {dict(reader.outcomes)} (after SIGINT "
              f"{dict(reader.after_stop)}); opens {dict(writer.outcomes)} (after SIGINT "
              f"{dict(writer.after_stop)}); WebSocket close frames received {closes}")

        out = platform.log.read_text()
        assert code == 0, out[-4000:]
        assert "shardex: stopped" in out, out[-4000:]
        # each WebSocket client was told the server is going away, with a close frame
        for follower in followers:
            assert follower.failed is None, follower.failed
            assert not [f for f in follower.frames if "error" in f], follower.frames
            assert follower.closed is not None, "the connection is still open"
            assert follower.closed.rcvd is not None, \
                f"the connection ended without a close frame: {follower.closed!r}\n{out[-4000:]}"
            assert follower.closed.rcvd.code == GOING_AWAY, follower.closed.rcvd
        # every HTTP answer was the normal one; the stop only ever refused or cut connections
        assert set(reader.outcomes) <= {"200", "refused", "cut"}, reader.outcomes
        assert set(writer.outcomes) <= {"201", "refused", "cut"}, writer.outcomes
        assert writer.count < MAX_OPENS, "the writer ran out of opens before the stop ended"
        assert reader.last == "refused" and writer.last == "refused"
        # every acknowledged open is in the state left in DATA_DIR; an open whose connection
        # was cut may or may not be
        offline = platform.cli("audit", "--offline", "--json")
        assert offline.returncode == 0, offline.stdout + offline.stderr
        report = json.loads(offline.stdout.strip().splitlines()[-1])
        assert report["ok"] is True, report
        locked = report["totals"]["users_margin_micros"]
        acknowledged = writer.outcomes["201"] * MARGIN_MICROS
        assert acknowledged <= locked <= acknowledged + writer.outcomes["cut"] * MARGIN_MICROS, \
            (report["totals"], writer.outcomes)
    finally:
        for client in clients:
            client.done.set()
        for follower in followers:
            if follower.ws is not None:
                follower.ws.close()
        platform.stop()
