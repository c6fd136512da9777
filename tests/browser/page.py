"""Waiting on the page and sizing its screen, for the browser tests."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any
from typing import TypeVar
from typing import cast

from selenium.common.exceptions import StaleElementReferenceException
from selenium.common.exceptions import TimeoutException
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.support.wait import WebDriverWait

T = TypeVar("T")

WAIT_S = 30.0
"""Upper bound of every wait for the page: the page polls prices every second and the account
every 2 s without the WebSocket streams, and two cores also run Ray, Kafka and Chromium."""

DESKTOP = (1366, 800)
PHONE = (390, 844)


def set_viewport(driver: WebDriver, width: int, height: int) -> None:
    """A screen of ``width`` x ``height`` CSS pixels at scale 1, a phone's (mobile viewport
    rules) below 600 px. A page that asks for ``width=device-width``, as the terminal does, is
    laid out at exactly that size (this waits for it); a blank page is not."""
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
        "width": width, "height": height, "deviceScaleFactor": 1, "mobile": width < 600})
    if driver.execute_script("return document.querySelector('meta[name=viewport]') !== null;"):
        wait_until(driver, lambda d: d.execute_script(
            "return [window.innerWidth, window.innerHeight];") == [width, height],
            f"a {width}x{height} viewport")


def wait_until(driver: WebDriver, condition: Callable[[WebDriver], T | None], what: str,
               timeout_s: float = WAIT_S) -> T:
    """``condition(driver)`` once it is truthy (retried while elements are replaced)."""

    def attempt(d: Any) -> T | None:
        try:
            return condition(d)
        except StaleElementReferenceException:
            return None

    try:
        result = WebDriverWait(driver, timeout_s, poll_frequency=0.1).until(attempt)
    except TimeoutException as exc:
        raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}") from exc
    return cast(T, result)
