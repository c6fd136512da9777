"""Waiting on the page, sizing its screen and speeding up its clock, for the browser tests."""

from __future__ import annotations

import time
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


# Before the page's own scripts: its clock runs K times faster from now on. Date.now(),
# new Date() and Date() read t0 + (real - t0) * K; performance.now(), an event's timeStamp and a
# requestAnimationFrame's time (the chart's animations and gestures) are scaled alike from their
# own origin, so that every time the page compares reads one clock; setTimeout, setInterval and
# AbortSignal.timeout wait a K-th of their delay. A Date made from a given time is that time.
PAGE_CLOCK_JS = """
((K) => {
  const RealDate = Date;
  const realNow = RealDate.now.bind(RealDate);
  const t0 = realNow();
  const now = () => Math.round(t0 + (realNow() - t0) * K);
  window.Date = new Proxy(RealDate, {
    construct: (target, args, newTarget) =>
      Reflect.construct(target, args.length ? args : [now()], newTarget),
    apply: () => new RealDate(now()).toString(),
    get: (target, name, receiver) => (name === "now" ? now : Reflect.get(target, name, receiver)),
  });

  const realPerformanceNow = performance.now.bind(performance);
  const p0 = realPerformanceNow();
  const scaled = (t) => p0 + (t - p0) * K;
  performance.now = () => scaled(realPerformanceNow());
  const timeStamp = Object.getOwnPropertyDescriptor(Event.prototype, "timeStamp");
  Object.defineProperty(Event.prototype, "timeStamp", {
    ...timeStamp, get() { return scaled(timeStamp.get.call(this)); },
  });
  const realFrame = window.requestAnimationFrame.bind(window);
  window.requestAnimationFrame = (callback) => realFrame((t) => callback(scaled(t)));

  const realTimeout = window.setTimeout.bind(window);
  const realInterval = window.setInterval.bind(window);
  const sooner = (delay) => (Number(delay) || 0) / K;
  window.setTimeout = (handler, delay, ...args) => realTimeout(handler, sooner(delay), ...args);
  window.setInterval = (handler, delay, ...args) => realInterval(handler, sooner(delay), ...args);
  const realSignalTimeout = AbortSignal.timeout.bind(AbortSignal);
  AbortSignal.timeout = (delay) => realSignalTimeout(delay / K);
})"""


class PageClock:
    """The clock of the pages ``driver`` loads from now on, ``k`` times faster than the real one
    (their timers fire ``k`` times sooner)."""

    def __init__(self, driver: WebDriver, k: float) -> None:
        self.k = k
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                               {"source": f"{PAGE_CLOCK_JS}({k!r});"})

    def real_s(self, page_s: float) -> float:
        """The real seconds in which ``page_s`` pass on the page."""
        return page_s / self.k

    def sleep(self, page_s: float) -> None:
        """Until ``page_s`` seconds have passed on the page."""
        time.sleep(self.real_s(page_s))
