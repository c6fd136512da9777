"""The web terminal in headless Chromium against the platform on Ray: every price the page shows
was produced to the Kafka topic and reached it through the feed actor, the shards and the API;
every account, position and close went through the page's own buttons.

Whether the page gets prices and account changes from the WebSocket or, without it, by polling
REST (prices every second, the account every 2 s), what it shows must follow within the waits.

With ``SHARDEX_SCREENSHOTS=docs`` the screenshot test writes ``docs/terminal-desktop.png``
and ``docs/terminal-phone.png`` (for the README) instead of into its temporary directory.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import random
import re
import time
from decimal import Decimal as D
from pathlib import Path
from typing import Any

import httpx
import pytest
from engine.amounts import from_units
from engine.market import Tick
from engine.orders import PPM
from engine.orders import Side
from engine.orders import liquidation_ticks
from engine.orders import quantity_steps
from selenium.webdriver.chrome.webdriver import WebDriver
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.actions.wheel_input import ScrollOrigin
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.remote.webelement import WebElement
from selenium.webdriver.support import expected_conditions as EC
from selenium.webdriver.support.ui import Select
from selenium.webdriver.support.ui import WebDriverWait
from tests.browser.page import DESKTOP
from tests.browser.page import PHONE
from tests.browser.page import PageClock
from tests.browser.page import set_viewport
from tests.browser.page import wait_until
from tests.browser.proxy import Relay
from tests.e2e.api_client import tick
from tests.e2e.ray_platform import RayHttpPlatform
from websockets.sync.client import connect as ws_connect

pytestmark = pytest.mark.timeout(300)

DOCS = Path(__file__).resolve().parents[2] / "docs"
LABEL_PADDING_PX = 8  # a line label's box beyond its text (both sides)


# ------------------------------------------------------------------ page helpers
def by_id(driver: WebDriver, element_id: str) -> WebElement:
    return driver.find_element(By.ID, element_id)


def text_of(driver: WebDriver, element_id: str) -> str:
    return str(by_id(driver, element_id).text)


def open_terminal(driver: WebDriver, platform: RayHttpPlatform, via: Relay | None = None) -> None:
    """Load the page (from the platform, or ``via`` a relay in front of it) and wait until it
    listed the assets (the ticket names the one it trades)."""
    driver.get(f"{(via.url if via else platform.base_url)}/")
    wait_until(driver, lambda d: text_of(d, "ticket-asset") != "", "the asset list")


def create_account(driver: WebDriver) -> str:
    """Press `Create demo account`; the API key the page shows once logged in (whole: a new
    key is shown to be copied)."""
    by_id(driver, "create-account").click()
    wait_until(driver, lambda d: by_id(d, "logged-in").is_displayed()
               and text_of(d, "api-key") != "", "the logged-in account")
    wait_until(driver, lambda d: text_of(d, "balance-free") == "10000.00", "the balances")
    return text_of(driver, "api-key")


def masked(key: str) -> str:
    """How the page shows a kept key until asked to show it whole: its first and last four
    characters (eight dots for a key too short to show any)."""
    return f"{key[:4]}\u2026{key[-4:]}" if len(key) >= 12 else "\u2022" * 8


def mark_page(driver: WebDriver) -> None:
    """Leave a mark in the page's JavaScript state: it survives only while the page is not
    reloaded."""
    driver.execute_script("window.__notReloaded = true;")


def assert_not_reloaded(driver: WebDriver) -> None:
    assert driver.execute_script("return window.__notReloaded === true;"), "the page reloaded"


def fill(driver: WebDriver, element_id: str, value: str) -> None:
    field = by_id(driver, element_id)
    field.clear()
    field.send_keys(value)


def position_rows(driver: WebDriver) -> list[WebElement]:
    return list(driver.find_elements(By.CSS_SELECTOR, 'tr[data-testid="position-row"]'))


def wait_position_row(driver: WebDriver, asset: str, side: str) -> str:
    """The id of the one open position row of ``asset`` and ``side`` once the table shows it."""
    row = wait_until(driver, lambda d: next(
        (r for r in position_rows(d)
         if r.get_attribute("data-asset") == asset and r.get_attribute("data-side") == side),
        None), f"a {side} {asset} row in the positions table")
    position_id = row.get_attribute("data-position-id")
    assert position_id
    return str(position_id)


def closed_row(driver: WebDriver, position_id: str) -> WebElement:
    return wait_until(driver, lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, f'tr[data-testid="closed-row"][data-position-id="{position_id}"]')),
        None), f"position {position_id} in the closed positions table")


def open_long_from_ticket(driver: WebDriver, margin: str, leverage: str) -> None:
    fill(driver, "ticket-margin", margin)
    fill(driver, "ticket-leverage", leverage)
    wait_until(driver, lambda d: by_id(d, "submit-long").is_enabled(), "the Long button")
    by_id(driver, "submit-long").click()


def open_long_on_a_new_page(platform: RayHttpPlatform, driver: WebDriver, http: httpx.Client,
                            margin: str = "100", leverage: str = "10") -> tuple[str, str]:
    """A SOL long opened from the ticket of a new account's terminal at 100.00/100.01: (the
    account's API key, the position's id once its row shows)."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(driver, platform)
    key = create_account(driver)
    open_long_from_ticket(driver, margin, leverage)
    return key, wait_position_row(driver, "SOL", "long")


def wait_banner_answers_as_the_api(driver: WebDriver, http: httpx.Client, key: str, code: str,
                                   status: int, action: str, body: dict[str, Any]
                                   ) -> WebElement:
    """Until the error banner shows ``code``; then the request the page sent, sent to the API
    (``POST /api/v1/positions/<action>`` with ``body``), is answered ``status`` with that code
    and the very message the banner shows. Returns the banner."""
    banner = by_id(driver, "error-banner")
    wait_until(driver, lambda d: banner.is_displayed()
               and banner.get_attribute("data-code") == code, f"the {code} banner")
    r = http.post(f"/api/v1/positions/{action}", headers={"Authorization": f"Bearer {key}"},
                  json=body)
    assert r.status_code == status, r.text
    assert r.json()["error"]["code"] == code
    assert text_of(driver, "error-message") == r.json()["error"]["message"] != ""
    return banner


