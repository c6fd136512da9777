"""SPEC "Limits": GET /api/v1/state lists the first STATE_POSITIONS open positions and says when
there are more; GET /api/v1/positions pages through all of them with a cursor."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from cluster.config import Settings
from tests.e2e.api_client import error_code
from tests.e2e.api_client import open_position
from tests.e2e.api_client import sol_trader
from tests.e2e.api_client import state
from tests.e2e.http_platform import LocalHttpPlatform

SHOWN = 2


@pytest.fixture(scope="module")
def few_in_state() -> Iterator[LocalHttpPlatform]:
    with LocalHttpPlatform(Settings(api_key_rate_per_s=0, signups_per_min=0,
                                    state_positions=SHOWN)) as p:
        yield p


@pytest.fixture
def client(few_in_state: LocalHttpPlatform) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=few_in_state.base_url, timeout=10) as c:
        yield c


def test_state_lists_the_first_positions_and_the_rest_are_paged(
        few_in_state: LocalHttpPlatform, client: httpx.Client) -> None:
    h = sol_trader(few_in_state, client)
    opened = [open_position(client, h, asset="SOL", type="long", margin="10", leverage=2)
              for _ in range(5)]
    ids = [p["positionId"] for p in opened]
    s = state(client, h)
    assert [p["positionId"] for p in s["positions"]] == ids[:SHOWN]
    assert s["morePositions"] is True
    # equity counts every position, not only the ones listed
    assert s["balances"]["margin"] == "50.000000"
    pages: list[list[str]] = []
    cursor: str | None = None
    while True:
        params = {"limit": 2} if cursor is None else {"limit": 2, "cursor": cursor}
        r = client.get("/api/v1/positions", params=params, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        pages.append([p["positionId"] for p in body["positions"]])
        cursor = body["next"]
        if cursor is None:
            break
    assert pages == [ids[0:2], ids[2:4], ids[4:5]]
    # one page for all, no cursor after the last
    r = client.get("/api/v1/positions", params={"limit": 500}, headers=h)
    assert [p["positionId"] for p in r.json()["positions"]] == ids and r.json()["next"] is None


def test_paging_goes_on_when_the_last_position_of_a_page_closes(
        few_in_state: LocalHttpPlatform, client: httpx.Client) -> None:
    """The cursor names where a page ended, not a position that must still be open (a close,
    or a TP/SL or liquidation, between two pages made the next one a 422)."""
    h = sol_trader(few_in_state, client)
    ids = [open_position(client, h, asset="SOL", type="long", margin="10", leverage=2)
           ["positionId"] for _ in range(5)]
    first = client.get("/api/v1/positions", params={"limit": 2}, headers=h).json()
    assert [p["positionId"] for p in first["positions"]] == ids[:2]
    for closing in ids[1:3]:  # the page's last position, and the next page's first
        r = client.post("/api/v1/positions/close", json={"positionId": closing}, headers=h)
        assert r.status_code == 200, r.text
    r = client.get("/api/v1/positions", params={"limit": 2, "cursor": first["next"]}, headers=h)
    assert r.status_code == 200, r.text
    assert [p["positionId"] for p in r.json()["positions"]] == ids[3:5]
    assert r.json()["next"] is None
    # a positionId of an open position is a cursor too, as before
    r = client.get("/api/v1/positions", params={"cursor": ids[0]}, headers=h)
    assert [p["positionId"] for p in r.json()["positions"]] == ids[3:5]


def test_an_account_within_the_bound_says_there_is_no_more(
        few_in_state: LocalHttpPlatform, client: httpx.Client) -> None:
    h = sol_trader(few_in_state, client)
    open_position(client, h, asset="SOL", type="long", margin="10", leverage=2)
    s = state(client, h)
    assert len(s["positions"]) == 1 and s["morePositions"] is False
    # at the bound: all listed, none more; one past it: more
    open_position(client, h, asset="SOL", type="long", margin="10", leverage=2)
    s = state(client, h)
    assert len(s["positions"]) == SHOWN and s["morePositions"] is False
    open_position(client, h, asset="SOL", type="long", margin="10", leverage=2)
    s = state(client, h)
    assert len(s["positions"]) == SHOWN and s["morePositions"] is True


@pytest.mark.parametrize(("params", "status"), [
    ({"cursor": "123"}, 422),           # a position id that is not one of yours (or not open)
    ({"cursor": "abc"}, 422),           # not a position id
    ({"cursor": "1-2-3"}, 422), ({"cursor": "-5"}, 422),  # not a page's end either
    ({"limit": 0}, 422), ({"limit": 501}, 422),
])
def test_bad_paging_parameters_are_refused(few_in_state: LocalHttpPlatform,
                                           client: httpx.Client, params: dict[str, object],
                                           status: int) -> None:
    h = sol_trader(few_in_state, client)
    r = client.get("/api/v1/positions", params=params, headers=h)
    assert r.status_code == status and error_code(r) == "INVALID_REQUEST", r.text


def test_positions_need_a_key(client: httpx.Client) -> None:
    r = client.get("/api/v1/positions")
    assert r.status_code == 401 and error_code(r) == "UNAUTHORIZED"
