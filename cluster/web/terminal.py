"""Routes of the web trading terminal: ``GET /`` (the page) and ``GET /static/{path}`` (its
scripts, styles and the vendored chart library), from the files in ``static/`` next to this
module; and ``GET /docs``, the API's interactive documentation (Swagger UI, vendored there too,
so the page works on a machine without internet access). Public: no key, no rate limit by key.

Files are answered only from that directory (a path that resolves outside it, a hidden name, or
a directory is 404), with revalidating cache headers (``no-cache`` with the ETag Starlette's
FileResponse sets), so a browser never mixes the modules of two versions after an upgrade.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, Response
from starlette.responses import MalformedRangeHeader, RangeNotSatisfiable

from cluster.http.errors import error_response

STATIC_DIR = Path(__file__).resolve().parent / "static"
_TYPES = {".js": "text/javascript", ".css": "text/css", ".html": "text/html",
          ".md": "text/plain", "": "text/plain"}
_HEADERS = {"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
_NOT_FRAMED = {"X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer"}
# the <style> the chart library adds for its attribution link (the link its license asks for):
# its hash, as the page allows no other inline style
_CHART_STYLE = "'sha256-3pRED1tOXas1FXFoPb9TGCjmYe9XQsmO9OV23khV2nY='"
_PAGE_HEADERS = {
    **_HEADERS, **_NOT_FRAMED,
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; "
                               f"style-src 'self' {_CHART_STYLE}; img-src 'self' data:; "
                               "connect-src 'self'; base-uri 'none'; form-action 'none'; "
                               "frame-ancestors 'none'"}
# Swagger UI's page starts itself with an inline script: only its framing is bound
_DOCS_HEADERS = {**_NOT_FRAMED, "X-Content-Type-Options": "nosniff",
                 "Content-Security-Policy": "frame-ancestors 'none'"}


class _File(FileResponse):
    """Starlette's FileResponse, ignoring a ``Range`` it cannot serve (malformed, another unit,
    past the end) and sending the whole file, as RFC 9110 14.2 allows: Starlette answers those
    itself in plain text or with an empty 416, not in SPEC's error shape."""

    @classmethod
    def _parse_range_header(cls, http_range: str, file_size: int) -> list[tuple[int, int]]:
        try:
            return super()._parse_range_header(http_range, file_size)
        except (MalformedRangeHeader, RangeNotSatisfiable):
            return []  # no range: the whole file


def static_file(path: str) -> Path | None:
    """The file ``path`` (relative, ``/``-separated) names inside :data:`STATIC_DIR`, or None."""
    parts = path.split("/")
    if not path or any(not p or p.startswith(".") for p in parts):
        return None
    try:
        target = (STATIC_DIR / Path(*parts)).resolve()
        if not target.is_relative_to(STATIC_DIR) or not target.is_file():
            return None
    except (ValueError, OSError):  # a NUL byte, a name or path too long for the file system
        return None
    return target


def add_terminal_routes(app: FastAPI) -> None:
    """``GET /``, ``GET /static/{path}`` and ``GET /docs`` on ``app`` (created with
    ``docs_url=None``: FastAPI's own page loads Swagger UI from a CDN)."""

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        # data:, as the icon: the page asks no other host for anything
        page = get_swagger_ui_html(openapi_url=app.openapi_url or "/openapi.json",
                                   title=f"{app.title} API",
                                   swagger_js_url="/static/vendor/swagger-ui-bundle.js",
                                   swagger_css_url="/static/vendor/swagger-ui.css",
                                   swagger_favicon_url="data:,")
        page.headers.update(_DOCS_HEADERS)
        return page

    @app.get("/", tags=["terminal"], operation_id="terminal", response_class=FileResponse,
             responses={200: {"content": {"text/html": {}},
                              "description": "the web trading terminal"}})
    async def terminal() -> Response:
        """The web trading terminal (public, static)."""
        return _File(STATIC_DIR / "index.html", media_type="text/html", headers=_PAGE_HEADERS)

    @app.get("/static/{path:path}", tags=["terminal"], operation_id="terminalFile",
             response_class=FileResponse,
             responses={200: {"description": "a file of the terminal"},
                        404: {"description": "no such file", "content": {"application/json": {
                            "schema": {"$ref": "#/components/schemas/ErrorOut"}}}}})
    async def terminal_file(path: str) -> Response:
        """A script, style sheet or library file of the terminal."""
        target = static_file(path)
        if target is None:
            return error_response(404, "NOT_FOUND", "no such file")
        media_type = _TYPES.get(target.suffix, "application/octet-stream")
        return _File(target, media_type=media_type, headers=_HEADERS)


__all__ = ["STATIC_DIR", "add_terminal_routes", "static_file"]
