"""The terminal's pages tell the browser what they may load and who may frame them: the page
holds an API key (localStorage) and trade buttons, so no other site may frame it, and a script
it did not ship must not run in it."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import re

import httpx
from cluster.web.terminal import STATIC_DIR
from cluster.web.terminal import add_terminal_routes
from fastapi import FastAPI

CHART_LIBRARY = STATIC_DIR / "vendor" / "lightweight-charts.standalone.production.js"


def _get(path: str) -> httpx.Response:
    app = FastAPI(docs_url=None, redoc_url=None)
    add_terminal_routes(app)

    async def ask() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://page") as http:
            return await http.get(path)
    return asyncio.run(ask())


def _policy(response: httpx.Response) -> dict[str, list[str]]:
    """``Content-Security-Policy`` as directive -> its sources."""
    directives = [d.split() for d in response.headers["content-security-policy"].split(";")]
    return {d[0]: d[1:] for d in directives if d}


def test_the_page_may_not_be_framed_and_runs_only_its_own_scripts() -> None:
    r = _get("/")
    assert r.status_code == 200
    policy = _policy(r)
    assert policy["frame-ancestors"] == ["'none'"]
    assert r.headers["x-frame-options"] == "DENY"  # for browsers without frame-ancestors
    assert policy["default-src"] == ["'none'"]
    assert policy["script-src"] == ["'self'"]  # no inline script, no eval
    assert policy["connect-src"] == ["'self'"]  # the API and its WebSocket, nowhere else
    assert policy["base-uri"] == ["'none'"] and policy["form-action"] == ["'none'"]
    assert r.headers["referrer-policy"] == "no-referrer"
    assert r.headers["x-content-type-options"] == "nosniff"


def test_the_policy_fits_the_page_and_the_chart_library() -> None:
    page = (STATIC_DIR / "index.html").read_text()
    assert not re.search(r"<script(?![^>]*\bsrc=)", page)  # every script is a file
    assert not re.search(r"<style|\sstyle=|\son[a-z]+=", page)
    # the chart's attribution link (its license asks for it) brings its own <style>
    css = re.findall(r'createElement\("style"\),this\.\w+\.innerText="([^"]+)"',
                     CHART_LIBRARY.read_text())
    assert len(css) == 1
    digest = base64.b64encode(hashlib.sha256(css[0].encode()).digest()).decode()
    assert _policy(_get("/"))["style-src"] == ["'self'", f"'sha256-{digest}'"]


def test_the_api_documentation_may_not_be_framed() -> None:
    r = _get("/docs")
    assert r.status_code == 200
    assert _policy(r)["frame-ancestors"] == ["'none'"]
    assert r.headers["x-frame-options"] == "DENY"
    assert r.headers["referrer-policy"] == "no-referrer"
