"""Browser fixtures: the whole platform on Ray (prices produced to the Kafka topic), and headless
Chromium driven by selenium through the system's chromedriver, a fresh profile for every test.

Chromium and chromedriver come from the distribution's packages (``make browser``, which
``make test`` runs first); when either is missing the tests fail and say so.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cluster.config import Settings
from selenium import webdriver
from selenium.webdriver.chrome.options import Options
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.chrome.webdriver import WebDriver
from tests.browser.page import DESKTOP
from tests.browser.page import PageClock
from tests.browser.page import set_viewport
from tests.browser.proxy import Relay
from tests.e2e.ray_platform import RayHttpPlatform

# Console lines that are not the page's own faults: an API answer >= 400 (the tests provoke
# some) and a WebSocket that cannot connect (the page falls back to polling).
_EXPECTED_CONSOLE = ("Failed to load resource", "WebSocket connection to")


PAGE_CLOCK_K = 4
"""How many times faster than the real one the clock of a ``page_clock`` test's page runs."""


def _executable(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} is not installed: run `make browser` (Debian packages chromium, "
                    "chromium-driver)", pytrace=False)
    return path


@pytest.fixture(scope="module")
def platform(kafka_broker: str) -> Iterator[RayHttpPlatform]:
    """One platform for the module, durable as ``shardex up`` runs it (a killed ledger or shard
    comes back from its journal). Prices may be up to four hours old, so that ticks produced
    with timestamps of the last hours draw a chart history; the jump band and the signup and
    request limits are off (their own tests are elsewhere): the tests read prices and candles
    from the page's address as fast as they wait for them."""
    settings = Settings(max_price_age_s=4 * 3600, max_tick_jump_bps=1_000_000,
                        api_key_rate_per_s=0, signups_per_min=0, public_rate_per_s=0)
    p = RayHttpPlatform(kafka_broker, settings, topic=f"browser-{os.getpid()}",
                        ray_init={"_node_ip_address": "127.0.0.1"}, durable=True)
    p.start()
    try:
        yield p
        # every browser session's trades, closes and liquidations left the ledger balanced
        assert p.audit() == []
    finally:
        p.stop()


@pytest.fixture
def http(platform: RayHttpPlatform) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.base_url, timeout=10) as client:
        yield client


@pytest.fixture
def relay(platform: RayHttpPlatform) -> Iterator[Relay]:
    """The platform at another port, behind a relay that fails as a network does (a test that
    also takes ``browser`` names ``relay`` first: the browser goes before the relay)."""
    r = Relay(platform.base_url)
    r.start()
    try:
        yield r
    finally:
        r.stop()


@pytest.fixture
def browser(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[WebDriver]:
    """Headless Chromium at 1366x800 with a new profile; on the way out a screenshot goes to
    ``tmp_path/<test name>.png`` and the page must not have logged an uncaught error."""
    options = Options()
    options.binary_location = _executable("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage",
                f"--user-data-dir={tmp_path / 'profile'}",
                f"--window-size={DESKTOP[0]},{DESKTOP[1]}", "--no-first-run",
                "--no-default-browser-check", "--disable-extensions",
                "--disable-background-networking", "--disable-component-update",
                "--disable-gpu", "--force-device-scale-factor=1", "--lang=en-US"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    service = Service(executable_path=_executable("chromedriver"),
                      log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=options, service=service)
    try:
        set_viewport(driver, *DESKTOP)
        yield driver
        driver.save_screenshot(str(tmp_path / f"{request.node.name}.png"))
        errors = [entry["message"] for entry in driver.get_log("browser")
                  if entry["level"] == "SEVERE"
                  and not any(text in entry["message"] for text in _EXPECTED_CONSOLE)]
        assert errors == [], f"the page logged errors: {errors}"
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)


@pytest.fixture
def page_clock(browser: WebDriver) -> PageClock:
    """The pages ``browser`` loads run their clock and timers ``PAGE_CLOCK_K`` times faster,
    for a test whose time goes in waiting out the page's own timers: the seconds its docstring
    and comments give are page seconds, and it sleeps them with ``page_clock.sleep``. Waits
    for the server stay real."""
    return PageClock(browser, PAGE_CLOCK_K)
