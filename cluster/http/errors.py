"""Error answers: every result code mapped to its HTTP status in one table, and the SPEC's
error shape ``{"error": {"code", "message"}}``."""

from __future__ import annotations

import json
from collections.abc import Mapping

from starlette.exceptions import HTTPException
from starlette.responses import Response

from engine.results import Code, Rejected

STATUS_OF_CODE: dict[Code, int] = {
    Code.INVALID_REQUEST: 422,  # 400 for a body that is not JSON, 413 for one that is too large
    Code.UNAUTHORIZED: 401,
    Code.NOT_FOUND: 404,
    Code.INSUFFICIENT_BALANCE: 409,
    Code.PRICE_MOVED: 409,
    Code.ORDER_NOT_OPEN: 409,
    Code.TOO_MANY_POSITIONS: 409,
    Code.TOO_MANY_ORDERS: 409,
    Code.UNKNOWN_ASSET: 422,
    Code.LEVERAGE_OUT_OF_RANGE: 422,
    Code.INVALID_TRIGGER: 422,
    Code.WOULD_LIQUIDATE: 422,
    Code.RATE_LIMITED: 429,
    Code.PRICE_UNAVAILABLE: 503,
    Code.SERVICE_UNAVAILABLE: 503,
}
# Answers of the HTTP machinery itself, outside the trading codes.
METHOD_NOT_ALLOWED = "METHOD_NOT_ALLOWED"
INTERNAL_ERROR = "INTERNAL_ERROR"  # a bug: never for any client input


def json_bytes(content: object) -> bytes:
    """``content`` as compact JSON in UTF-8, with ``\\u`` escapes where it holds what UTF-8
    cannot: a lone surrogate (a client's text an error quotes, a market message's
    ``source`` written ``"\\ud800"``)."""
    try:
        return json.dumps(content, separators=(",", ":"), ensure_ascii=False).encode()
    except UnicodeEncodeError:
        return json.dumps(content, separators=(",", ":")).encode()


def error_body(code: str, message: str) -> bytes:
    """The SPEC error shape as JSON bytes (:func:`json_bytes`)."""
    return json_bytes({"error": {"code": code, "message": message}})


def error_response(status_code: int, code: str, message: str,
                   headers: Mapping[str, str] | None = None) -> Response:
    return Response(error_body(code, message), status_code=status_code,
                    media_type="application/json", headers=headers)


def rejected_response(rejected: Rejected) -> Response:
    """The error answer of ``rejected``; a 429 RATE_LIMITED (the ledger's bound on the
    clientOrderIds an account holds) or a 503 SERVICE_UNAVAILABLE (its locks under way at
    their bound) says when to retry, as every 429 and 503 SERVICE_UNAVAILABLE does: its
    ``retry_after_s``, at least 1 s."""
    headers = None
    if rejected.code in (Code.RATE_LIMITED, Code.SERVICE_UNAVAILABLE):
        headers = {"Retry-After": str(max(1, rejected.retry_after_s))}
    return error_response(STATUS_OF_CODE[rejected.code], rejected.code.value, rejected.message,
                          headers)


class ApiError(HTTPException):
    """An error answer raised from a dependency, a parser or a handler.

    An HTTPException, so FastAPI passes it through unchanged even while it reads the body.
    """

    def __init__(self, code: Code, message: str, *, status_code: int | None = None,
                 headers: Mapping[str, str] | None = None) -> None:
        super().__init__(STATUS_OF_CODE[code] if status_code is None else status_code, message,
                         dict(headers) if headers else None)
        self.code, self.message = code, message


def invalid(message: str, status_code: int = 422) -> ApiError:
    """INVALID_REQUEST: 422 for a value the API refuses, 400 for a body it cannot read."""
    return ApiError(Code.INVALID_REQUEST, message, status_code=status_code)
