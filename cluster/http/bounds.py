"""What a request may be before the app reads it, the same in both HTTP servers of the platform
(the API replica's uvicorn, cluster.http.server; the front door's HAProxy,
cluster.http.front_door), and their refusals as whole HTTP responses in SPEC's error shape.

A light module: the front door's command imports it at every HAProxy start and reload.
"""

from __future__ import annotations

from collections.abc import Mapping

from cluster.http.errors import error_body

MAX_HEAD_BYTES = 64 * 1024
"""Most bytes of a request line and headers (nginx's default allows 32 KiB; browsers send a
few hundred bytes)."""

MAX_QUERY_PARAMETERS = 64
"""Most parameters of a request's query (its ``&``-separated fields; a route takes at most five).
Parsing a query costs about a microsecond a field, a few times over per request: 15,000 fields
in a head under :data:`MAX_HEAD_BYTES` took 14-30 ms of a replica's CPU for a 401."""

READ_TIMEOUT_S = 30
"""Most seconds from a connection's start, or a request's first byte, to the end of the
request (a 16 KiB body takes 16 s at 1 KiB/s)."""

RETRY_AFTER_S = 1
"""``Retry-After`` of a 503 ``SERVICE_UNAVAILABLE`` (a component did not answer): Serve's health
checks take a dead API replica out of the rotation, and Ray restarts a dead host, within about
a second."""


def body_too_large(max_body_bytes: int) -> str:
    """The message of the 413 for a body over ``max_body_bytes``, whichever layer refuses it
    (the replica's server on a declared length, the app's limit on what arrives)."""
    return f"request body larger than {max_body_bytes} bytes"


def raw_error(status: str, code: str, message: str, *, close: bool = True,
              headers: Mapping[str, str] | None = None) -> bytes:
    """A whole HTTP/1.1 response (``status``: e.g. ``"408 Request Timeout"``) whose body is
    SPEC's error shape; ``close``: it ends the connection."""
    body = error_body(code, message)
    lines = [f"HTTP/1.1 {status}", "content-type: application/json",
             f"content-length: {len(body)}",
             *(f"{name}: {value}" for name, value in (headers or {}).items())]
    if close:
        lines.append("connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body