def account(http: httpx.Client, key: str) -> dict[str, Any]:
    r = http.get("/api/v1/state", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 200, r.text
    return dict(r.json())


# ------------------------------------------------------------------ tests
def on_first_screen(driver: WebDriver, element_id: str) -> bool:
    """Whether the element ``element_id`` lies whole inside the window scrolled to the top."""
    return bool(driver.execute_script(
        "const r = document.getElementById(arguments[0]).getBoundingClientRect();"
        "return window.scrollY === 0 && r.height > 0 && r.top >= 0"
        "  && r.bottom <= window.innerHeight && r.right <= window.innerWidth;", element_id))


def test_create_account_shows_the_key_and_keeps_it_across_a_reload(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """`Create demo account` shows a key the API accepts, keeps it in localStorage, and a
    reload is still logged in to the same account."""
    open_terminal(browser, platform)
    assert by_id(browser, "logged-out").is_displayed()
    assert not by_id(browser, "submit-long").is_enabled()  # nothing to trade with yet
    assert on_first_screen(browser, "create-account")

    key = create_account(browser)
    # at 1366x800 the ticket's buttons, the balances, the new key and its Copy button are seen
    # without a scroll (Copy, Show and Log out lay just below the first screen, after the note)
    browser.execute_script("window.scrollTo(0, 0);")
    assert all(on_first_screen(browser, element_id) for element_id in (
        "submit-long", "submit-short", "balance-free", "balance-equity", "api-key",
        "copy-key", "show-key", "logout"))
    account_id = text_of(browser, "account-id")
    assert account(http, key)["accountId"] == account_id
    assert browser.execute_script("return localStorage.getItem('shardex.apiKey');") == key
    assert browser.execute_script("return localStorage.getItem('shardex.accountId');") == \
        account_id
    assert "Copy your API key" in text_of(browser, "notice-text")
    assert text_of(browser, "show-key") == "Hide key"

    browser.refresh()
    # a kept key is shown by its ends alone, until asked: a shared screen does not give it away
    wait_until(browser, lambda d: by_id(d, "logged-in").is_displayed()
               and text_of(d, "api-key") == masked(key), "the kept key after the reload")
    assert key[4:-4] not in by_id(browser, "logged-in").text
    show = by_id(browser, "show-key")
    assert show.text == "Show key" and show.get_attribute("aria-pressed") == "false"
    show.click()
    assert text_of(browser, "api-key") == key
    assert show.text == "Hide key" and show.get_attribute("aria-pressed") == "true"
    show.click()
    assert text_of(browser, "api-key") == masked(key)
    # the copy is of the whole key, shown or not
    browser.execute_cdp_cmd("Browser.grantPermissions", {
        "origin": platform.base_url, "permissions": ["clipboardReadWrite",
                                                     "clipboardSanitizedWrite"]})
    by_id(browser, "copy-key").click()
    wait_until(browser, lambda d: text_of(d, "notice-text") == "API key copied.",
               "the key copied")
    assert browser.execute_async_script(
        "navigator.clipboard.readText().then(arguments[0]);") == key
    assert text_of(browser, "account-id") == account_id
    # the reloaded page reads the account with the kept key
    wait_until(browser, lambda d: text_of(d, "balance-free") == "10000.00"
               and text_of(d, "balance-equity") == "10000.00", "the balances after the reload")
    assert not by_id(browser, "logged-out").is_displayed()
    assert by_id(browser, "submit-long").is_enabled()


def answer_logout(driver: WebDriver, accept: bool) -> None:
    """Answer the page's question before it logs out (it names the key to keep)."""
    alert = WebDriverWait(driver, 5).until(EC.alert_is_present())
    assert "API key" in alert.text and "only way back" in alert.text, alert.text
    if accept:
        alert.accept()
    else:
        alert.dismiss()


def test_another_tab_logging_out_or_in_with_another_key_is_followed(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """The key is kept once per browser: a log out in a second tab logs the first one out (its
    account gone from the page, nothing to trade with), and another key there is the first
    tab's too. Before, the first tab kept trading with the key its trader had logged out of."""
    key, position_id = open_long_on_a_new_page(platform, browser, http)
    first = browser.current_window_handle
    browser.switch_to.new_window("tab")
    open_terminal(browser, platform)  # logged in with the kept key
    wait_position_row(browser, "SOL", "long")
    # asked first: the key is the only way back into the account, and one click forgot it
    by_id(browser, "logout").click()
    answer_logout(browser, accept=False)
    assert by_id(browser, "logged-in").is_displayed() and \
        text_of(browser, "api-key") == masked(key)
    by_id(browser, "logout").click()
    answer_logout(browser, accept=True)

    browser.switch_to.window(first)
    wait_until(browser, lambda d: by_id(d, "logged-out").is_displayed(), "the first tab logged out")
    assert not by_id(browser, "submit-long").is_enabled()
    assert position_rows(browser) == []
    assert text_of(browser, "api-key") == ""
    assert "another tab" in text_of(browser, "notice-text")

    second = next(h for h in browser.window_handles if h != first)
    browser.switch_to.window(second)
    other_key = create_account(browser)
    other_id = text_of(browser, "account-id")
    browser.switch_to.window(first)
    wait_until(browser, lambda d: by_id(d, "logged-in").is_displayed()
               and text_of(d, "api-key") == masked(other_key), "the other key in the first tab")
    wait_until(browser, lambda d: text_of(d, "account-id") == other_id
               and text_of(d, "balance-free") == "10000.00", "the other account's balances")
    assert position_rows(browser) == []  # the first account's position is not this one's
    assert account(http, key)["positions"][0]["positionId"] == position_id


def test_quote_follows_ticks_produced_to_the_topic_without_a_reload(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A tick produced to the topic shows as the selected asset's bid, ask and spread, and the
    next one replaces it in the same page."""
    tick(platform, http, "SOL", "101.23", "101.25")
    open_terminal(browser, platform)
    assert Select(by_id(browser, "asset-select")).first_selected_option.text == "SOL"
    wait_until(browser, lambda d: (text_of(d, "bid"), text_of(d, "ask")) == ("101.23", "101.25"),
               "the first quote")
    assert text_of(browser, "spread") == "0.02"
    mark_page(browser)

    tick(platform, http, "SOL", "101.57", "101.60")
    wait_until(browser, lambda d: (text_of(d, "bid"), text_of(d, "ask")) == ("101.57", "101.60"),
               "the moved quote")
    assert text_of(browser, "spread") == "0.03"
    assert text_of(browser, "quote-source") == "source: test"

    # flipping through the assets (as holding an arrow key on the list does) keeps the live
    # connection: its streams change once they settle, not by two frames a step
    browser.execute_script("""
        const node = document.getElementById('ws-status');
        window.wsStates = [];
        new MutationObserver(() => window.wsStates.push(node.dataset.state))
            .observe(node, {attributes: true, attributeFilter: ['data-state']});
        const select = document.getElementById('asset-select');
        for (let i = 0; i < 42; i++) {
            select.value = ['BTC', 'ETH', 'SOL'][i % 3];
            select.dispatchEvent(new Event('change'));
        }""")
    tick(platform, http, "SOL", "101.80", "101.82")
    wait_until(browser, lambda d: (text_of(d, "bid"), text_of(d, "ask")) == ("101.80", "101.82"),
               "the quote after flipping through the assets")
    time.sleep(1.0)  # a close would come within a round trip of the flood
    assert browser.execute_script("return window.wsStates;") == []
    assert_not_reloaded(browser)


def test_open_from_the_ticket_close_from_the_table_then_in_history(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A market long opened from the ticket is a row of the positions table (entry at the ask);
    its Close button closes it at the bid, and it moves to the closed positions table."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    key = create_account(browser)
    mark_page(browser)

    open_long_from_ticket(browser, "100", "10")
    position_id = wait_position_row(browser, "SOL", "long")
    opened = account(http, key)["positions"]
    assert [p["positionId"] for p in opened] == [position_id]
    assert D(opened[0]["entryPrice"]) == D("100.01")
    row = browser.find_element(By.CSS_SELECTOR, f'tr[data-position-id="{position_id}"]')
    assert "100.01" in row.text and "10x" in row.text
    assert text_of(browser, "positions-count") == "1"
    wait_until(browser, lambda d: text_of(d, "balance-margin") == "100.00", "the margin in use")

    tick(platform, http, "SOL", "101.00", "101.01")  # 9.99 SOL up 0.99: +9.8901
    wait_until(browser, lambda d: d.find_element(
        By.CSS_SELECTOR, f'tr[data-position-id="{position_id}"] td[data-field="pnl"]').text
        == "+9.8901", "the live unrealized PnL, exact as the engine's (it showed +9.89)")
    # the equity beside it moves with the same tick: 9900 free + 100 margin + 9.8901
    wait_until(browser, lambda d: text_of(d, "balance-equity") == "10009.8901"
               and text_of(d, "upnl-total") == "+9.8901", "the equity at the live price")

    row_control(browser, "close-position", position_id).click()
    closed = closed_row(browser, position_id)
    assert closed.get_attribute("data-close-reason") == "manual"
    assert "101.00" in closed.text  # the exit at the bid
    assert closed.find_element(By.CSS_SELECTOR, 'td[data-field="realized-pnl"]').text == "+9.8901"
    wait_until(browser, lambda d: position_rows(d) == [], "the empty positions table")
    assert text_of(browser, "positions-count") == "0"
    wait_until(browser, lambda d: text_of(d, "balance-free") == "10009.8901", "the payout")
    assert account(http, key)["positions"] == []
    assert_not_reloaded(browser)


def test_liquidation_by_a_produced_price_leaves_the_table_and_shows_in_history(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A price produced to the topic at a long's liquidation price closes it in the engine; the
    open page drops the row and lists it as liquidated, with no reload and no click."""
    key, position_id = open_long_on_a_new_page(platform, browser, http, leverage="20")
    liquidation = D(account(http, key)["positions"][0]["liquidationPrice"])
    mark_page(browser)
    stream = by_id(browser, "account-stream")
    wait_until(browser, lambda d: stream.get_attribute("data-state") == "live"
               and stream.get_attribute("data-seq"), "the account stream")
    seen = int(stream.get_attribute("data-seq"))
    # the trader's own error, shown when the engine acts: it stays until dismissed or until the
    # trader's next action succeeds (the engine's notice replaced it)
    open_long_from_ticket(browser, "20000", "10")
    banner = by_id(browser, "error-banner")
    wait_until(browser, lambda d: banner.is_displayed()
               and text_of(d, "error-code") == "INSUFFICIENT_BALANCE", "the error of the open")

    tick(platform, http, "SOL", str(liquidation), str(liquidation + D("0.01")))
    # the close and the balance after it arrive on the account stream
    wait_until(browser, lambda d: int(stream.get_attribute("data-seq")) >= seen + 2,
               "the liquidation's account events")
    closed = closed_row(browser, position_id)
    assert closed.get_attribute("data-close-reason") == "liquidation"
    assert "liquidation" in closed.text
    # the engine closed it, not the trader: the page says so, not only its tables
    wait_until(browser, lambda d: text_of(d, "notice-text").startswith(
        f"Position {position_id} (long ") and "closed by liquidation at" in text_of(
            d, "notice-text"), "the notice of the liquidation")
    assert banner.is_displayed() and text_of(browser, "error-code") == "INSUFFICIENT_BALANCE"
    notice = by_id(browser, "notice")
    assert notice.rect["y"] >= banner.rect["y"] + banner.rect["height"]  # both seen, stacked
    wait_until(browser, lambda d: position_rows(d) == [], "the liquidated row to leave the table")
    wait_until(browser, lambda d: text_of(d, "balance-margin") == "0.00"
               and text_of(d, "balance-free") == "9900.00", "the balances after the liquidation")
    assert_not_reloaded(browser)


def test_a_liquidation_past_the_margin_says_the_insurance_took_the_rest(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A price that gaps past a long's liquidation price closes it with a PnL beyond its margin
    (paid out 0): the account lost its margin, the platform's insurance the rest. The row and
    the notice showed the PnL alone, a loss larger than the trader's."""
    key, position_id = open_long_on_a_new_page(platform, browser, http, leverage="20")
    liquidation = D(account(http, key)["positions"][0]["liquidationPrice"])
    tick(platform, http, "SOL", str(liquidation - 2), str(liquidation - D("1.99")))
    closed = closed_row(browser, position_id)
    [part] = http.get("/api/v1/positions/history",
                      headers={"Authorization": f"Bearer {key}"}).json()["positions"]
    past = -D(part["realizedPnl"]) - D(part["margin"])
    assert past > 0 and D(part["payout"]) == 0, part
    tag = closed.find_element(By.CSS_SELECTOR, '[data-testid="insured"]')
    assert tag.text == f"insured {money(str(past))}"
    said = (f"(the loss past the margin, {money(str(past))} USD, is the platform's "
            f"insurance's: this account lost its margin, {money(part['margin'])} USD)")
    wait_until(browser, lambda d: said in text_of(d, "notice-text"), "the liquidation's notice")


def test_api_error_is_shown_with_the_apis_code_and_message(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A margin above the free balance, then a leverage below the range: the error banner
    shows INSUFFICIENT_BALANCE, then LEVERAGE_OUT_OF_RANGE, each with the very message the API
    answers to that request; no position is opened."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    key = create_account(browser)
    banner = by_id(browser, "error-banner")
    assert banner.get_attribute("data-code") != "INSUFFICIENT_BALANCE"
    # a margin above the free balance is said before the click, one equal to it is not
    funds = by_id(browser, "ticket-funds")
    fill(browser, "ticket-margin", "10000.00")
    wait_until(browser, lambda d: text_of(d, "balance-free") == "10000.00", "the free balance")
    assert not funds.is_displayed()
    fill(browser, "ticket-margin", "10000.01")
    wait_until(browser, lambda d: funds.is_displayed(), "the line of a margin above the balance")
    assert funds.text == ("The margin is more than the free balance, 10000.00 USD: the "
                          "platform refuses it.")

    open_long_from_ticket(browser, "20000", "10")
    assert funds.is_displayed()
    wait_banner_answers_as_the_api(browser, http, key, "INSUFFICIENT_BALANCE", 409, "open",
                                   {"asset": "SOL", "type": "long", "margin": "20000",
                                    "leverage": 10})
    assert text_of(browser, "error-code") == "INSUFFICIENT_BALANCE"
    assert account(http, key)["positions"] == []
    assert position_rows(browser) == []

    # the ticket's estimate: the size and notional of a valid order, none of one beyond the
    # asset's leverage (the API will refuse it)
    fill(browser, "ticket-margin", "100")
    fill(browser, "ticket-leverage", "10")
    wait_until(browser, lambda d: "notional ≈ 1000.00 USD" in text_of(d, "ticket-estimate"),
               "the estimate of a 1000 USD order")
    assert not funds.is_displayed()
    fill(browser, "ticket-leverage", "1000")
    wait_until(browser, lambda d: text_of(d, "ticket-estimate") == "",
               "no estimate of an order beyond the asset's leverage")
    # the size the engine gives at the price, floored to the step, exact: 29 USD at a limit of
    # 100.00 is 0.29 SOL, not 0.28 (29 / 100 * 100 is 28.999... in binary floats)
    Select(by_id(browser, "ticket-kind")).select_by_value("limit")
    fill(browser, "ticket-trigger", "100.00")
    fill(browser, "ticket-margin", "29")
    fill(browser, "ticket-leverage", "1")
    wait_until(browser, lambda d: text_of(d, "ticket-estimate")
               == "≈ 0.29 SOL · notional ≈ 29.00 USD (estimate)", "the estimate at the limit")
    # one that buys less than a step says so (it read "≈ 0.00 SOL")
    fill(browser, "ticket-margin", "0.99")
    wait_until(browser, lambda d: text_of(d, "ticket-estimate")
               == "buys less than one step (0.01 SOL) at this price", "the step not bought")
    assert text_of(browser, "ticket-liquidation") == ""
    Select(by_id(browser, "ticket-kind")).select_by_value("market")
    # at 100.00 / 100.01 a 1 USD market short buys one step, a long none: each is told so
    fill(browser, "ticket-margin", "1")
    wait_until(browser, lambda d: text_of(d, "ticket-estimate") == "≈ 0.01 SOL short (a long "
               "buys less than one step) · notional ≈ 1.00 USD (estimate)", "the short's size")
    assert text_of(browser, "ticket-liquidation") == "liq. price — long · ≈ 200.00 short"

    # a leverage below the range is named as such, not as a type error
    open_long_from_ticket(browser, "100", "-1")
    wait_banner_answers_as_the_api(browser, http, key, "LEVERAGE_OUT_OF_RANGE", 422, "open",
                                   {"asset": "SOL", "type": "long", "margin": "100",
                                    "leverage": -1})
    assert account(http, key)["positions"] == []
    # so is a slippage bound below zero
    fill(browser, "ticket-slippage", "-1")
    open_long_from_ticket(browser, "100", "10")
    wait_until(browser, lambda d: "greater than or equal to 0" in text_of(d, "error-message"),
               "the range of maxSlippageBps")
    wait_banner_answers_as_the_api(browser, http, key, "INVALID_REQUEST", 422, "open",
                                   {"asset": "SOL", "type": "long", "margin": "100",
                                    "leverage": 10, "currentPrice": "100.01",
                                    "maxSlippageBps": -1})
    fill(browser, "ticket-slippage", "")
    assert account(http, key)["positions"] == []

    by_id(browser, "error-dismiss").click()
    wait_until(browser, lambda d: not banner.is_displayed(), "the dismissed banner")

    # shown again, the error goes when the next attempt succeeds: it was about the last one
    open_long_from_ticket(browser, "20000", "10")
    wait_until(browser, lambda d: banner.is_displayed(), "the INSUFFICIENT_BALANCE banner again")
    open_long_from_ticket(browser, "100", "10")
    wait_position_row(browser, "SOL", "long")
    wait_until(browser, lambda d: not banner.is_displayed(), "the banner gone after the open")


def test_phone_width_keeps_the_ticket_and_the_positions_reachable(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """At 390x844 the page does not overflow sideways; account, ticket and positions table fit
    the width (a wide table scrolls inside its own container), and a position opened and
    closed with taps there ends in the history."""
    set_viewport(browser, *PHONE)
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    assert browser.execute_script("return [window.innerWidth, window.innerHeight];") == \
        list(PHONE)
    key = create_account(browser)
    assert empty_message_shown(browser, "positions-body") == "No open positions"
    open_long_from_ticket(browser, "50", "5")
    position_id = wait_position_row(browser, "SOL", "long")

    overflow = browser.execute_script(
        "return [document.documentElement.scrollWidth, document.body.scrollWidth];")
    assert max(overflow) <= PHONE[0], f"the page is wider than the phone: {overflow}"
    for element_id in ("ticket", "submit-long", "submit-short", "positions-table", "chart"):
        element = by_id(browser, element_id)
        box = container_box(browser, element)
        assert box["left"] >= 0 and box["right"] <= PHONE[0], (element_id, box)
        assert element.is_displayed(), element_id

    close = row_control(browser, "close-position", position_id)
    # scrolled sideways to the row's buttons, the row still says which position they act on
    browser.execute_script("arguments[0].scrollIntoView({block: 'center', inline: 'end'});",
                           close)
    wrap = browser.execute_script(
        "return arguments[0].closest('.table-wrap').getBoundingClientRect().toJSON();", close)
    assert browser.execute_script(
        "return arguments[0].closest('.table-wrap').scrollLeft;", close) > 0
    row = f'tr[data-testid="position-row"][data-position-id="{position_id}"]'
    for n, text in ((1, "SOL"), (2, "long")):
        cell = browser.find_element(By.CSS_SELECTOR, f"{row} > td:nth-child({n})")
        box = browser.execute_script("return arguments[0].getBoundingClientRect().toJSON();",
                                     cell)
        assert cell.text == text and wrap["left"] <= box["left"] < box["right"] <= \
            wrap["right"], (text, box, wrap)
        assert browser.execute_script(  # drawn on top, not under the scrolled cells
            "const r = arguments[0].getBoundingClientRect();"
            "return document.elementFromPoint(r.left + r.width / 2, r.top + r.height / 2)"
            " === arguments[0];", cell), text
    # and of two alike, which: its size under its side
    size = browser.find_element(By.CSS_SELECTOR, f'{row} > td[data-field="quantity"]').text
    assert size == account(http, key)["positions"][0]["quantity"]
    side = browser.find_element(By.CSS_SELECTOR, f"{row} > td:nth-child(2)")
    assert browser.execute_script(
        "return getComputedStyle(arguments[0], '::after').content;", side) == f'"{size}"'
    close.click()
    assert closed_row(browser, position_id).get_attribute("data-close-reason") == "manual"
    wait_until(browser, lambda d: position_rows(d) == [], "the closed row to leave the table")
    # the table was scrolled sideways to reach the button: its empty message still shows
    assert empty_message_shown(browser, "positions-body") == "No open positions"
    assert max(browser.execute_script(
        "return [document.documentElement.scrollWidth, document.body.scrollWidth];")) \
        <= PHONE[0]


def swipe(driver: WebDriver, x: float, y: float, dx: float, dy: float) -> None:
    """A finger's swipe from (x, y) by (dx, dy) CSS px, in ten moves, through the browser's
    touch input (the page emulates a touch screen)."""
    def touch(kind: str, points: list[dict[str, float]]) -> None:
        driver.execute_cdp_cmd("Input.dispatchTouchEvent", {"type": kind, "touchPoints": points})

    touch("touchStart", [{"x": x, "y": y}])
    for step in range(1, 11):
        touch("touchMove", [{"x": x + dx * step / 10, "y": y + dy * step / 10}])
        time.sleep(0.02)
    touch("touchEnd", [])


def test_a_vertical_swipe_over_the_chart_scrolls_the_page_on_a_phone(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """At 390x844 the chart is a third of the first screen: a vertical swipe over it scrolls
    the page, a horizontal one pans the candles. Before, the chart took the vertical swipe (the
    library's default) and the page stood still under the finger."""
    tick(platform, http, "SOL", "100.00", "100.01")
    set_viewport(browser, *PHONE)
    browser.execute_cdp_cmd("Emulation.setTouchEmulationEnabled",
                            {"enabled": True, "maxTouchPoints": 5})
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": CHART_SERIES_JS})
    open_terminal(browser, platform)
    wait_chart_drawn(browser, "SOL")
    box = browser.execute_script(
        "return document.getElementById('chart').getBoundingClientRect().toJSON();")
    x, y = box["left"] + box["width"] / 3, box["top"] + box["height"] / 2
    assert browser.execute_script("return window.scrollY;") == 0
    swipe(browser, x, y + 60, 0, -150)
    wait_until(browser, lambda d: d.execute_script("return window.scrollY;") > 50,
               "the page scrolled by the swipe")
    settled = []  # the swipe's fling goes on a while: back to the top once it has stopped
    wait_until(browser, lambda d: settled.append(d.execute_script("return window.scrollY;"))
               or settled[-3:] == [settled[-1]] * 3, "the page's scroll to stop")
    browser.execute_script("window.scrollTo(0, 0);")
    wait_next_frames(browser)
    position = "return window.__charts[0].timeScale().scrollPosition();"
    before = browser.execute_script(position)
    swipe(browser, x, y, 150, 0)
    wait_until(browser, lambda d: d.execute_script(position) != before,
               "the candles panned by the sideways swipe")
    assert browser.execute_script("return window.scrollY;") == 0


def empty_message_shown(driver: WebDriver, body_id: str) -> str | None:
    """The text of the empty row of table body ``body_id`` if all of it lies in the visible part
    of the table's scroll container, else None."""
    return driver.execute_script("""
        const cell = document.querySelector(`#${arguments[0]} tr.empty td`);
        if (!cell) return null;
        const range = document.createRange();
        range.selectNodeContents(cell);
        const text = range.getBoundingClientRect();
        const wrap = cell.closest('.table-wrap').getBoundingClientRect();
        const inside = text.width > 0 && text.left >= wrap.left - 0.5
            && text.right <= wrap.right + 0.5;
        return inside ? cell.textContent : null;
    """, body_id)


def container_box(driver: WebDriver, element: WebElement) -> dict[str, float]:
    """The horizontal extent of ``element`` as laid out, or of the scroll container that clips
    it (a table wider than the screen scrolls inside its ``.table-wrap``)."""
    return dict(driver.execute_script("""
        const el = arguments[0];
        const box = (el.closest('.table-wrap') || el).getBoundingClientRect();
        return {left: box.left, right: box.right};
    """, element))


def test_screenshots_show_an_open_position_over_a_chart_of_candles(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client,
        tmp_path: Path) -> None:
    """An ETH history of one-minute candles produced to the topic is drawn from
    GET /api/v1/klines; with a long open (its take-profit and stop-loss set) and a limit order
    pending, the chart draws their levels, and the terminal is photographed at desktop and
    phone size (into docs/ when SHARDEX_SCREENSHOTS=docs)."""
    minutes = 150
    produce_history(platform, http, "ETH", minutes)
    r = http.get("/api/v1/klines", params={"asset": "ETH", "interval": "1m"})
    assert r.status_code == 200, r.text
    assert len(r.json()["klines"]) >= minutes

    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": CHART_SERIES_JS})
    open_terminal(browser, platform)
    Select(by_id(browser, "asset-select")).select_by_visible_text("ETH")
    wait_until(browser, lambda d: text_of(d, "ticket-asset") == "ETH"
               and text_of(d, "bid") != "—", "the ETH quote")
    key = create_account(browser)
    quote = http.get("/api/v1/prices").json()["ETH"]
    take_profit, stop_loss = D(quote["ask"]) + 60, D(quote["ask"]) - 40
    fill(browser, "ticket-tp", str(take_profit))
    fill(browser, "ticket-sl", str(stop_loss))
    # the ticket tells each side's liquidation price at its fill before the order is sent
    fill(browser, "ticket-margin", "250")
    fill(browser, "ticket-leverage", "20")
    told = wait_until(browser, lambda d: re.fullmatch(
        r"liq\. price ≈ ([\d.]+) long · ≈ ([\d.]+) short", text_of(d, "ticket-liquidation")),
        "the ticket's liquidation prices")
    sizes = re.match(r"≈ ([\d.]+) ETH(?: long · ([\d.]+) short)? · notional ≈ 5000\.00 USD",
                     text_of(browser, "ticket-estimate"))
    assert sizes, text_of(browser, "ticket-estimate")
    open_long_from_ticket(browser, "250", "20")
    wait_position_row(browser, "ETH", "long")
    r = http.post("/api/v1/positions/open", headers={
        "Authorization": f"Bearer {http.post('/api/v1/accounts', json={}).json()['apiKey']}"},
        json={"asset": "ETH", "type": "short", "margin": "250", "leverage": 20})
    assert r.status_code == 201, r.text
    assert text_of(browser, "ticket-liquidation") == told.group(0)  # the same prices since
    assert told.group(2) == r.json()["liquidationPrice"]
    assert (sizes.group(2) or sizes.group(1)) == r.json()["quantity"]  # each side at its fill
    trigger = D(quote["bid"]) - 80
    r = http.post("/api/v1/orders", headers={"Authorization": f"Bearer {key}"},
                  json={"asset": "ETH", "type": "long", "orderType": "limit",
                        "triggerPrice": str(trigger), "margin": "100", "leverage": 10})
    assert r.status_code == 201, r.text
    [position] = http.get("/api/v1/state", headers={"Authorization": f"Bearer {key}"}
                          ).json()["positions"]
    assert told.group(1) == position["liquidationPrice"]
    assert sizes.group(1) == position["quantity"]
    # every level that would act on the next ticks is drawn at its price, named
    wanted = sorted([[f"long {position['quantity']}", D(position["entryPrice"])],
                     ["liq.", D(position["liquidationPrice"])], ["TP", take_profit],
                     ["SL", stop_loss], ["limit long", trigger]])
    wait_until(browser, lambda d: sorted([title, D(str(price))] for title, price in chart_lines(d))
               == wanted, f"the chart's lines {wanted}")
    wait_chart_drawn(browser, "ETH")
    wait_next_frames(browser)
    # the price scale takes them in: each is drawn inside the chart, none above or below it
    heights = browser.execute_script(
        "const height = document.getElementById('chart').clientHeight;"
        "return window.__series[0].priceLines().map("
        "  l => [window.__series[0].priceToCoordinate(l.options().price), height]);")
    assert all(0 <= y <= height for y, height in heights), heights
    # the newest candle stands clear of the lines' labels (drawn over the candles at the
    # pane's right edge), with room for the label's padding
    candle_right, labels_left = newest_candle_and_labels(browser)
    assert candle_right + LABEL_PADDING_PX <= labels_left, (candle_right, labels_left)
    # a level more than twice the candles' height away is left off the scale
    assert levels_range(browser, [100, 110], [85, 125, 131, 50]) == [85, 125]
    # the newest candle's close, a mid half a step above the bid, is labelled as the API gives
    # it, not rounded to the step (where it read as the ask or the bid)
    newest = http.get("/api/v1/klines", params={"asset": "ETH", "interval": "1m",
                                                "limit": 1}).json()["klines"][-1]["close"]
    assert newest.endswith("5") and len(newest.split(".")[1]) == 3
    step = platform.settings.assets["ETH"].price_step
    assert chart_price_text(browser, step, newest) == newest
    assert chart_price_text(browser, step, "3000.1") == "3000.10"
    # a price between steps that is no mid (the crosshair's, an axis label's) is at the step
    assert chart_price_text(browser, step, "3000.104") == "3000.10"
    assert chart_price_text(browser, step, "3000.107") == "3000.11"
    for banner in ("notice", "error-banner"):  # messages of the moment, not the terminal
        browser.execute_script("document.getElementById(arguments[0]).hidden = true;", banner)

    target = DOCS if os.environ.get("SHARDEX_SCREENSHOTS") == "docs" else tmp_path
    target.mkdir(parents=True, exist_ok=True)
    # the desktop shot ends with the open position's row, the phone shot starts at the top
    shots = {"terminal-desktop.png": (DESKTOP, "document.querySelector("
                                      "'tr[data-testid=position-row]')"
                                      ".scrollIntoView({block: 'end'});"),
             "terminal-phone.png": (PHONE, "window.scrollTo(0, 0);")}
    for name, ((width, height), scroll) in shots.items():
        set_viewport(browser, width, height)
        browser.execute_script(scroll)
        wait_next_frames(browser)
        assert browser.save_screenshot(str(target / name))
        assert png_size(target / name) == (width, height)

    # with a second position on the asset each level names whose it is; its wider labels
    # take more room right of the newest candle, which leaves a trader reading older candles
    # where they were
    time_scale = "window.__charts[0].timeScale()"
    back = by_id(browser, "chart-newest")
    assert not back.is_displayed()  # at the newest candle, no way back to it is offered
    browser.execute_script(f"{time_scale}.scrollToPosition(-40, false);")
    wait_next_frames(browser)
    reading = browser.execute_script(f"return {time_scale}.getVisibleLogicalRange();")
    r = http.post("/api/v1/positions/open", headers={"Authorization": f"Bearer {key}"},
                  json={"asset": "ETH", "type": "short", "margin": "100", "leverage": 10})
    assert r.status_code == 201, r.text
    short = r.json()
    long_name, short_name = f"long {position['quantity']}", f"short {short['quantity']}"
    wanted = sorted([[long_name, D(position["entryPrice"])],
                     [f"liq. {long_name}", D(position["liquidationPrice"])],
                     [f"TP {long_name}", take_profit], [f"SL {long_name}", stop_loss],
                     [short_name, D(short["entryPrice"])],
                     [f"liq. {short_name}", D(short["liquidationPrice"])],
                     ["limit long", trigger]])
    wait_until(browser, lambda d: sorted([title, D(str(price))] for title, price in chart_lines(d))
               == wanted, f"the chart's lines {wanted}")
    wait_next_frames(browser)
    assert browser.execute_script(f"return {time_scale}.getVisibleLogicalRange();") == \
        pytest.approx(reading)
    # back to the newest candle by the chart's button, offered while it is out of view (the
    # library's animated scrollToRealTime stops where its last frame before the end was: 4.4-5.8
    # candles right of the newest, not 6, in 15 tries)
    assert back.is_displayed()
    back.click()
    assert not back.is_displayed()
    wait_until(browser, lambda d: (lambda right, left: right + LABEL_PADDING_PX <= left)(
        *newest_candle_and_labels(d)), "the newest candle clear of the wider labels")
    wait_next_frames(browser)
    assert not back.is_displayed()
    # and so it stays when the candles load again (another interval and back)
    for interval, step_s in (("5m", 300), ("1m", 60)):
        Select(by_id(browser, "interval-select")).select_by_value(interval)
        wait_until(browser, lambda d, step_s=step_s: bars_apart_s(d) == step_s,
                   f"the {interval} candles drawn")
    wait_next_frames(browser)
    candle_right, labels_left = newest_candle_and_labels(browser)
    assert candle_right + LABEL_PADDING_PX <= labels_left, (candle_right, labels_left)
    # a level the scale leaves out (farther than twice the candles' height) is named at the
    # edge it lies past, with its price
    far = f"▲ liq. {short_name} {short['liquidationPrice']}"
    wait_until(browser, lambda d: far in text_of(d, "chart-above").splitlines(),
               f"{far} at the chart's top edge")
    # and only such levels, each at its own edge
    outside = browser.execute_script(
        "const s = window.__series[0];"
        "const h = document.querySelector('#chart table td:nth-child(2)').clientHeight;"
        "return s.priceLines().map((l) => [l.options().title, s.priceToCoordinate("
        "  l.options().price), h]).filter(([t, y, h]) => y < 0 || y > h)"
        "  .map(([t, y]) => (y < 0 ? '▲ ' : '▼ ') + t);")
    named = [" ".join(line.split(" ")[:-1]) for edge in ("chart-above", "chart-below")
             for line in text_of(browser, edge).splitlines()]
    assert sorted(named) == sorted(outside), (named, outside)


def test_the_tickets_liquidation_price_is_the_engines(
        platform: RayHttpPlatform, browser: WebDriver) -> None:
    """The ticket's liquidation price (cluster/web/static/js/format.js) equals the engine's
    (engine.orders: the quantity floored to the step, the maintenance margin at its rate, the
    price floored for a long, ceiled for a short) over 600 drawn orders of every asset, rate
    and side, and is told for no order the engine would not open (under one step; a margin
    not above the maintenance margin); a long no positive price liquidates (the API's null) is
    told "none"."""
    draw = random.Random(20261206)
    cases, wanted = [], []
    for _ in range(600):
        asset = draw.choice(list(platform.settings.assets.assets))
        entry = draw.choice([1, 7, 99, 10_000, 3_000_00, 65_000_0, draw.randrange(1, 10**8)])
        margin = draw.choice([1, 999, 10**6, 250 * 10**6, draw.randrange(1, 10**11)])
        leverage = draw.choice([1, 2, draw.randint(1, asset.max_leverage)])
        ppm = draw.choice([0, 0, 1, 5_000, 10_000, 500_000, PPM - 1, draw.randrange(PPM)])
        side = draw.choice([Side.LONG, Side.SHORT])
        qty = quantity_steps(asset, margin, leverage, entry)
        scale = 10 ** (asset.price_decimals + asset.qty_decimals)
        opens = qty >= 1 and margin * scale > ppm * entry * qty
        liq = liquidation_ticks(asset, side, entry, qty, margin, ppm) if opens else None
        wanted.append(None if liq is None else "none" if liq == 0
                      else asset.ticks_to_price(liq))
        cases.append([from_units(margin, 6), leverage, asset.ticks_to_price(entry),
                      "long" if side is Side.LONG else "short",
                      {"priceStep": asset.price_step, "quantityStep": asset.qty_step,
                       "maintenanceMarginRate": from_units(ppm, 6)}])
    assert 100 < sum(w is not None for w in wanted) < 600  # both kinds drawn
    assert "none" in wanted
    open_terminal(browser, platform)
    told = browser.execute_async_script(
        "const [cases, done] = arguments;"
        "import('./static/js/format.js').then((fmt) => done(cases.map("
        "  (c) => fmt.liquidationEstimate(...c))));", cases)
    assert told == wanted
    # the price it is computed at: where the order would fill now; a pending order at its
    # trigger unless the quote already crosses it (then at the quote, as the engine fills it)
    quote = {"bid": "150.00", "ask": "150.02"}
    fills = {("market", "long", ""): "150.02", ("market", "short", ""): "150.00",
             ("limit", "long", "149.00"): "149.00", ("limit", "long", "151.00"): "150.02",
             ("limit", "long", "150.02"): "150.02", ("limit", "short", "151.00"): "151.00",
             ("limit", "short", "149.00"): "150.00", ("stop", "long", "151.00"): "151.00",
             ("stop", "long", "149.00"): "150.02", ("stop", "short", "149.00"): "149.00",
             ("stop", "short", "151.00"): "150.00", ("stop", "short", "150.00"): "150.00"}
    assert browser.execute_async_script(
        "const [cases, quote, done] = arguments;"
        "import('./static/js/format.js').then((fmt) => done(cases.map("
        "  ([kind, side, trigger]) => fmt.fillPrice(kind, side, trigger, quote))));",
        list(fills), quote) == list(fills.values())


def test_a_leverage_is_told_changed_only_for_a_margin_that_changed(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """The leverage a row shows beside the one opened with (``4.9x (opened 5x)``) is for a
    margin added to or removed from: an open's quantity floored to the step leaves its
    notional a little under margin x leverage (0.70 SOL of 0.707), which read as a changed
    margin. fmt.marginChanged against the engine's own arithmetic (engine.orders'
    quantity, the shard's share of the margin a part closes) over drawn positions of every
    asset: an open as opened, its rest and its part after a partial close are unchanged; a
    margin added by more than one step's notional / leverage, or one removed below the
    notional / leverage, is changed."""
    draw = random.Random(20261208)
    cases, wanted = [], []

    def case(asset: Any, entry: int, margin: int, leverage: int, qty: int, changed: bool
             ) -> None:
        cases.append([{"margin": from_units(margin, 6), "entryPrice": asset.ticks_to_price(entry),
                       "quantity": asset.steps_to_qty(qty), "leverage": leverage},
                      asset.qty_step])
        wanted.append(changed)

    while len(cases) < 1000:
        asset = draw.choice(list(platform.settings.assets.assets))
        entry = draw.choice([1, 99, 10_000, 3_000_00, draw.randrange(1, 10**8)])
        margin = draw.choice([1, 999, 20 * 10**6, draw.randrange(1, 10**11)])
        leverage = draw.randint(1, asset.max_leverage)
        qty = quantity_steps(asset, margin, leverage, entry)
        if qty < 1:
            continue
        case(asset, entry, margin, leverage, qty, False)
        if qty > 1:
            part_qty = draw.randrange(1, qty)
            part = margin * part_qty // qty  # the shard's share of the margin a part takes
            case(asset, entry, margin - part, leverage, qty - part_qty, False)
            if part:
                case(asset, entry, part, leverage, part_qty, False)
        step_notional = asset.notional_micros(entry, 1)
        gap = margin * leverage - asset.notional_micros(entry, qty)
        added = -(-(step_notional - gap + 2 * leverage) // leverage) + draw.randrange(100)
        case(asset, entry, margin + added, leverage, qty, True)
        removed = (gap + 2 * leverage) // leverage + 1 + draw.randrange(100)
        if removed < margin:
            case(asset, entry, margin - removed, leverage, qty, True)
    assert 300 < sum(wanted) < 700  # both kinds drawn
    open_terminal(browser, platform)
    told = browser.execute_async_script(
        "const [cases, done] = arguments;"
        "import('./static/js/format.js').then((fmt) => done(cases.map("
        "  ([p, step]) => fmt.marginChanged(p, step))));", cases)
    assert told == wanted
    # 10 USD at 3x buys 0.29 SOL of 0.2999 at 100.01: 2.9x by its notional, opened at 3x
    _, position_id = open_long_on_a_new_page(platform, browser, http, margin="10",
                                             leverage="3")
    wait_until(browser, lambda d: row_cell(d, position_id, "leverage") == "3x",
               "the leverage opened with (it read 2.9x (opened 3x))")
    row_control(browser, "close-position", position_id).click()
    closed = closed_row(browser, position_id)
    assert "3x" in closed.text.split() and "(opened" not in closed.text, closed.text


def produce_history(platform: RayHttpPlatform, http: httpx.Client, asset: str,
                    minutes: int) -> None:
    """Produce ``minutes`` one-minute candles of ``asset`` ending now (four ticks each: open,
    high, low and close of a seeded random walk), each tick awaited, then a current tick."""
    walk = random.Random(20260401)
    first_minute = time.time_ns() // 1000 // 60_000_000 - minutes
    price = D("3000.00")
    cent = D("0.01")
    for i in range(minutes):
        start_us = (first_minute + i) * 60_000_000
        close = (price + D(walk.gauss(0, 4))).quantize(cent)
        high = (max(price, close) + D(abs(walk.gauss(0, 2.5)))).quantize(cent)
        low = (min(price, close) - D(abs(walk.gauss(0, 2.5)))).quantize(cent)
        for offset_s, mid in ((1, price), (15, high), (30, low), (50, close)):
            produce_at(platform, http, asset, mid, start_us + offset_s * 1_000_000)
        price = close
    produce_at(platform, http, asset, price, time.time_ns() // 1000)


def produce_at(platform: RayHttpPlatform, http: httpx.Client, asset: str, mid: D,
               ts_us: int) -> None:
    """A tick of ``asset`` stamped ``ts_us`` (bid ``mid``, ask one step above) produced to
    the topic; returns once the API serves it as the asset's price."""
    spec = platform.settings.assets[asset]
    bid = spec.price_to_ticks(str(mid))
    platform._seq += 1
    platform._produce(Tick(asset, bid, bid + 1, ts_us, platform._seq, "test"))
    deadline = time.monotonic() + 15
    while True:
        price = http.get("/api/v1/prices").json().get(asset)
        if price is not None and D(price["bid"]) == mid and price_ts_us(price["ts"]) == ts_us:
            return
        assert time.monotonic() < deadline, f"tick {asset} {mid} at {ts_us} never applied"
        time.sleep(0.01)


def price_ts_us(iso: str) -> int:
    from datetime import datetime

    when = datetime.fromisoformat(iso.replace("Z", "+00:00"))
    return int(when.timestamp()) * 1_000_000 + when.microsecond


def wait_chart_drawn(driver: WebDriver, asset: str) -> None:
    """Until the page has received its candles of ``asset`` (the klines request finished) and
    the chart had frames to draw them."""
    wait_until(driver, lambda d: d.execute_script(
        "return performance.getEntriesByType('resource').some("
        "e => e.name.includes('klines?asset=' + arguments[0] + '&') && e.responseEnd > 0);",
        asset), f"the {asset} candles")
    wait_next_frames(driver)


def chart_price_text(driver: WebDriver, step: str, price: str) -> str:
    """``price`` as the page's candle chart labels it for an asset of price step ``step``."""
    return str(driver.execute_async_script(
        "const [step, price, done] = arguments;"
        "import('./static/js/chart.js').then((m) => {"
        "  const box = document.createElement('div');"
        "  box.style.cssText = 'width: 300px; height: 200px';"
        "  document.body.append(box);"
        "  const chart = m.createCandleChart(box);"
        "  chart.setPriceStep(step);"
        "  const text = chart.priceText(Number(price));"
        "  box.remove();"
        "  done(text);"
        "});", step, price))


def levels_range(driver: WebDriver, candles: list[float], levels: list[float]) -> list[float]:
    """[min, max] the chart scales to for ``candles`` ([min, max]) with lines at ``levels``."""
    return list(driver.execute_async_script(
        "const [candles, levels, done] = arguments;"
        "import('./static/js/chart.js').then((m) => {"
        "  const lines = levels.map((price) => ({options: () => ({price})}));"
        "  const range = m.withLevels({priceRange: {minValue: candles[0], maxValue: candles[1]}},"
        "                             lines).priceRange;"
        "  done([range.minValue, range.maxValue]);"
        "});", candles, levels))


def wait_next_frames(driver: WebDriver) -> None:
    """Let the page render two animation frames (the chart draws on the next frame)."""
    driver.execute_async_script(
        "const done = arguments[0];"
        "requestAnimationFrame(() => requestAnimationFrame(() => done(true)));")


def png_size(path: Path) -> tuple[int, int]:
    header = path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")


# ------------------------------------------------------------------ changing an open position
def money(value: str) -> str:
    """The page's money display of an API amount: trailing zeros cut down to two decimals."""
    whole, _, frac = value.partition(".")
    return f"{whole}.{frac.rstrip('0').ljust(2, '0')}"


def signed_money(value: str) -> str:
    shown = money(value)
    return shown if shown.startswith("-") or D(shown) == 0 else f"+{shown}"


def row_settled(driver: WebDriver, row_css: str) -> None:
    """Until the row ``row_css`` stays where it is (``data-moved`` gone): a row that just
    came or moved refuses its buttons for a moment (ROW_MOVED_GUARD_MS in app.js)."""
    wait_until(driver, lambda d: any(
        r.get_attribute("data-moved") is None for r in d.find_elements(By.CSS_SELECTOR, row_css)),
        f"the row {row_css} settled in its place")


def row_control(driver: WebDriver, testid: str, position_id: str) -> WebElement:
    """A control of the position's row (or its editor), once the row settled in its place."""
    row_settled(driver, f'tr[data-testid="position-row"][data-position-id="{position_id}"]')
    return driver.find_element(
        By.CSS_SELECTOR, f'[data-testid="{testid}"][data-position-id="{position_id}"]')


def order_cancel(driver: WebDriver, order_id: str) -> WebElement:
    """The Cancel button of the open order's row, once the row settled in its place."""
    row_settled(driver, f'tr[data-testid="order-row"][data-order-id="{order_id}"]')
    return driver.find_element(
        By.CSS_SELECTOR, f'button[data-testid="cancel-order"][data-order-id="{order_id}"]')


def row_cell(driver: WebDriver, position_id: str, field: str) -> str:
    return str(driver.find_element(
        By.CSS_SELECTOR, f'tr[data-testid="position-row"][data-position-id="{position_id}"] '
                         f'td[data-field="{field}"]').text)


def type_into(element: WebElement, value: str) -> None:
    element.clear()
    if value:
        element.send_keys(value)


def api_position(http: httpx.Client, key: str, position_id: str) -> dict[str, Any] | None:
    return next((p for p in account(http, key)["positions"] if p["positionId"] == position_id),
                None)


def wait_api_position(driver: WebDriver, http: httpx.Client, key: str, position_id: str,
                      changed: Any, what: str) -> dict[str, Any]:
    """The API's position once ``changed(position)`` holds (the page's request went through)."""
    return dict(wait_until(driver, lambda _d: (lambda p: p if p and changed(p) else None)(
        api_position(http, key, position_id)), what))


def levels(position: dict[str, Any] | None) -> tuple[Any, ...]:
    assert position is not None
    return tuple(position[f] for f in ("quantity", "margin", "liquidationPrice", "takeProfit",
                                       "stopLoss"))


def wait_row_shows(driver: WebDriver, position_id: str, position: dict[str, Any]) -> None:
    """Until the row shows the API's quantity, margin, liquidation price, TP and SL."""
    expected = {"quantity": position["quantity"], "margin": money(position["margin"]),
                "liquidation": position["liquidationPrice"] or "—",
                "take-profit": position["takeProfit"] or "—",
                "stop-loss": position["stopLoss"] or "—"}
    wait_until(driver, lambda d: {f: row_cell(d, position_id, f) for f in expected} == expected,
               f"the row of position {position_id} to show {expected}")


def test_partial_close_from_the_row_keeps_the_rest_open_and_lists_the_part(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A quantity typed next to Close closes that part only: the row stays with the remaining
    quantity, margin and liquidation price the API answers, the history lists the part as a
    partial close (its own closeId); Close with the field empty then closes the rest."""
    key, position_id = open_long_on_a_new_page(platform, browser, http)
    opened = api_position(http, key, position_id)
    assert opened is not None
    quantity_input = row_control(browser, "close-quantity", position_id)
    assert quantity_input.get_attribute("placeholder") == "all"
    assert quantity_input.get_attribute("data-step") == "0.01"
    mark_page(browser)

    tick(platform, http, "SOL", "101.00", "101.01")
    part = D("3.33")
    type_into(quantity_input, str(part))
    row_control(browser, "close-position", position_id).click()
    rest = wait_api_position(browser, http, key, position_id,
                             lambda p: D(p["quantity"]) < D(opened["quantity"]),
                             "the partial close in the API")
    assert D(rest["quantity"]) == D(opened["quantity"]) - part
    wait_row_shows(browser, position_id, rest)
    assert len(position_rows(browser)) == 1
    wait_until(browser, lambda d: row_control(d, "close-quantity", position_id)
               .get_attribute("value") == "", "the emptied quantity field")

    history = http.get("/api/v1/positions/history",
                       headers={"Authorization": f"Bearer {key}"}).json()["positions"]
    assert len(history) == 1 and history[0]["partial"] is True
    closed_part = history[0]
    assert closed_part["positionId"] == position_id
    assert closed_part["closeId"] != position_id
    assert D(closed_part["quantity"]) == part
    assert D(closed_part["margin"]) + D(rest["margin"]) == D(opened["margin"])
    row = wait_until(browser, lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, f'tr[data-testid="closed-row"][data-close-id="{closed_part["closeId"]}"]'
    )), None), "the partial close in the closed positions table")
    assert row.get_attribute("data-partial") == "true"
    assert row.get_attribute("data-position-id") == position_id
    assert row.find_element(By.CSS_SELECTOR, '[data-testid="partial-close"]').text == "partial"
    assert row.find_element(By.CSS_SELECTOR, 'td[data-field="realized-pnl"]').text == \
        signed_money(closed_part["realizedPnl"])
    assert closed_part["exitPrice"] in row.text and money(closed_part["margin"]) in row.text
    wait_until(browser, lambda d: text_of(d, "balance-margin") == money(rest["margin"]),
               "the margin still in use")

    row_control(browser, "close-position", position_id).click()  # empty field: all of it
    whole = wait_until(browser, lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, f'tr[data-testid="closed-row"][data-close-id="{position_id}"]')), None),
        "the close of the rest in the closed positions table")
    assert whole.get_attribute("data-partial") is None
    wait_until(browser, lambda d: position_rows(d) == [], "the empty positions table")
    history = http.get("/api/v1/positions/history",
                       headers={"Authorization": f"Bearer {key}"}).json()["positions"]
    assert [(c["closeId"], c["partial"]) for c in history] == \
        [(position_id, False), (closed_part["closeId"], True)]
    assert D(history[0]["quantity"]) == D(rest["quantity"])
    assert len(browser.find_elements(By.CSS_SELECTOR, 'tr[data-testid="closed-row"]')) == 2
    assert_not_reloaded(browser)


def test_take_profit_and_stop_loss_edited_from_the_row(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """Edit opens the row's TP/SL inputs (prefilled); Save sets the levels the row then shows,
    an SL below the liquidation price shows INVALID_TRIGGER with the API's message and changes
    nothing, and an emptied field removes its level."""
    key, position_id = open_long_on_a_new_page(platform, browser, http)
    editor = row_control(browser, "position-editor", position_id)
    assert not editor.is_displayed()

    row_control(browser, "edit-triggers", position_id).click()
    wait_until(browser, lambda d: editor.is_displayed(), "the TP/SL editor")
    tp_input = row_control(browser, "edit-take-profit", position_id)
    sl_input = row_control(browser, "edit-stop-loss", position_id)
    assert (tp_input.get_attribute("value"), sl_input.get_attribute("value")) == ("", "")
    type_into(tp_input, "110.5")
    type_into(sl_input, "95.25")
    row_control(browser, "save-triggers", position_id).click()
    modified = wait_api_position(browser, http, key, position_id,
                                 lambda p: p["takeProfit"] is not None, "the new TP/SL")
    assert (D(modified["takeProfit"]), D(modified["stopLoss"])) == (D("110.5"), D("95.25"))
    wait_row_shows(browser, position_id, modified)
    wait_until(browser, lambda d: not editor.is_displayed(), "the editor to close")
    # the notice names the position as its row shows it, not by its id alone
    assert text_of(browser, "notice-text") == (
        f"Position {position_id} (long {modified['quantity']} SOL): take-profit "
        f"{modified['takeProfit']}, stop-loss {modified['stopLoss']}.")

    # an SL under the liquidation price: refused, the banner shows the API's answer
    below = "50.00"
    assert D(below) < D(modified["liquidationPrice"])
    row_control(browser, "edit-triggers", position_id).click()
    wait_until(browser, lambda d: editor.is_displayed(), "the TP/SL editor again")
    assert tp_input.get_attribute("value") == modified["takeProfit"]  # prefilled
    assert sl_input.get_attribute("value") == modified["stopLoss"]
    type_into(sl_input, below)
    row_control(browser, "save-triggers", position_id).click()
    banner = wait_banner_answers_as_the_api(
        browser, http, key, "INVALID_TRIGGER", 422, "modify",
        {"positionId": position_id, "takeProfit": modified["takeProfit"], "stopLoss": below})
    assert editor.is_displayed()  # kept open to correct the value
    assert levels(api_position(http, key, position_id)) == levels(modified)
    wait_row_shows(browser, position_id, modified)

    # emptied take-profit: removed (null); the stop-loss set again
    by_id(browser, "error-dismiss").click()
    type_into(tp_input, "")
    type_into(sl_input, modified["stopLoss"])
    sl_input.send_keys(Keys.ENTER)  # Enter saves, as Save does
    removed = wait_api_position(browser, http, key, position_id,
                                lambda p: p["takeProfit"] is None, "the removed TP")
    assert removed["stopLoss"] == modified["stopLoss"]
    wait_row_shows(browser, position_id, removed)
    assert row_cell(browser, position_id, "take-profit") == "—"
    assert not banner.is_displayed()


def test_margin_added_and_removed_from_the_row_at_phone_width(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """At 390x844, the row's amount with + adds margin and with − removes it: margin, the
    liquidation price and the balances follow the API's answers; a removal the API refuses
    shows its error and changes nothing."""
    set_viewport(browser, *PHONE)
    key, position_id = open_long_on_a_new_page(platform, browser, http)
    before = api_position(http, key, position_id)
    assert before is not None
    wait_row_shows(browser, position_id, before)

    amount = row_control(browser, "margin-amount", position_id)
    type_into(amount, "50")
    row_control(browser, "add-margin", position_id).click()
    added = wait_api_position(browser, http, key, position_id,
                              lambda p: D(p["margin"]) != D(before["margin"]), "the added margin")
    assert D(added["margin"]) == D(before["margin"]) + 50
    assert D(added["liquidationPrice"]) < D(before["liquidationPrice"])  # a long: further away
    wait_row_shows(browser, position_id, added)
    # the leverage it has now beside the one it opened with
    now = float(D(added["entryPrice"]) * D(added["quantity"]) / D(added["margin"]))
    assert row_cell(browser, position_id, "leverage") == f"{now:.1f}x (opened 10x)"
    assert text_of(browser, "notice-text") == (
        f"Position {position_id} (long {added['quantity']} SOL): margin "
        f"{money(added['margin'])} USD, liquidation price {added['liquidationPrice']}.")
    wait_until(browser, lambda d: text_of(d, "balance-margin") == money(added["margin"])
               and text_of(d, "balance-free") == money(str(D("10000") - D(added["margin"]))),
               "the balances after adding margin")
    assert amount.get_attribute("value") == ""

    type_into(amount, "25.5")
    row_control(browser, "remove-margin", position_id).click()
    removed = wait_api_position(browser, http, key, position_id,
                                lambda p: D(p["margin"]) != D(added["margin"]),
                                "the removed margin")
    assert D(removed["margin"]) == D(added["margin"]) - D("25.5")
    assert D(added["liquidationPrice"]) < D(removed["liquidationPrice"])
    wait_row_shows(browser, position_id, removed)
    wait_until(browser, lambda d: text_of(d, "balance-margin") == money(removed["margin"]),
               "the margin in use after the removal")

    # removing all but a cent leaves a notional above margin * max leverage: refused
    too_much = str(D(removed["margin"]) - D("0.01"))
    type_into(amount, too_much)
    row_control(browser, "remove-margin", position_id).click()
    wait_banner_answers_as_the_api(browser, http, key, "INVALID_REQUEST", 422, "margin",
                                   {"positionId": position_id, "amount": f"-{too_much}"})
    assert levels(api_position(http, key, position_id)) == levels(removed)
    wait_row_shows(browser, position_id, removed)

    # the row's TP/SL editor, wrapped onto two lines, has its boxes one above the other
    row_control(browser, "edit-triggers", position_id).click()
    tp_box, sl_box = (row_control(browser, testid, position_id).rect
                      for testid in ("edit-take-profit", "edit-stop-loss"))
    assert sl_box["y"] >= tp_box["y"] + tp_box["height"], (tp_box, sl_box)
    assert sl_box["x"] == tp_box["x"], (tp_box, sl_box)
    # a part closed after the margin changed is listed with the leverage it had, as its row
    leverage = row_cell(browser, position_id, "leverage")
    assert leverage.endswith("(opened 10x)"), leverage
    type_into(row_control(browser, "close-quantity", position_id), "1.00")
    row_control(browser, "close-position", position_id).click()
    part = wait_until(browser, lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, f'tr[data-testid="closed-row"][data-position-id="{position_id}"]')),
        None), "the part closed in the history")
    header = [th.get_attribute("textContent") for th in browser.find_elements(
        By.CSS_SELECTOR, "#closed-table th")]
    cells = [td.get_attribute("textContent") for td in part.find_elements(By.CSS_SELECTOR, "td")]
    assert dict(zip(header, cells, strict=True))["Lev."] == leverage
    assert max(browser.execute_script(
        "return [document.documentElement.scrollWidth, document.body.scrollWidth];")) \
        <= PHONE[0]


# The page's network as a flaky one would be, around its real fetch, for the requests whose URL
# contains arguments[0]: "lose" sends the first to the API and loses its answer (a connection
# that drops after sending); "hold" holds each until window.__release() (window.__holding counts
# those waiting). Each is recorded in window.__sent as [url, body, status]: status 0 until the
# page has the answer, and for good when it never gets it.
FLAKY_NETWORK_JS = """
const [part, mode] = arguments;
const realFetch = window.fetch.bind(window);
let first = true;
let waiting = [];
window.__sent = [];
window.__holding = 0;
window.__release = () => {
  const go = waiting;
  waiting = [];
  window.__holding = 0;
  go.forEach((f) => f());
};
window.fetch = async (input, init) => {
  const url = String(input);
  if (!url.includes(part)) return realFetch(input, init);
  const record = [url, init && init.body ? String(init.body) : "", 0];
  window.__sent.push(record);
  const lose = first && mode === "lose";
  first = false;
  if (mode === "hold") {
    await new Promise((resolve) => { waiting.push(resolve); window.__holding = waiting.length; });
  }
  const response = await realFetch(input, init);
  if (lose) throw new TypeError("Failed to fetch");
  record[2] = response.status;
  return response;
};
"""


def flaky_network(driver: WebDriver, part: str, mode: str) -> None:
    driver.execute_script(FLAKY_NETWORK_JS, part, mode)


def sent_requests(driver: WebDriver) -> list[tuple[str, str, int]]:
    return [tuple(r) for r in driver.execute_script("return window.__sent;")]


def sent_client_order_ids(driver: WebDriver) -> list[str]:
    return [json.loads(body)["clientOrderId"] for _, body, _ in sent_requests(driver)]


def wait_holding(driver: WebDriver, sent: int) -> None:
    """Until the page has sent ``sent`` requests and the newest is held."""
    wait_until(driver, lambda d: d.execute_script(
        "return window.__sent.length === arguments[0] && window.__holding === 1;", sent),
        f"request {sent} held in the page")


# Every time the error banner is shown, its code goes to window.__banners.
BANNERS_KEPT_JS = """
window.__banners = [];
const banner = document.getElementById("error-banner");
new MutationObserver(() => {
  if (!banner.hidden) window.__banners.push(banner.dataset.code);
}).observe(banner, { attributes: true });
"""


def fetch_until_back(back: str, counter: str, body: str) -> str:
    """A page script putting a wrapper around ``window.fetch``: ``body`` (JS, with ``input``,
    ``init``, ``innerFetch`` and ``active`` in scope) is the wrapper's; ``active`` is true until
    the page calls ``window.<back>()``; ``window.<counter>`` starts at 0."""
    return f"""
const innerFetch = window.fetch;
let active = true;
window.{counter} = 0;
window.{back} = () => {{ active = false; }};
window.fetch = async (input, init) => {{
{body}
}};
"""


# GET /api/v1/orders (the background refresh's) loses its answers, as a dropped connection
# does, until window.__answersBack(); window.__lost counts them. And every time the error
# banner is shown, its code goes to window.__banners.
LOST_REFRESH_JS = fetch_until_back("__answersBack", "__lost", """
  const response = await innerFetch(input, init);
  const get = !(init && init.method) || init.method === "GET";
  if (active && get && new URL(String(input)).pathname.endsWith("/api/v1/orders")) {
    window.__lost += 1;
    throw new TypeError("Failed to fetch");
  }
  return response;""") + BANNERS_KEPT_JS


def test_an_open_and_a_close_whose_answers_are_lost_are_sent_again_and_happen_once(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """The connection drops after the API opened the position, then after it closed it: the
    page sends each again with the same clientOrderId, gets the first answer back, and shows
    it. One position opened, one close, the margin locked once, no error left on the screen
    (without the resend, the page showed an error and a second click opened a second one)."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    key = create_account(browser)
    mark_page(browser)

    flaky_network(browser, "positions/open", "lose")
    open_long_from_ticket(browser, "100", "10")
    wait_until(browser, lambda d: "NETWORK_ERROR" in text_of(d, "notice-text")
               and "attempt 2" in text_of(d, "notice-text"),
               "the notice that the open is sent again")
    position_id = wait_position_row(browser, "SOL", "long")
    wait_until(browser, lambda d: text_of(d, "notice-text").startswith("Opened long"),
               "the notice of the open")
    assert position_id in text_of(browser, "notice-text")
    ids = sent_client_order_ids(browser)
    assert len(ids) == 2 and ids[0] == ids[1] and ids[0].startswith("web-"), ids
    assert [status for *_, status in sent_requests(browser)] == [0, 201]
    state = account(http, key)
    assert [p["positionId"] for p in state["positions"]] == [position_id]
    assert D(state["balances"]["margin"]) == 100 and D(state["balances"]["free"]) == 9900
    assert not by_id(browser, "error-banner").is_displayed()

    flaky_network(browser, "positions/close", "lose")
    row_control(browser, "close-position", position_id).click()
    closed = closed_row(browser, position_id)
    assert closed.get_attribute("data-close-reason") == "manual"
    wait_until(browser, lambda d: text_of(d, "notice-text").startswith("Closed long"),
               "the notice of the close")
    ids = sent_client_order_ids(browser)
    assert len(ids) == 2 and ids[0] == ids[1], ids
    assert [status for *_, status in sent_requests(browser)] == [0, 200]
    history = http.get("/api/v1/positions/history",
                       headers={"Authorization": f"Bearer {key}"}).json()["positions"]
    assert [c["closeId"] for c in history] == [position_id]
    assert account(http, key)["positions"] == []
    assert not by_id(browser, "error-banner").is_displayed()
    assert_not_reloaded(browser)


def test_an_open_that_meets_a_shard_restarting_after_kill_9_is_sent_again_and_happens_once(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """Long is clicked, and the SOL shard's process is killed (SIGKILL) just before the request
    leaves the page: the API answers 503 SERVICE_UNAVAILABLE (the shard restarts; the open's
    outcome is unknown). The page sends the open again with the same clientOrderId; the
    resend is held until the shard is back and has a price again (as the
    feed gives it), and then the open happens exactly once, at that price."""
    import signal

    import ray
    from engine.shard_machine import LastTick

    shard = platform.platform.shards["shard-SOL-0"]

    def shard_price() -> Any:  # the shard's newest tick; raises while it restarts
        return ray.get(shard.execute.remote([LastTick()]), timeout=20)[0]

    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    key = create_account(browser)
    pid = ray.get(shard.info.remote(), timeout=20)["pid"]

    flaky_network(browser, "positions/open", "hold")
    open_long_from_ticket(browser, "100", "10")
    wait_holding(browser, 1)
    os.kill(pid, signal.SIGKILL)
    browser.execute_script("window.__release();")
    wait_holding(browser, 2)
    assert sent_requests(browser)[0][2] == 503
    assert account(http, key)["positions"] == []
    # the notice that the open is sent again stays while the account refreshes fail meanwhile
    browser.execute_script(LOST_REFRESH_JS)
    wait_until(browser, lambda d: d.execute_script("return window.__lost;") >= 1,
               "a background refresh that fails while the open is resent")
    browser.execute_script("window.__answersBack();")
    assert "SERVICE_UNAVAILABLE" in text_of(browser, "notice-text")
    assert "attempt 2" in text_of(browser, "notice-text")

    deadline = time.monotonic() + 60
    while True:  # the restarted shard answers (with no price: ticks are not journaled)
        try:
            shard_price()
            break
        except ray.exceptions.RayError:
            assert time.monotonic() < deadline, "the SOL shard did not come back"
            time.sleep(0.05)
    assert ray.get(shard.info.remote(), timeout=20)["pid"] != pid
    platform.push_tick("SOL", "100.10", "100.11")
    wait_until(browser, lambda d: (t := shard_price()) is not None and t.ask_ticks == 10011,
               "the restarted shard's first price")
    browser.execute_script("window.__release();")

    position_id = wait_position_row(browser, "SOL", "long")
    wait_until(browser, lambda d: text_of(d, "notice-text").startswith("Opened long"),
               "the notice of the open")
    sent = sent_requests(browser)
    assert [status for *_, status in sent] == [503, 201], sent
    ids = sent_client_order_ids(browser)
    assert len(set(ids)) == 1, ids
    positions = account(http, key)["positions"]
    assert [(p["positionId"], p["entryPrice"]) for p in positions] == [(position_id, "100.11")]
    # the first attempt's lock is released (by its request id) once the shard answers again
    wait_until(browser, lambda d: D(account(http, key)["balances"]["margin"]) == 100,
               "the margin of one position")
    assert D(account(http, key)["balances"]["free"]) == 9900
    assert browser.execute_script("return window.__banners;") == []


def test_a_limit_order_from_the_ticket_then_cancelled_from_its_row(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """Order type Limit with a trigger below the ask places a pending long (201 Order, its
    margin locked); its row's Cancel ends it (the request carries the page's clientOrderId,
    as every trading action does): the row goes, the order history shows it cancelled and the
    margin is free again."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    key = create_account(browser)
    Select(by_id(browser, "ticket-kind")).select_by_value("limit")
    fill(browser, "ticket-trigger", "95.00")
    fill(browser, "ticket-tp", "110.00")
    fill(browser, "ticket-sl", "90.00")
    browser.execute_script("document.getElementById('ticket-expiry').value = arguments[0];",
                           "2030-01-01T00:00")
    open_long_from_ticket(browser, "100", "10")
    row = wait_until(browser, lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, 'tr[data-testid="order-row"]')), None), "the open order's row")
    order_id = row.get_attribute("data-order-id")
    assert "95.00" in row.text and "limit" in row.text
    # the size it buys at its trigger, floored to the step as the engine does: 1000 / 95
    assert row.find_element(By.CSS_SELECTOR, 'td[data-field="size"]').text == "10.52"
    assert text_of(browser, "notice-text").startswith("Placed limit long SOL at 95.00")
    orders = http.get("/api/v1/orders", headers={"Authorization": f"Bearer {key}"}).json()
    assert [o["orderId"] for o in orders["orders"]] == [order_id]
    placed = orders["orders"][0]
    assert (placed["takeProfit"], placed["stopLoss"]) == ("110.00", "90.00")
    assert placed["expiresAt"] is not None
    # the ticket's prices and expiry were that order's: emptied; its margin and leverage stay
    assert [by_id(browser, element_id).get_attribute("value") for element_id in (
        "ticket-trigger", "ticket-tp", "ticket-sl", "ticket-expiry", "ticket-margin",
        "ticket-leverage")] == ["", "", "", "", "100", "10"]
    wait_until(browser, lambda d: text_of(d, "balance-margin") == "100.00", "the order's margin")
    assert text_of(browser, "balance-orders") == "100.00"  # the margin's part that is orders'
    assert account(http, key)["positions"] == []

    flaky_network(browser, f"orders/{order_id}", "lose")  # and its answer is lost once
    order_cancel(browser, order_id).click()
    ended = wait_until(browser, lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, f'tr[data-testid="order-history-row"][data-order-id="{order_id}"]')),
        None), "the cancelled order in the order history")
    assert ended.get_attribute("data-status") == "cancelled"
    wait_until(browser, lambda d: text_of(d, "notice-text").startswith(
        f"Cancelled order {order_id} (limit long SOL at 95.00): its margin 100.00 USD is free "
        "again"), "the notice of the cancel")
    sent = sent_requests(browser)
    assert [status for *_, status in sent] == [0, 200], sent
    assert sent[0][0] == sent[1][0] and "clientOrderId=web-" in sent[0][0]
    wait_until(browser, lambda d: d.find_elements(
        By.CSS_SELECTOR, 'tr[data-testid="order-row"]') == [], "the empty open orders table")
    wait_until(browser, lambda d: text_of(d, "balance-free") == "10000.00", "the freed margin")
    assert text_of(browser, "balance-orders") == "0.00"
    assert not by_id(browser, "error-banner").is_displayed()


def test_a_refresh_error_goes_when_the_page_reads_again_and_never_hides_an_actions_error(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client,
        page_clock: PageClock) -> None:
    """A background refresh that fails shows its error until a refresh succeeds, then the
    banner goes by itself (it stayed for good after an outage). An error of something the
    trader did stays while refreshes fail: it says what to check, they only repeat the
    outage."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    create_account(browser)
    browser.execute_script(LOST_REFRESH_JS)
    banner = by_id(browser, "error-banner")
    wait_until(browser, lambda d: banner.is_displayed()
               and banner.get_attribute("data-code") == "NETWORK_ERROR",
               "the failing refresh's error")
    browser.execute_script("window.__answersBack();")
    wait_until(browser, lambda d: not banner.is_displayed(), "the banner gone once reads work")

    browser.execute_script(LOST_REFRESH_JS)  # failing again, then the trader errs
    wait_until(browser, lambda d: d.execute_script("return window.__lost;") >= 1,
               "a failing refresh")
    open_long_from_ticket(browser, "100", "1000")
    wait_until(browser, lambda d: banner.get_attribute("data-code") == "LEVERAGE_OUT_OF_RANGE",
               "the refused open's error")
    lost = browser.execute_script("return window.__lost;")
    wait_until(browser, lambda d: d.execute_script("return window.__lost;") >= lost + 2,
               "two more failing refreshes")
    assert banner.is_displayed() and banner.get_attribute("data-code") == "LEVERAGE_OUT_OF_RANGE"
    browser.execute_script("window.__answersBack();")


def test_switching_asset_clears_prices_typed_for_the_other(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A trigger, TP and SL typed near ETH's price would make a SOL order fill at once or
    never: switching the ticket to SOL empties them (the margin and leverage stay)."""
    tick(platform, http, "ETH", "3000.00", "3000.01")
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    Select(by_id(browser, "asset-select")).select_by_value("ETH")
    Select(by_id(browser, "ticket-kind")).select_by_value("limit")
    for element_id, value in (("ticket-trigger", "2990.00"), ("ticket-tp", "3100.00"),
                              ("ticket-sl", "2900.00"), ("ticket-margin", "50")):
        fill(browser, element_id, value)
    Select(by_id(browser, "asset-select")).select_by_value("SOL")
    wait_until(browser, lambda d: text_of(d, "ticket-asset") == "SOL", "the SOL ticket")
    assert [by_id(browser, i).get_attribute("value")
            for i in ("ticket-trigger", "ticket-tp", "ticket-sl", "ticket-margin")] == \
        ["", "", "", "50"]


def test_a_row_close_ignores_the_slippage_bound_the_ticket_hides(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A bound typed in the market ticket, hidden since by a limit ticket, does not apply to
    (or, mistyped, refuse) a close from a position's row."""
    key, position_id = open_long_on_a_new_page(platform, browser, http)
    fill(browser, "ticket-slippage", "5x")
    Select(by_id(browser, "ticket-kind")).select_by_value("limit")
    assert not by_id(browser, "ticket-slippage").is_displayed()
    row_control(browser, "close-position", position_id).click()
    closed_row(browser, position_id)
    wait_until(browser, lambda d: text_of(d, "notice-text").startswith("Closed long"),
               "the notice of the close")
    assert account(http, key)["positions"] == []
    assert not by_id(browser, "error-banner").is_displayed()


FIRST_PRICES_ONLY_JS = """
window.WebSocket = class { constructor() { throw new Error("no WebSocket in this test"); } };
const realFetch = window.fetch.bind(window);
let pricesRead = false;
window.fetch = async (input, init) => {
  if (String(input).includes("/prices")) {
    if (pricesRead) await new Promise(() => {});
    pricesRead = true;
  }
  return realFetch(input, init);
};
"""


def test_a_row_close_refused_by_the_tickets_slippage_bound_says_where_the_bound_is(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """The market ticket's bound applies to a row's close, which does not show it: a close it
    refuses (mistyped, or by a price moved since the page's) names the ticket's field, and the
    position stays open. Before, the banner said only "maxSlippageBps: Input should be a valid
    integer" or "exit price 101.00 is more than 0 bps from 100.00"."""
    tick(platform, http, "SOL", "100.00", "100.01")
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": FIRST_PRICES_ONLY_JS})  # the page keeps 100.00
    open_terminal(browser, platform)
    key = create_account(browser)
    wait_until(browser, lambda d: text_of(d, "bid") == "100.00", "the page's price")
    open_long_from_ticket(browser, "100", "10")
    position_id = wait_position_row(browser, "SOL", "long")
    tick(platform, http, "SOL", "101.00", "101.01")
    banner = by_id(browser, "error-banner")
    for bound, code, said in (("5x", "INVALID_REQUEST", "maxSlippageBps"),
                              ("0", "PRICE_MOVED", "exit price 101.00 is more than 0 bps from "
                                                   "100.00")):
        fill(browser, "ticket-slippage", bound)
        row_control(browser, "close-position", position_id).click()
        wait_until(browser, lambda d, code=code: banner.is_displayed()
                   and banner.get_attribute("data-code") == code, f"the {code} banner")
        message = text_of(browser, "error-message")
        assert said in message and message.endswith(
            f"(the ticket's Max slippage, {bound} bps, bounds a close too: clear it to close at "
            "any price)"), message
        assert [p["positionId"] for p in account(http, key)["positions"]] == [position_id]
        by_id(browser, "error-dismiss").click()
    # the bound is of the ticket's asset: the BTC ticket's leaves a SOL row's close alone (it
    # refused it, a bound typed for BTC prices)
    Select(by_id(browser, "asset-select")).select_by_value("BTC")
    wait_until(browser, lambda d: text_of(d, "ticket-asset") == "BTC", "the BTC ticket")
    assert by_id(browser, "ticket-slippage").get_attribute("value") == "0"
    row_control(browser, "close-position", position_id).click()
    assert "101.00" in closed_row(browser, position_id).text  # at the bid, whatever the page's
    assert account(http, key)["positions"] == []


def test_the_ticket_says_when_a_pending_orders_trigger_is_crossed_already(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A limit long above the ask (or a stop long below it) fills at the next price, as a market
    order would: the ticket says so of each side (it cannot know which the trader means), below
    its buttons (a line above them, coming and going as prices move, would move them). Before,
    nothing told it until the fill's notice."""
    tick(platform, http, "SOL", "100.00", "100.10")
    open_terminal(browser, platform)
    wait_until(browser, lambda d: text_of(d, "bid") == "100.00", "the price")
    Select(by_id(browser, "ticket-kind")).select_by_value("limit")
    crossed = by_id(browser, "ticket-crossed")
    long_button = by_id(browser, "submit-long")
    fill(browser, "ticket-trigger", "100.05")  # inside the spread: neither side crosses it
    assert not crossed.is_displayed()
    then = "fills at the next price, as a market order would."
    told = {("limit", "101.00"): f"The ask 100.10 is at or below the trigger already: a limit "
                                 f"long {then}",
            ("limit", "99.00"): f"The bid 100.00 is at or above the trigger already: a limit "
                                f"short {then}",
            ("stop", "100.50"): f"The bid 100.00 is at or below the trigger already: a stop "
                                f"short {then}",
            ("stop", "99.00"): f"The ask 100.10 is at or above the trigger already: a stop long "
                               f"{then}"}
    for (kind, trigger), words in told.items():
        Select(by_id(browser, "ticket-kind")).select_by_value(kind)
        fill(browser, "ticket-trigger", trigger)
        wait_until(browser, lambda d, words=words: crossed.is_displayed()
                   and text_of(d, "ticket-crossed") == words, words)
        # below the buttons: a line coming and going as prices move moves nothing to click
        assert crossed.location["y"] >= long_button.location["y"] + long_button.size["height"]
    Select(by_id(browser, "ticket-kind")).select_by_value("limit")
    fill(browser, "ticket-trigger", "100.05")
    wait_until(browser, lambda d: not crossed.is_displayed(), "no word of a crossed trigger")
    tick(platform, http, "SOL", "100.20", "100.30")  # the price crosses it now
    wait_until(browser, lambda d: crossed.is_displayed() and text_of(d, "ticket-crossed")
               == f"The bid 100.20 is at or above the trigger already: a limit short {then}",
               "the word of the new price")


def test_a_leverage_the_browser_cannot_read_is_named_so(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """Leverage is a number field: of "e" the browser gives the page an empty value, and the
    open was refused as "leverage: Field required". The page names what was typed wrong."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    key = create_account(browser)
    open_long_from_ticket(browser, "100", "e")
    banner = by_id(browser, "error-banner")
    wait_until(browser, lambda d: banner.is_displayed(), "the banner")
    assert (banner.get_attribute("data-code"), text_of(browser, "error-message")) == \
        ("INVALID_REQUEST", "Leverage: not a whole number")
    assert account(http, key)["positions"] == []


def test_a_row_close_with_a_slippage_bound_and_no_price_yet_closes_nothing(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A bound in the market ticket and no price on the page yet: a row's Close is refused in
    the page, as the ticket's open is, and the position stays open; with the bound cleared it
    closes. Before, it closed at the engine's price with the bound left out."""
    tick(platform, http, "SOL", "100.00", "100.01")
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PRICES_HELD_JS})
    open_terminal(browser, platform)
    key = create_account(browser)
    r = http.post("/api/v1/positions/open", headers={"Authorization": f"Bearer {key}"},
                  json={"asset": "SOL", "type": "long", "margin": "100", "leverage": 10})
    assert r.status_code == 201, r.text
    position_id = wait_position_row(browser, "SOL", "long")  # the page polls the account
    assert position_id == r.json()["positionId"] and text_of(browser, "bid") == "—"
    fill(browser, "ticket-slippage", "50")
    row_control(browser, "close-position", position_id).click()
    banner = by_id(browser, "error-banner")
    wait_until(browser, lambda d: banner.is_displayed()
               and banner.get_attribute("data-code") == "PRICE_UNAVAILABLE",
               "the PRICE_UNAVAILABLE banner")
    assert [p["positionId"] for p in account(http, key)["positions"]] == [position_id]
    fill(browser, "ticket-slippage", "")
    row_control(browser, "close-position", position_id).click()
    closed_row(browser, position_id)
    assert account(http, key)["positions"] == []


def test_a_wheel_over_the_focused_leverage_scrolls_the_page_and_keeps_the_value(
        platform: RayHttpPlatform, browser: WebDriver) -> None:
    """A browser turns a wheel over a focused number field into a new value: scrolling past
    the ticket changed the leverage unseen (10 became 9). The page scrolls instead."""
    open_terminal(browser, platform)
    leverage = by_id(browser, "ticket-leverage")
    browser.execute_script("arguments[0].scrollIntoView({block: 'center'});", leverage)
    leverage.click()
    before = browser.execute_script("return window.scrollY;")
    ActionChains(browser).scroll_from_origin(ScrollOrigin.from_element(leverage), 0, 100).perform()
    wait_until(browser, lambda d: d.execute_script("return window.scrollY;") > before,
               "the page scrolled")
    assert leverage.get_attribute("value") == "10"


# Before the page's own scripts run: no WebSocket connects, and GET /prices waits until
# window.__releasePrices(), so the test sees the page before and after its first price.
PRICES_HELD_JS = """
window.WebSocket = class { constructor() { throw new Error("no WebSocket in this test"); } };
const realFetch = window.fetch.bind(window);
let release;
const released = new Promise((resolve) => { release = resolve; });
window.__releasePrices = () => release();
window.fetch = async (input, init) => {
  if (String(input).includes("/prices")) await released;
  return realFetch(input, init);
};
"""


@pytest.mark.parametrize("viewport", [PHONE, (700, 900), DESKTOP], ids=["phone", "narrow",
                                                                          "desktop"])
def test_the_first_price_moves_nothing_below_the_quote(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client,
        viewport: tuple[int, int]) -> None:
    """The quote line (bid, ask, spread, source) fills in when the first price arrives: what
    is below it must not move then, or a tap on `Create demo account` or `Long` that lands as
    the price arrives misses the button (at phone width the source wraps to a line of its own;
    the ticket's estimate, filled in by the price, keeps its room while empty)."""
    tick(platform, http, "SOL", "100.00", "100.01")
    set_viewport(browser, *viewport)
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": PRICES_HELD_JS})
    open_terminal(browser, platform)
    assert text_of(browser, "bid") == "—"
    buttons = [by_id(browser, button) for button in ("create-account", "submit-long")]
    tops = "return arguments[0].map((b) => b.getBoundingClientRect().top);"
    before = browser.execute_script(tops, buttons)
    browser.execute_script("window.__releasePrices();")
    wait_until(browser, lambda d: text_of(d, "bid") == "100.00"
               and text_of(d, "quote-source") == "source: test"
               and text_of(d, "ticket-liquidation"), "the first price and the ticket's estimate")
    assert browser.execute_script(tops, buttons) == before


@pytest.mark.parametrize("viewport", [PHONE, DESKTOP], ids=["phone", "desktop"])
def test_a_notice_or_an_error_coming_and_going_moves_nothing_on_the_page(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client,
        viewport: tuple[int, int]) -> None:
    """A notice goes by itself after 8 s and an error when the next action works: a banner
    in the page's flow pushed the buttons down by its height as it came and pulled them back
    as it went, under a pointer about to click. The banners lie over the page, in the window
    at any scroll, and the buttons, the balances and the tables stay where they were."""
    tick(platform, http, "SOL", "100.00", "100.01")
    set_viewport(browser, *viewport)
    open_terminal(browser, platform)
    create_account(browser)
    notice = by_id(browser, "notice")
    error = by_id(browser, "error-banner")
    watched = [by_id(browser, element_id) for element_id in (
        "submit-long", "submit-short", "ticket-margin", "balance-free", "api-key",
        "positions-count")]
    # where each lies on the page (not in the window: a click may scroll it into view)
    tops = "return arguments[0].map((e) => e.getBoundingClientRect().top + window.scrollY);"
    in_window = ("const r = arguments[0].getBoundingClientRect();"
                 "return r.height > 0 && r.top >= 0 && r.bottom <= window.innerHeight;")

    for scroll_y in (0, 400):
        browser.execute_script("window.scrollTo(0, arguments[0]);", scroll_y)
        wait_until(browser, lambda d: notice.is_displayed(), "the notice")  # 8 s not out yet
        shown = browser.execute_script(tops, watched)
        by_id(browser, "notice-dismiss").click()
        wait_until(browser, lambda d: not notice.is_displayed(), "the notice dismissed")
        assert browser.execute_script(tops, watched) == shown
        # an error (leverage out of range: no line of the ticket comes with it), then a notice
        open_long_from_ticket(browser, "100", "-1")
        wait_until(browser, lambda d: error.is_displayed(), "the error banner")
        assert browser.execute_script(in_window, error)
        if viewport == PHONE:  # the message under the code, the banner's width: not a column
            code, message = (by_id(browser, i).rect for i in ("error-code", "error-message"))
            assert message["y"] >= code["y"] + code["height"], (code, message)
            assert message["width"] >= 0.8 * error.rect["width"], (message, error.rect)
        assert browser.execute_script(tops, watched) == shown
        fill(browser, "ticket-leverage", "10")
        browser.execute_script("window.scrollTo(0, arguments[0]);", scroll_y)
        by_id(browser, "submit-long").click()
        wait_until(browser, lambda d: not error.is_displayed() and notice.is_displayed()
                   and text_of(d, "notice-text").startswith("Opened long"),
                   "the open's notice in the error's place")
        assert browser.execute_script(in_window, notice)
        assert browser.execute_script(tops, watched) == shown, "the open's notice moved them"
        if scroll_y:  # seen scrolled down as well
            assert browser.execute_script("return window.scrollY;") > 0


def at_the_moment_a_row_goes(driver: WebDriver, key: str, gone: str, act: str) -> Any:
    """Closes the position ``gone`` by the API (as a TP/SL or liquidation closes one: not the
    page's doing) and runs the JavaScript function body ``act`` the moment its row leaves the
    table, before the page paints; returns what ``act`` returns."""
    return driver.execute_async_script("""
        const [goneId, key, done] = arguments;
        const act = () => {""" + act + """};
        const body = document.getElementById("positions-body");
        const watch = new MutationObserver(() => {
          if (body.querySelector(`tr[data-position-id="${goneId}"]`)) return;
          watch.disconnect();
          done(act());
        });
        watch.observe(body, {childList: true});
        fetch("/api/v1/positions/close", {method: "POST", headers: {
          "Authorization": `Bearer ${key}`, "Content-Type": "application/json"},
          body: JSON.stringify({positionId: goneId})});
        """, gone, key)


def test_a_rows_buttons_wait_a_moment_after_the_row_moved(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A position closed by the engine (here by the API, as a TP/SL or liquidation does)
    takes its row away and the rows below move up: a click aimed at its Close landed on the
    Close of the row that took its place, and closed that position. A row that just came or
    moved refuses its buttons for a moment (Edit's too: its editor would have been another
    position's), saying so, and closes nothing; then it works, and its editor names it."""
    key, first = open_long_on_a_new_page(platform, browser, http)
    open_long_from_ticket(browser, "50", "5")
    wait_until(browser, lambda d: len(position_rows(d)) == 2, "the second position's row")
    upper, lower = (r.get_attribute("data-position-id") for r in position_rows(browser))
    row_settled(browser, f'tr[data-testid="position-row"][data-position-id="{lower}"]')
    lower_top = row_control(browser, "close-position", lower).rect["y"]
    # the clicks come the moment the upper row goes: where the upper row's Edit and Close were
    clicked = at_the_moment_a_row_goes(browser, key, upper, f"""
        const button = (testid) => document.querySelector(
          `button[data-testid="${{testid}}"][data-position-id="{lower}"]`);
        const top = button("close-position").getBoundingClientRect().top + window.scrollY;
        button("edit-triggers").click();
        button("close-position").click();
        return top;""")
    assert clicked < lower_top  # moved up (both from the page's top)
    wait_until(browser, lambda d: text_of(d, "error-code") == "ROW_MOVED",
               "the refusal of the click on the row that moved")
    assert "nothing was sent" in text_of(browser, "error-message")
    assert not browser.find_element(
        By.CSS_SELECTOR, f'tr[data-testid="position-editor"][data-position-id="{lower}"]'
    ).is_displayed()
    assert [p["positionId"] for p in account(http, key)["positions"]] == [lower]
    time.sleep(0.5)  # what a close the page sent would have needed to land
    assert [p["positionId"] for p in account(http, key)["positions"]] == [lower]
    # settled, the same buttons work: the editor names its position
    row_control(browser, "edit-triggers", lower).click()
    [position] = account(http, key)["positions"]
    assert row_control(browser, "editor-position", lower).text == \
        f"Position {lower}: long {position['quantity']} SOL"
    row_control(browser, "cancel-edit", lower).click()
    row_control(browser, "close-position", lower).click()
    closed_row(browser, lower)
    wait_until(browser, lambda d: position_rows(d) == [], "no open position")
    assert first in (upper, lower)


def test_a_row_the_window_scrolled_under_the_pointer_waits_a_moment_too(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """Scrolled to the page's end, a position closed by the engine makes the page shorter and
    the browser pulls the scroll back: the rows above it move down on the screen, none on the
    page. A click where the last row's Close was closed the row above it, with no refusal
    (the rows' places were compared on the page). They are compared in the window now."""
    key, _ = open_long_on_a_new_page(platform, browser, http)
    for _ in range(2):
        r = http.post("/api/v1/positions/open", headers={"Authorization": f"Bearer {key}"},
                      json={"asset": "SOL", "type": "long", "margin": "20", "leverage": 5})
        assert r.status_code == 201, r.text
    wait_until(browser, lambda d: len(position_rows(d)) == 3, "three rows")
    ids = [r.get_attribute("data-position-id") for r in position_rows(browser)]
    by_id(browser, "tab-order-history").click()  # the closed one adds no row below
    browser.execute_script("window.scrollTo(0, document.documentElement.scrollHeight);")
    for position_id in ids:
        row_settled(browser, f'tr[data-testid="position-row"][data-position-id="{position_id}"]')
    scroll_before, point = browser.execute_script(
        "const r = arguments[0].getBoundingClientRect();"
        "return [window.scrollY, [r.left + r.width / 2, r.top + r.height / 2]];",
        row_control(browser, "close-position", ids[-1]))
    assert scroll_before > 0
    scroll_after, hit = at_the_moment_a_row_goes(browser, key, ids[-1], f"""
        const target = document.elementFromPoint({point[0]}, {point[1]});
        target.click();
        return [window.scrollY, target.dataset.positionId ?? null];""")
    assert scroll_after < scroll_before, "the page did not pull its scroll back"
    assert hit == ids[-2], (hit, ids)  # the row above, moved down into the gone one's place
    wait_until(browser, lambda d: text_of(d, "error-code") == "ROW_MOVED",
               "the refusal of the click on the row the window moved")
    time.sleep(0.5)  # what a close the page sent would have needed to land
    assert [p["positionId"] for p in account(http, key)["positions"]] == ids[:-1]


def test_a_row_whose_buttons_moved_sideways_waits_a_moment_too(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A position of a longer size (or any wider figure) widens its column: the buttons of
    every row move sideways, "+" toward where "−" was, with no row above them changing. The
    rows whose buttons moved wait a moment too."""
    key, sol = open_long_on_a_new_page(platform, browser, http)
    row = f'tr[data-testid="position-row"][data-position-id="{sol}"]'
    row_settled(browser, row)
    buttons = "return arguments[0].map((b) => [b.getBoundingClientRect().left, " \
        "b.getBoundingClientRect().top]);"
    controls = [row_control(browser, testid, sol) for testid in ("add-margin", "remove-margin",
                                                                 "close-position")]
    before = browser.execute_script(buttons, controls)
    # the moment the second row comes (its size 98.99 and margin 990.00 wider than 9.99 and
    # 100.00), "+" of the first row is clicked where it is then
    after, quantity = browser.execute_async_script("""
        const [key, controls, done] = arguments;
        const body = document.getElementById("positions-body");
        const watch = new MutationObserver(() => {
          if (body.querySelectorAll('tr[data-testid="position-row"]').length < 2) return;
          watch.disconnect();
          const places = controls.map((b) => [b.getBoundingClientRect().left,
                                              b.getBoundingClientRect().top]);
          controls[0].click();
          opened.then((p) => done([places, p.quantity]));
        });
        watch.observe(body, {childList: true});
        const opened = fetch("/api/v1/positions/open", {method: "POST", headers: {
          "Authorization": `Bearer ${key}`, "Content-Type": "application/json"},
          body: JSON.stringify({asset: "SOL", type: "long", margin: "990", leverage: 10})}
        ).then((r) => r.json());
        """, key, controls)
    assert len(quantity) > len("9.99"), quantity
    assert [top for _, top in after] == [top for _, top in before]  # no row came above it
    assert all(a > b for (a, _), (b, _) in zip(after, before, strict=True)), (before, after)
    wait_until(browser, lambda d: text_of(d, "error-code") == "ROW_MOVED",
               "the refusal of the click on the button that moved sideways")


def test_the_tables_stay_put_as_the_tickets_lines_come_and_go(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """At 1366x800 the ticket and the account, beside the chart, are the taller column: the
    ticket's line of a crossed trigger, coming and going with the price, moved the tables
    below (every row, 63 px) each time, under a pointer. The column keeps the tallest height
    it had: the tables move when it first grows, then no more."""
    tick(platform, http, "SOL", "100.00", "100.10")
    open_terminal(browser, platform)
    create_account(browser)
    wait_until(browser, lambda d: text_of(d, "bid") == "100.00", "the price")
    Select(by_id(browser, "ticket-kind")).select_by_value("limit")
    crossed = by_id(browser, "ticket-crossed")
    tables = [by_id(browser, element_id) for element_id in ("positions-table", "orders-table")]
    tops = "return arguments[0].map((e) => e.getBoundingClientRect().top + window.scrollY);"
    fill(browser, "ticket-trigger", "101.00")  # the ask crosses it
    wait_until(browser, lambda d: crossed.is_displayed(), "the crossed line")
    shown = browser.execute_script(tops, tables)
    for trigger, seen in (("100.05", False), ("101.00", True), ("", False)):
        field = by_id(browser, "ticket-trigger")  # emptied as a trader does: keys, not clear()
        field.send_keys(Keys.CONTROL, "a")
        field.send_keys(Keys.BACKSPACE, *trigger)
        wait_until(browser, lambda d, seen=seen: crossed.is_displayed() == seen,
                   f"the crossed line {'shown' if seen else 'gone'} at {trigger!r}")
        wait_next_frames(browser)
        assert browser.execute_script(tops, tables) == shown, trigger
    # so with the price: the trigger stays, the quote crosses it and leaves it
    fill(browser, "ticket-trigger", "100.05")
    for bid, ask, seen in (("100.06", "100.07", True), ("100.00", "100.10", False)):
        tick(platform, http, "SOL", bid, ask)
        wait_until(browser, lambda d, seen=seen: crossed.is_displayed() == seen,
                   f"the crossed line at {bid}/{ask}")
        wait_next_frames(browser)
        assert browser.execute_script(tops, tables) == shown, (bid, ask)


def test_the_api_docs_page_lists_the_operations_from_the_platform_alone(
        platform: RayHttpPlatform, browser: WebDriver) -> None:
    """``GET /docs`` (the banner's docs link): Swagger UI, served by the platform itself, draws
    the API's operations from /openapi.json; nothing the page loads comes from another host
    (this machine has no internet access, as many a trading desk's has not)."""
    browser.get(f"{platform.base_url}/docs")
    wait_until(browser, lambda d: d.find_elements(By.ID, "operations-positions-openPosition"),
               "the openPosition operation")
    loaded = browser.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name);")
    assert f"{platform.base_url}/openapi.json" in loaded, loaded
    assert all(url.startswith(f"{platform.base_url}/") for url in loaded), loaded


def test_a_quote_that_stops_moving_is_marked_stale_until_the_next_price(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client,
        page_clock: PageClock) -> None:
    """No newer price for 10 s (on the page's own clock, from the price's arrival): the
    quote is dimmed and says for how long, where it named its source; the next price clears
    it. Before, a quote from a feed that had stopped looked as live as any."""
    tick(platform, http, "SOL", "100.10", "100.12")
    open_terminal(browser, platform)
    wait_until(browser, lambda d: text_of(d, "bid") == "100.10", "the first quote")
    quote = by_id(browser, "quote")
    assert "stale" not in (quote.get_attribute("class") or "")
    assert text_of(browser, "quote-source") == "source: test"
    wait_until(browser, lambda d: "stale" in (quote.get_attribute("class") or ""),
               "the stale mark")
    label = text_of(browser, "quote-source")
    assert label.startswith("no price for ") and label.endswith(" s"), label
    assert int(label.split()[3]) >= 10, label
    assert by_id(browser, "quote-source").get_attribute("title") == "source: test"
    assert text_of(browser, "bid") == "100.10"  # still shown, marked
    tick(platform, http, "SOL", "100.20", "100.22")
    wait_until(browser, lambda d: text_of(d, "bid") == "100.20"
               and "stale" not in (quote.get_attribute("class") or ""), "the fresh quote")
    assert text_of(browser, "quote-source") == "source: test"


# Before the page's own scripts run: the page's first SUBSCRIBE to the account stream is not
# sent; the server's answer to it is, as a server whose ledger is restarting gives it (the stream
# cannot start, subscribe again). window.__accountSubscribes counts the page's SUBSCRIBEs to it.
ACCOUNT_STREAM_ENDED_JS = """
const RealWebSocket = window.WebSocket;
window.__accountSubscribes = 0;
window.WebSocket = class extends RealWebSocket {
  send(data) {
    const frame = JSON.parse(data);
    if (frame.method === "SUBSCRIBE" && frame.params.includes("account")) {
      window.__accountSubscribes += 1;
      if (window.__accountSubscribes === 1) {
        const error = {code: "SERVICE_UNAVAILABLE",
                       message: "the account stream cannot start now; subscribe again"};
        setTimeout(() => this.dispatchEvent(
            new MessageEvent("message", {data: JSON.stringify({error})})), 0);
        return;
      }
    }
    super.send(data);
  }
};
"""


def test_an_account_stream_the_server_could_not_start_is_subscribed_again(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """The server answers the account subscription with SERVICE_UNAVAILABLE (its ledger
    restarting: "subscribe again"): the page subscribes again on the same connection, and the
    engine's closes are told as they happen. Before, the page polled for the rest of the
    connection's life, and a liquidation only ever emptied the row, unannounced."""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": ACCOUNT_STREAM_ENDED_JS})
    key, position_id = open_long_on_a_new_page(platform, browser, http, leverage="20")
    liquidation = D(account(http, key)["positions"][0]["liquidationPrice"])
    mark_page(browser)
    stream = by_id(browser, "account-stream")
    wait_until(browser, lambda d: d.execute_script("return window.__accountSubscribes;") >= 2
               and stream.get_attribute("data-state") == "live"
               and stream.get_attribute("data-seq"), "the account stream subscribed again")
    assert by_id(browser, "ws-status").get_attribute("data-state") == "open"
    assert not by_id(browser, "error-banner").is_displayed()

    tick(platform, http, "SOL", str(liquidation), str(liquidation + D("0.01")))
    wait_until(browser, lambda d: text_of(d, "notice-text").startswith(
        f"Position {position_id} (long ") and "closed by liquidation at" in text_of(
            d, "notice-text"), "the notice of the liquidation")
    wait_until(browser, lambda d: position_rows(d) == [], "the liquidated row to leave the table")
    assert_not_reloaded(browser)


# Before the page's own scripts run: every candlestick series the page's chart adds is kept in
# window.__series (its data() is what the chart draws), the chart in window.__charts.
CHART_SERIES_JS = """
window.__series = [];
window.__charts = [];
let library;
Object.defineProperty(window, "LightweightCharts", {
  configurable: true,
  get() { return library; },
  set(value) {
    library = {...value, createChart(...args) {
      const chart = value.createChart(...args);
      window.__charts.push(chart);
      const addSeries = chart.addSeries.bind(chart);
      chart.addSeries = (...more) => {
        const series = addSeries(...more);
        window.__series.push(series);
        return series;
      };
      return chart;
    }};
  },
});
"""


def chart_lines(driver: WebDriver) -> list[list[Any]]:
    """[title, price] of each horizontal line of the page's chart (prices as numbers)."""
    return list(driver.execute_script(
        "return window.__series.length ? window.__series[0].priceLines().map("
        "l => [l.options().title, l.options().price]) : [];"))


def newest_candle_and_labels(driver: WebDriver) -> list[float]:
    """[the right edge of the newest candle, the left edge of the widest line label's text] in
    the chart's pane (px from its left); the labels are drawn at the pane's right edge."""
    return list(driver.execute_script(
        "const chart = window.__charts[0], s = window.__series[0], ts = chart.timeScale();"
        "const bars = s.data();"
        "const x = ts.timeToCoordinate(bars[bars.length - 1].time);"
        "const ctx = document.createElement('canvas').getContext('2d');"
        "const {fontSize, fontFamily} = chart.options().layout;"
        "ctx.font = `${fontSize}px ${fontFamily}`;"
        "const widest = Math.max(...s.priceLines().map("
        "  (l) => ctx.measureText(l.options().title).width));"
        "return [x + ts.options().barSpacing / 2, chart.paneSize().width - widest];"))


def chart_bars(driver: WebDriver) -> list[int]:
    """The times (unix s) of the candles the page's chart draws."""
    return list(driver.execute_script(
        "return window.__series.length ? window.__series[0].data().map(b => b.time) : [];"))


def bars_apart_s(driver: WebDriver) -> int | None:
    """The least time between two candles the page's chart draws (its interval, s)."""
    bars = chart_bars(driver)
    return min((b - a for a, b in itertools.pairwise(bars)), default=None)


def test_the_charts_levels_can_be_hidden_and_stay_so_after_a_reload(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A trader reading the candles of a busy asset hides the levels of its positions and
    orders (and shows them again) with the box under the chart; the choice outlives a reload.
    Before, every position drew four lines over the candles, always."""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": CHART_SERIES_JS})
    key, _ = open_long_on_a_new_page(platform, browser, http)
    [position] = account(http, key)["positions"]
    drawn = sorted([f"long {position['quantity']}", "liq."])
    wait_until(browser, lambda d: sorted(t for t, _ in chart_lines(d)) == drawn,
               "the position's levels")
    levels_box = by_id(browser, "chart-levels")
    assert levels_box.is_selected()
    levels_box.click()
    wait_until(browser, lambda d: chart_lines(d) == [], "no level drawn")
    wait_until(browser, lambda d: not by_id(d, "chart-below").is_displayed(),
               "the liquidation level no longer named at the chart's bottom edge")
    browser.refresh()
    wait_position_row(browser, "SOL", "long")
    assert not by_id(browser, "chart-levels").is_selected()
    wait_next_frames(browser)
    assert chart_lines(browser) == []
    by_id(browser, "chart-levels").click()
    wait_until(browser, lambda d: sorted(t for t, _ in chart_lines(d)) == drawn,
               "the levels drawn again")


def test_what_one_tick_does_is_told_each_and_a_refused_fill_in_words(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """One tick fills two orders and refuses a third at its fill: the notice tells all three,
    newest first, the refusal in words and in the warning's colour. Before, each notice
    replaced the one before (only the last was seen), and a refused fill read as a plain
    notice naming only its code."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    key = create_account(browser)
    ids = []
    # limit longs at 99.00; the third's take-profit, 95.00, lies below the fill at 98.01
    for take_profit in (None, None, "95.00"):
        body = {"asset": "SOL", "type": "long", "orderType": "limit", "triggerPrice": "99.00",
                "margin": "10", "leverage": 2, **({"takeProfit": take_profit} if take_profit
                                                 else {})}
        r = http.post("/api/v1/orders", headers={"Authorization": f"Bearer {key}"}, json=body)
        assert r.status_code == 201, r.text
        ids.append(r.json()["orderId"])
    tick(platform, http, "SOL", "98.00", "98.01")
    wait_until(browser, lambda d: all(f"Order {i} " in text_of(d, "notice-text") for i in ids),
               "a notice of each order the tick ended")
    lines = text_of(browser, "notice-text").splitlines()
    [refused] = [line for line in lines if f"Order {ids[2]} " in line]
    assert "was not filled: its take-profit or stop-loss lay on the wrong side of the fill " \
        "price (INVALID_TRIGGER)" in refused, refused
    # each fill with its price and size, from its position (told right after the fill)
    positions = {p["positionId"]: p for p in http.get(
        "/api/v1/state", headers={"Authorization": f"Bearer {key}"}).json()["positions"]}
    filled = [line for line in lines if any(f"Order {i} " in line for i in ids[:2])]
    assert len(filled) == 2 == len(positions), (lines, positions)
    assert sorted(filled) == sorted(
        f"Order {o['orderId']} filled at 98.01: limit long {positions[o['positionId']]['quantity']}"
        f" SOL (position {o['positionId']})." for o in http.get(
            "/api/v1/orders/history", headers={"Authorization": f"Bearer {key}"}
        ).json()["orders"] if o["status"] == "filled"), lines
    assert by_id(browser, "notice").get_attribute("data-tone") == "warning"
    # the order history lists the refused order with its take-profit, and why, in words
    by_id(browser, "tab-order-history").click()
    row = f'tr[data-testid="order-history-row"][data-order-id="{ids[2]}"]'
    wait_until(browser, lambda d: d.find_elements(By.CSS_SELECTOR, row), "the refused order")
    header = [th.text for th in browser.find_elements(By.CSS_SELECTOR,
                                                      "#order-history-table th")]
    cells = dict(zip(header, [td.text for td in browser.find_elements(
        By.CSS_SELECTOR, f"{row} > td")], strict=True))
    assert (cells["TP"], cells["SL"], cells["Status"]) == ("95.00", "—", "rejected"), cells
    assert cells["Reason"] == "its take-profit or stop-loss lay on the wrong side of the fill " \
        "price (INVALID_TRIGGER)", cells
    assert cells["Filled at"] == "—", cells
    # a filled one the price it filled at, 98.01, beside its trigger, 99.00 (only the notice
    # told it); its position's entry, once that position closed too
    for order_id in ids[:2]:
        filled_row = f'tr[data-testid="order-history-row"][data-order-id="{order_id}"]'
        fill_cell = f'{filled_row} > td[data-field="fill-price"]'
        wait_until(browser, lambda d, c=fill_cell: d.find_element(By.CSS_SELECTOR, c).text
                   == "98.01", f"order {order_id}'s fill price")
        assert "99.00" in browser.find_element(By.CSS_SELECTOR, filled_row).text
    r = http.post("/api/v1/positions/close", headers={"Authorization": f"Bearer {key}"},
                  json={"positionId": next(iter(positions))})
    assert r.status_code == 200, r.text
    closed_row(browser, next(iter(positions)))
    assert [browser.find_element(By.CSS_SELECTOR, f'tr[data-testid="order-history-row"]'
                                 f'[data-order-id="{order_id}"] > td[data-field="fill-price"]'
                                 ).text for order_id in ids[:2]] == ["98.01", "98.01"]


def test_a_refresh_error_leaves_the_notice_of_what_the_trader_just_did(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """An open succeeds and the refresh after it fails (its GET /orders lost): the refresh's
    error shows, and the notice of the open stays beside it. Before, the error hid the notice,
    and once a refresh worked and the error went, nothing said the position had opened."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    create_account(browser)
    browser.execute_script(LOST_REFRESH_JS)
    open_long_from_ticket(browser, "100", "10")
    banner = by_id(browser, "error-banner")
    notice = by_id(browser, "notice-text")
    wait_until(browser, lambda d: str(notice.get_attribute("textContent")).startswith(
        "Opened long") and banner.is_displayed()
        and banner.get_attribute("data-code") == "NETWORK_ERROR",
        "the open's notice, then the error of the refresh after it")
    assert by_id(browser, "notice").is_displayed()
    browser.execute_script("window.__answersBack();")


def test_a_candle_history_that_failed_to_load_is_loaded_again(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """The first GET /klines of an asset is answered 503 (the candles' store restarting): the
    page says so, loads the history again, and then draws every candle the API has and no
    error is left. Before, the chart showed only the candles built live after the failure
    until the trader switched asset or the socket reconnected, and the error stayed."""
    last = http.get("/api/v1/prices").json().get("BTC")
    after_us = price_ts_us(last["ts"]) if last else 0
    now_us = time.time_ns() // 1000
    for minutes_ago in (3, 2, 1, 0):
        ts_us = max(now_us - minutes_ago * 60_000_000, after_us + 1)
        after_us = ts_us
        produce_at(platform, http, "BTC", D("60000.0") + minutes_ago, ts_us)
    history = http.get("/api/v1/klines", params={"asset": "BTC", "interval": "1m"}).json()
    starts = [int(D(price_ts_us(k["start"])) / 1_000_000) for k in history["klines"]]
    assert len(starts) >= 2

    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": CHART_SERIES_JS})
    open_terminal(browser, platform)
    browser.execute_script("""
        const realFetch = window.fetch.bind(window);
        window.__failed = 0;
        window.fetch = async (input, init) => {
          const url = String(input);
          if (!window.__failed && url.includes("klines?asset=BTC&") && url.includes("limit=500")) {
            window.__failed += 1;
            return new Response(JSON.stringify({error: {code: "SERVICE_UNAVAILABLE",
              message: "candles unavailable"}}), {status: 503,
              headers: {"Content-Type": "application/json"}});
          }
          return realFetch(input, init);
        };""")
    Select(by_id(browser, "asset-select")).select_by_value("BTC")
    banner = by_id(browser, "error-banner")
    wait_until(browser, lambda d: banner.is_displayed()
               and banner.get_attribute("data-code") == "SERVICE_UNAVAILABLE",
               "the failed load's error")
    wait_until(browser, lambda d: chart_bars(d)[:len(starts)] == starts,
               f"the chart to draw the {len(starts)} candles of the history")
    assert chart_bars(browser) == sorted(set(chart_bars(browser)))  # none twice
    wait_until(browser, lambda d: not banner.is_displayed(), "the error gone after the load")


def test_older_candles_are_loaded_a_page_at_a_time_back_to_the_first(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """The chart draws the newest page of candles, then, while its view is near the oldest
    drawn, asks for the page before it (GET /api/v1/klines with ``endTime`` one second before
    that candle's start) until an answer brings none older: every candle the API has is drawn
    once, oldest first, and the view stays at the newest meanwhile; read back to the first, the
    page asks once more and then no more; a page that failed is asked again. The page's fetch
    cuts each answer to a quarter of the history here, as a server answering fewer than asked
    would. Before, the chart held the newest 500 candles and nothing older."""
    last = http.get("/api/v1/prices").json().get("ETH")
    after_us = price_ts_us(last["ts"]) if last else 0
    now_us = time.time_ns() // 1000
    for minutes_ago in (7, 6, 5, 4, 3, 2, 1, 0):
        ts_us = max(now_us - minutes_ago * 60_000_000, after_us + 1)
        after_us = ts_us
        produce_at(platform, http, "ETH", D("3000.00") + minutes_ago, ts_us)
    history = http.get("/api/v1/klines", params={"asset": "ETH", "interval": "1m",
                                                 "limit": 1000}).json()["klines"]
    starts = [price_ts_us(k["start"]) // 1_000_000 for k in history]
    assert len(starts) >= 4
    page = max(2, len(starts) // 4)

    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": CHART_SERIES_JS})
    open_terminal(browser, platform)
    browser.execute_script("""
        const [page] = arguments;
        const realFetch = window.fetch.bind(window);
        window.__older = [];  // [endTime asked, candles answered, 503 or null] of each older page
        window.fetch = async (input, init) => {
          const url = new URL(String(input));
          if (!url.pathname.endsWith("/api/v1/klines") || url.searchParams.get("asset") !== "ETH"
              || url.searchParams.get("limit") !== "500") return realFetch(input, init);
          url.searchParams.set("limit", String(page));
          const asked = [Number(url.searchParams.get("endTime")), null];  // as it is sent
          if (url.searchParams.has("endTime")) window.__older.push(asked);
          if (url.searchParams.has("endTime") && !window.__refused) {
            window.__refused = asked[1] = 503;  // the first older page fails once
            return new Response(JSON.stringify({error: {code: "SERVICE_UNAVAILABLE",
              message: "candles unavailable"}}), {status: 503,
              headers: {"Content-Type": "application/json"}});
          }
          const response = await realFetch(url.href, init);
          asked[1] = (await response.clone().json()).klines.length;
          return response;
        };""", page)
    Select(by_id(browser, "asset-select")).select_by_visible_text("ETH")
    # the pages before the first, while the view has room left of the oldest candle drawn
    wait_until(browser, lambda d: d.execute_script(
        "return window.__older.length && window.__older.every(([, n]) => n !== null);")
        and set(chart_bars(d)) <= set(starts) and len(chart_bars(d)) > page,
        "an older page drawn")
    assert not by_id(browser, "chart-newest").is_displayed()  # the view still at the newest
    # read back to the first candle (each time to the oldest drawn): the page before it is
    # asked for, and answered with none
    scroll_to_oldest = ("window.__charts[0].timeScale().scrollToPosition("
                        "-window.__series[0].data().length, false);")
    older = wait_until(browser, lambda d: d.execute_script(
        scroll_to_oldest + "const asked = window.__older;"
        "return asked.length && asked[asked.length - 1][1] === 0 ? asked : null;"),
        "an older page answered with no candle")
    bars = chart_bars(browser)
    assert bars[:len(starts)] == starts
    assert bars == sorted(set(bars))  # none twice
    # each page asked for the candles before the oldest drawn, the last one before the first
    expected, oldest = [], max(0, len(starts) - page)
    while not expected or expected[-1][1]:
        expected.append([starts[oldest] - 1, min(page, oldest)])
        oldest -= min(page, oldest)
    assert older == [[expected[0][0], 503], *expected]  # the one that failed, asked again
    browser.execute_script(scroll_to_oldest)
    wait_next_frames(browser)
    assert browser.execute_script("return window.__older.length;") == len(older)  # no more


def test_older_candles_put_before_the_oldest_leave_the_view_on_the_candles_it_shows(
        platform: RayHttpPlatform, browser: WebDriver) -> None:
    """A trader reading the oldest candles drawn keeps reading the same candles when the page
    before them is put in (chart.js's prependKlines): the view does not jump by the page's
    length; a candle not older than the oldest drawn is not put in."""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument",
                            {"source": CHART_SERIES_JS})
    open_terminal(browser, platform)
    shown = browser.execute_async_script("""
        const done = arguments[0];
        import('./static/js/chart.js').then(async (m) => {
          const frames = () => new Promise((r) => requestAnimationFrame(() =>
                                                   requestAnimationFrame(r)));
          const box = document.createElement('div');
          box.style.cssText = 'width: 600px; height: 300px';
          document.body.append(box);
          const chart = m.createCandleChart(box);
          const handle = window.__charts[window.__charts.length - 1];
          const kline = (minute) => ({start: new Date(minute * 60000).toISOString(),
                                      open: '10', high: '12', low: '9', close: '11'});
          const minutes = (from, to) => Array.from({length: to - from}, (_, i) => kline(from + i));
          chart.setKlines(minutes(29000000, 29000100));
          await frames();
          handle.timeScale().scrollToPosition(-80, false);  // the oldest candles in view
          await frames();
          const at = (minute) => handle.timeScale().timeToCoordinate(minute * 60);
          const before = [at(29000000), at(29000010)];
          const added = chart.prependKlines([...minutes(28999950, 29000000), kline(29000010)]);
          await frames();
          const after = [at(29000000), at(29000010)];
          const times = window.__series[window.__series.length - 1].data().map((b) => b.time);
          box.remove();
          done([added, before, after, times.length, times[0], times[times.length - 1]]);
        });""")
    added, before, after, count, first, last = shown
    assert added == 50
    assert all(x is not None and 0 <= x <= 600 for x in before), before  # both in view
    assert after == before  # at the same places
    assert (count, first, last) == (150, 28999950 * 60, 29000099 * 60)


# GET /api/v1/klines answers 503 until window.__candlesBack(); window.__stateReads counts the
# GET /api/v1/state reads answered 200, window.__shownAt is that count when the banner first
# showed the candles' error.
FAILING_CANDLES_JS = fetch_until_back("__candlesBack", "__stateReads", """
  const path = new URL(String(input)).pathname;
  if (active && path.endsWith("/api/v1/klines")) {
    return new Response(JSON.stringify({error: {code: "SERVICE_UNAVAILABLE",
      message: "candles unavailable"}}), {status: 503,
      headers: {"Content-Type": "application/json"}});
  }
  const response = await innerFetch(input, init);
  if (path.endsWith("/api/v1/state") && response.ok) window.__stateReads += 1;
  return response;""") + """
window.__shownAt = null;
const banner = document.getElementById("error-banner");
new MutationObserver(() => {
  const candles = document.getElementById("error-message").textContent === "candles unavailable";
  if (!banner.hidden && candles && window.__shownAt === null) {
    window.__shownAt = window.__stateReads;
  }
}).observe(banner, { attributes: true, childList: true, subtree: true });
"""


def test_a_candle_history_error_stays_while_the_account_reads_well(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client,
        page_clock: PageClock) -> None:
    """Logged in, the candles of the asset chosen cannot be loaded (503) while the account's
    reads succeed: the candles' error stays over the empty chart until they load, then goes.
    Before, the next account refresh took it away (within 5 s), and the chart stayed empty
    with nothing said."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    create_account(browser)
    browser.execute_script(FAILING_CANDLES_JS)
    wait_until(browser, lambda d: d.execute_script("return window.__stateReads;") >= 1,
               "an account read")  # so that the count is not 0 when the error shows
    Select(by_id(browser, "asset-select")).select_by_value("BTC")
    banner = by_id(browser, "error-banner")
    reads = wait_until(browser, lambda d: d.execute_script("return window.__shownAt;"),
                       "the candles' error")
    wait_until(browser, lambda d: d.execute_script("return window.__stateReads;") >= reads + 2,
               "two account refreshes answered")
    assert banner.is_displayed() and text_of(browser, "error-message") == "candles unavailable"
    browser.execute_script("window.__candlesBack();")
    wait_until(browser, lambda d: not banner.is_displayed(), "the error gone once they load")


def test_the_error_of_an_asset_list_that_failed_to_load_goes_once_it_loads(
        platform: RayHttpPlatform, browser: WebDriver) -> None:
    """The page's first GET /assets is answered 503 (the platform still starting): the banner
    says so, the page asks again, and once the assets are listed the error goes. Before, it
    stayed over a page that worked, saying the server did not answer."""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": """
        const realFetch = window.fetch.bind(window);
        window.__failed = 0;
        window.fetch = async (input, init) => {
          if (!window.__failed && new URL(String(input)).pathname.endsWith("/api/v1/assets")) {
            window.__failed += 1;
            return new Response(JSON.stringify({error: {code: "SERVICE_UNAVAILABLE",
              message: "the platform is starting"}}), {status: 503,
              headers: {"Content-Type": "application/json"}});
          }
          return realFetch(input, init);
        };"""})
    browser.get(f"{platform.base_url}/")
    banner = by_id(browser, "error-banner")
    wait_until(browser, lambda d: banner.is_displayed()
               and banner.get_attribute("data-code") == "SERVICE_UNAVAILABLE",
               "the failed asset list's error")
    wait_until(browser, lambda d: text_of(d, "ticket-asset") != "", "the asset list")
    wait_until(browser, lambda d: not banner.is_displayed(), "the error gone once listed")


# Before the page's own scripts run: every WebSocket the page opens is kept in window.__sockets.
SOCKETS_KEPT_JS = """
const RealWebSocket = window.WebSocket;
window.__sockets = [];
window.WebSocket = class extends RealWebSocket {
  constructor(...args) {
    super(...args);
    window.__sockets.push(this);
  }
};
"""


def test_a_kept_key_the_api_refuses_is_said_to_be_refused_not_polled(
        platform: RayHttpPlatform, browser: WebDriver) -> None:
    """A key kept in the browser that the API no longer knows (its platform's data started
    afresh): the account panel says the key was refused, and stays so while the live
    connection's own refusal of it comes, after a reconnect too. Before, that refusal turned it
    into "polling every 2 s", which the page does not do with a refused key."""
    browser.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": SOCKETS_KEPT_JS})
    open_terminal(browser, platform)
    browser.execute_script("localStorage.setItem('shardex.apiKey', 'not-a-key-of-this-platform');"
                           "localStorage.setItem('shardex.accountId', 'acc_gone');")
    browser.refresh()
    banner = by_id(browser, "error-banner")
    wait_until(browser, lambda d: banner.is_displayed()
               and banner.get_attribute("data-code") == "UNAUTHORIZED", "the refused key's error")
    status = by_id(browser, "ws-status")
    wait_until(browser, lambda d: status.get_attribute("data-state") == "open",
               "the live connection")
    browser.execute_script("window.__sockets.at(-1).close();")  # the connection drops
    wait_until(browser, lambda d: d.execute_script("return window.__sockets.length;") == 2
               and status.get_attribute("data-state") == "open", "the page connected again")
    time.sleep(2.0)  # its AUTH answered, and a poll would have come
    # to copy or log out
    assert text_of(browser, "api-key") == masked("not-a-key-of-this-platform")
    assert text_of(browser, "account-stream") == \
        "this key was refused: log out or use another key"
    assert by_id(browser, "account-stream").get_attribute("data-state") == "down"

    # a pasted key with an invisible character copied along (a zero-width space) is said not
    # to be a key; the browser cannot send it in a header, which the page took for a server
    # that did not answer (NETWORK_ERROR)
    by_id(browser, "logout").click()
    answer_logout(browser, accept=True)
    fill(browser, "key-input", "not\u200ba-key")
    by_id(browser, "use-key").click()
    wait_until(browser, lambda d: banner.is_displayed()
               and banner.get_attribute("data-code") == "UNAUTHORIZED"
               and "not an API key" in text_of(d, "error-message"), "the pasted key refused")
    assert by_id(browser, "logged-out").is_displayed()


def double_click_answered_between(driver: WebDriver, element: WebElement,
                                  answered: Any, what: str) -> None:
    """A double-click on ``element`` whose first click the API answered before the second
    came (a fast platform answers within a double-click's 100-300 ms): the second press is
    the browser's second click of a double-click (``detail`` 2)."""
    x, y = driver.execute_script(
        "arguments[0].scrollIntoView({block: 'center'});"
        "const r = arguments[0].getBoundingClientRect();"
        "return [r.left + r.width / 2, r.top + r.height / 2];", element)

    def press(count: int) -> None:
        for kind in ("mousePressed", "mouseReleased"):
            driver.execute_cdp_cmd("Input.dispatchMouseEvent", {
                "type": kind, "x": x, "y": y, "button": "left", "clickCount": count})

    press(1)
    wait_until(driver, answered, what)
    press(2)


def test_a_double_click_on_long_or_close_trades_once(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """A double-click on Long opens one position, and on a row's Close with a quantity typed
    closes that quantity once, even when the first click's answer came before the second
    click. Before, the button was enabled again by then: the second click opened a second
    position, and closed all the rest of the first (its quantity field emptied by the first
    close)."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform)
    key = create_account(browser)
    fill(browser, "ticket-margin", "100")
    fill(browser, "ticket-leverage", "10")
    double_click_answered_between(
        browser, by_id(browser, "submit-long"),
        lambda d: text_of(d, "notice-text").startswith("Opened long")
        and by_id(d, "submit-long").is_enabled(), "the answer to the first click")
    position_id = wait_position_row(browser, "SOL", "long")
    time.sleep(1.0)  # a second open would be under way
    assert [p["positionId"] for p in account(http, key)["positions"]] == [position_id]
    wait_until(browser, lambda d: text_of(d, "balance-margin") == "100.00", "the margin in use")
    assert len(position_rows(browser)) == 1

    opened = api_position(http, key, position_id)
    assert opened is not None
    type_into(row_control(browser, "close-quantity", position_id), "3.33")
    double_click_answered_between(
        browser, row_control(browser, "close-position", position_id),
        lambda d: text_of(d, "notice-text").startswith("Closed part of position"),
        "the answer to the first click")
    time.sleep(1.0)  # a second close would be under way
    rest = api_position(http, key, position_id)
    assert rest is not None, "the rest of the position was closed too"
    assert D(rest["quantity"]) == D(opened["quantity"]) - D("3.33")
    history = http.get("/api/v1/positions/history",
                       headers={"Authorization": f"Bearer {key}"}).json()["positions"]
    assert [c["partial"] for c in history] == [True]
    wait_row_shows(browser, position_id, rest)
    assert not by_id(browser, "error-banner").is_displayed()


# ------------------------------------------------------------------ a network that hangs


def test_a_read_never_answered_is_given_up_and_the_refreshes_go_on(
        platform: RayHttpPlatform, relay: Relay, browser: WebDriver, http: httpx.Client,
        page_clock: PageClock) -> None:
    """The answer of a GET /state never comes back (the network hangs): after 10 s the page
    gives it up and says so, as it says any failed read, and its refreshes go on: a position
    opened meanwhile by another client of the account shows, and the error goes. Before, the
    page waited for that answer for good, and read the account never again."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform, relay)
    key = create_account(browser)
    browser.execute_script(BANNERS_KEPT_JS)
    relay.hold("GET", "/api/v1/state")
    wait_until(browser, lambda d: relay.withheld == 1, "a GET /state whose answer is held")
    r = http.post("/api/v1/positions/open", headers={"Authorization": f"Bearer {key}"},
                  json={"asset": "SOL", "type": "long", "margin": "100", "leverage": 10})
    assert r.status_code == 201, r.text
    assert wait_position_row(browser, "SOL", "long") == r.json()["positionId"]
    assert "TIMEOUT" in browser.execute_script("return window.__banners;")
    wait_until(browser, lambda d: not by_id(d, "error-banner").is_displayed(),
               "the error gone once a read is answered")


def test_an_open_never_answered_is_not_sent_again_and_its_outcome_is_said_unknown(
        platform: RayHttpPlatform, relay: Relay, browser: WebDriver, http: httpx.Client,
        page_clock: PageClock) -> None:
    """The open reaches the platform and is taken, but its answer never comes back: after 20 s
    the page gives it up without sending it again (it may have been taken, as here), says its
    outcome is unknown and its clientOrderId, and reads the account, which shows the position.
    Before, the Long button stayed busy for good."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform, relay)
    key = create_account(browser)
    relay.hold("POST", "/api/v1/positions/open")
    open_long_from_ticket(browser, "100", "10")
    position_id = wait_position_row(browser, "SOL", "long")
    banner = by_id(browser, "error-banner")
    wait_until(browser, lambda d: banner.is_displayed()
               and banner.get_attribute("data-code") == "TIMEOUT", "the open given up")
    message = text_of(browser, "error-message")
    assert "outcome is unknown" in message and "Not sent again (clientOrderId web-" in message
    wait_until(browser, lambda d: by_id(d, "submit-long").is_enabled(), "the Long button")
    assert relay.requests.count("POST /api/v1/positions/open") == 1
    assert [p["positionId"] for p in account(http, key)["positions"]] == [position_id]
    assert banner.get_attribute("data-code") == "TIMEOUT"  # a refresh does not hide it


def prices_answered(driver: WebDriver) -> int:
    """How many answers of GET /api/v1/prices the page has had."""
    return int(driver.execute_script(
        "return performance.getEntriesByType('resource')"
        ".filter(e => e.name.includes('/api/v1/prices')).length;"))


def test_a_partial_close_made_elsewhere_is_listed_while_the_page_polls_the_account(
        platform: RayHttpPlatform, relay: Relay, browser: WebDriver, http: httpx.Client) -> None:
    """Without the WebSocket the page polls the account. A partial close made elsewhere (another
    device, the API) leaves the same positions open, yet the part shows in the closed positions
    beside the rest's quantity. Before, the poll read the history again only when a position or
    order came or went, and the part stayed missing from it."""
    relay.refuse_sockets(True)
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform, via=relay)
    key = create_account(browser)
    assert by_id(browser, "account-stream").get_attribute("data-state") == "down"
    open_long_from_ticket(browser, "100", "10")
    position_id = wait_position_row(browser, "SOL", "long")
    time.sleep(2.5)  # a poll that found the position, and nothing new, came

    r = http.post("/api/v1/positions/close", headers={"Authorization": f"Bearer {key}"},
                  json={"positionId": position_id, "quantity": "1"})
    assert r.status_code == 200, r.text
    assert r.json()["partial"] is True
    row = wait_until(browser, lambda d: next(iter(d.find_elements(
        By.CSS_SELECTOR, f'tr[data-testid="closed-row"][data-close-id="{r.json()["closeId"]}"]')),
        None), "the partial close in the closed positions")
    assert row.get_attribute("data-partial") == "true"
    assert row.find_element(By.CSS_SELECTOR, 'td[data-field="quantity"]').text == "1.00partial"
    quantity = browser.find_element(
        By.CSS_SELECTOR, f'tr[data-position-id="{position_id}"] td[data-field="quantity"]')
    assert quantity.text == "8.99"


def test_a_price_poll_answered_after_a_newer_streamed_price_does_not_replace_it(
        platform: RayHttpPlatform, relay: Relay, browser: WebDriver, http: httpx.Client) -> None:
    """While the WebSocket is down the page polls GET /prices; one poll's answer is held on
    the way, the socket comes back with a newer price, and then the poll's older price arrives:
    the quote keeps the newer one. Before, it showed the older price until the next tick."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform, relay)
    wait_until(browser, lambda d: text_of(d, "bid") == "100.00", "the first quote")
    relay.refuse_sockets(True)
    relay.hold("GET", "/api/v1/prices")
    wait_until(browser, lambda d: relay.withheld == 1, "a price poll whose answer is held")
    tick(platform, http, "SOL", "100.20", "100.21")
    relay.refuse_sockets(False)
    wait_until(browser, lambda d: text_of(d, "bid") == "100.20"
               and by_id(d, "ws-status").get_attribute("data-state") == "open",
               "the newer price streamed once the socket is back")
    answered = prices_answered(browser)
    relay.release()
    wait_until(browser, lambda d: prices_answered(d) > answered, "the held poll's answer")
    for _ in range(10):
        assert (text_of(browser, "bid"), text_of(browser, "ask")) == ("100.20", "100.21")
        time.sleep(0.1)


def test_a_handshake_never_answered_is_given_up_and_made_again(
        platform: RayHttpPlatform, relay: Relay, browser: WebDriver, http: httpx.Client,
        page_clock: PageClock) -> None:
    """The page's first WebSocket handshake reaches the platform but its answer never comes
    back: the page polls prices meanwhile, gives the handshake up after 10 s, makes a new one,
    and streams again. Before, it stayed connecting for good, on polled prices."""
    tick(platform, http, "SOL", "100.00", "100.01")
    relay.hold("GET", "/ws")
    open_terminal(browser, platform, relay)
    status = by_id(browser, "ws-status")
    wait_until(browser, lambda d: text_of(d, "bid") == "100.00", "the polled quote")
    assert len(relay.sockets) == 1 and status.get_attribute("data-state") == "connecting"
    wait_until(browser, lambda d: status.get_attribute("data-state") == "open",
               "a new handshake once the first is given up")
    assert len(relay.sockets) == 2
    tick(platform, http, "SOL", "100.30", "100.31")
    wait_until(browser, lambda d: text_of(d, "bid") == "100.30", "the streamed quote")


def test_a_live_connection_gone_silent_is_dropped_and_opened_again(
        platform: RayHttpPlatform, relay: Relay, browser: WebDriver, http: httpx.Client,
        page_clock: PageClock) -> None:
    """A connection quiet for 15 s (no price) is pinged, answers, and is kept (no error shown).
    Then the network drops without a word (half-open: no close ever comes, nothing arrives):
    the next ping gets no answer within 5 s, the page connects again and the quote moves on.
    Before, the page stayed "live" with the last quote for good."""
    tick(platform, http, "SOL", "100.00", "100.01")
    open_terminal(browser, platform, relay)
    status = by_id(browser, "ws-status")
    wait_until(browser, lambda d: text_of(d, "bid") == "100.00"
               and status.get_attribute("data-state") == "open", "the first streamed quote")
    [socket] = relay.sockets
    wait_until(browser, lambda d: '{"method":"PING"}' in socket.texts,
               "a ping on the quiet connection")
    page_clock.sleep(7)  # its answer came: no reconnect after 5 s
    assert len(relay.sockets) == 1 and status.get_attribute("data-state") == "open"
    assert not by_id(browser, "error-banner").is_displayed()

    relay.silence_sockets()
    tick(platform, http, "SOL", "100.30", "100.31")
    wait_until(browser, lambda d: text_of(d, "bid") == "100.30", "the quote after a reconnect")
    assert len(relay.sockets) == 2 and status.get_attribute("data-state") == "open"


def test_a_tab_past_the_keys_live_connections_polls_without_an_error(
        platform: RayHttpPlatform, browser: WebDriver, http: httpx.Client) -> None:
    """Every live connection a key may hold is taken (other tabs, other devices): one more
    tab's account panel polls, says so, and shows no error; its positions are listed. Before,
    the server's refusal stayed on the page as an error banner."""
    key, position_id = open_long_on_a_new_page(platform, browser, http)
    url = platform.base_url.replace("http://", "ws://") + "/ws"
    with contextlib.ExitStack() as others:
        # the page holds one; the rest from another address (each address has a limit too)
        for _ in range(platform.settings.ws_connections - 1):
            ws = others.enter_context(
                ws_connect(url, open_timeout=10, source_address=("127.0.0.2", 0)))
            ws.send(json.dumps({"method": "AUTH", "params": [key]}))
            ws.send(json.dumps({"method": "MARK"}))  # answered with an error: AUTH was read
            assert "error" in json.loads(ws.recv(timeout=10))
        browser.switch_to.new_window("tab")
        open_terminal(browser, platform)  # the key is kept in the browser: logged in
        stream = by_id(browser, "account-stream")
        wait_until(browser, lambda d: stream.get_attribute("data-state") == "down",
                   "the account panel polling")
        wait_position_row(browser, "SOL", "long")
        time.sleep(2.0)  # a poll came
        assert text_of(browser, "account-stream") == "polling every 2 s"
        assert not by_id(browser, "error-banner").is_displayed()
        assert [r.get_attribute("data-position-id") for r in position_rows(browser)] == \
            [position_id]
