"""The double-entry ledger: balanced transfers, refused overdrafts, audits, snapshots; and the
property that any sequence of opens, ticks and closes keeps it exact (fast and reference)."""

from __future__ import annotations

from typing import Any

import pytest
from engine.assets import DEFAULT_ASSETS
from engine.ledger import FUNDING
from engine.ledger import HOUSE
from engine.ledger import INSURANCE
from engine.ledger import SUM
from engine.ledger import Ledger
from engine.ledger import LedgerError
from engine.ledger import free_account
from engine.ledger import margin_account
from engine.ledger import parse_account
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from engine.settlement import Settlement
from engine.settlement import exit_price_ticks
from engine_impls import IMPLS
from engine_impls import Impl
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.engine.draws import buying_margins

USD = 1_000_000


def funded(*users: int, usd: int = 1_000) -> Ledger:
    ledger = Ledger()
    for user in users:
        ledger.open_user(user, usd * USD)
    return ledger


def test_deposit_comes_from_funding() -> None:
    ledger = funded(1, 2)
    assert ledger.balance(FUNDING) == -2_000 * USD
    assert ledger.free_micros(1) == ledger.balance(free_account(1)) == 1_000 * USD
    assert ledger.margin_micros(1) == ledger.balance(margin_account(2)) == 0
    assert ledger.total_micros() == 0
    assert ledger.audit({}) == []
    assert ledger.accounts() == {FUNDING: -2_000 * USD, HOUSE: 0, INSURANCE: 0,
                                 "user:1:free": 1_000 * USD, "user:1:margin": 0,
                                 "user:2:free": 1_000 * USD, "user:2:margin": 0}


def test_overdraft_is_refused_and_changes_nothing() -> None:
    ledger = funded(1, usd=100)
    before = ledger.accounts()
    result = ledger.lock_margin(1, 100 * USD + 1)
    assert result == Rejected(Code.INSUFFICIENT_BALANCE, "insufficient free balance: "
                              "100.000001 USD asked, 100.000000 USD free")  # what would do
    assert ledger.accounts() == before
    assert ledger.lock_margin(1, 100 * USD) is None
    assert (ledger.free_micros(1), ledger.margin_micros(1)) == (0, 100 * USD)
    refused = ledger.lock_margin(1, 1)
    assert isinstance(refused, Rejected) and refused.code == Code.INSUFFICIENT_BALANCE
    unknown = ledger.lock_margin(99, 1)
    assert isinstance(unknown, Rejected) and unknown.code == Code.NOT_FOUND


def test_release_undoes_a_lock() -> None:
    ledger = funded(1)
    assert ledger.lock_margin(1, 250 * USD) is None
    ledger.release_margin(1, 250 * USD)
    assert (ledger.free_micros(1), ledger.margin_micros(1)) == (1_000 * USD, 0)
    with pytest.raises(LedgerError):
        ledger.release_margin(1, 1)


def test_settle_moves_exactly_the_spec_amounts() -> None:
    ledger = funded(1)
    assert ledger.lock_margin(1, 100 * USD) is None
    # a gapped liquidation: pnl -150 on margin 100, the fund absorbs 50
    ledger.settle(1, 100 * USD, Settlement(-150 * USD, 0, 150 * USD, -50 * USD))
    assert ledger.free_micros(1) == 900 * USD and ledger.margin_micros(1) == 0
    assert ledger.balance(HOUSE) == 150 * USD and ledger.balance(INSURANCE) == -50 * USD
    assert ledger.total_micros() == 0 and ledger.audit({}) == []


@pytest.mark.parametrize("bad", [
    Settlement(10, 100, -10, 1),  # does not add up to the margin
    Settlement(-150, -50, 150, 0),  # negative payout
])
def test_unbalanced_settlement_raises_and_changes_nothing(bad: Settlement) -> None:
    ledger = funded(1)
    assert ledger.lock_margin(1, 100) is None
    before = ledger.accounts()
    with pytest.raises(LedgerError):
        ledger.settle(1, 100, bad)
    assert ledger.accounts() == before


def test_settling_more_margin_than_locked_raises() -> None:
    ledger = funded(1)
    assert ledger.lock_margin(1, 100) is None
    with pytest.raises(LedgerError):
        ledger.settle(1, 101, Settlement(0, 101, 0, 0))
    with pytest.raises(LedgerError):
        ledger.settle(7, 1, Settlement(0, 1, 0, 0))


def test_negative_amounts_raise() -> None:
    ledger = funded(1)
    with pytest.raises(LedgerError):
        ledger.lock_margin(1, -1)
    with pytest.raises(LedgerError):
        ledger.open_user(2, -5)
    with pytest.raises(LedgerError):
        ledger.open_user(-1, 5)


def test_audit_reports_margin_mismatches_and_a_nonzero_sum() -> None:
    ledger = funded(1, 2)
    assert ledger.lock_margin(1, 30 * USD) is None
    assert ledger.audit({1: 30 * USD}) == []
    problems = ledger.audit({1: 20 * USD, 3: 5})
    assert any("user:1:margin" in p.text for p in problems)
    assert any("user 3" in p.text for p in problems)
    assert [p.subject for p in problems] == [margin_account(1), margin_account(3)]
    # a broken sum and a negative free balance, which no operation of the ledger can make
    # (it raises first), set in its private dicts
    ledger._system[HOUSE] += 7
    ledger._free[2] = -ledger._free[2]
    assert [p.subject for p in ledger.audit({1: 30 * USD})] == [SUM, free_account(2)]
    total = 7 - 2 * 1_000 * USD  # user 2's 1,000 USD counted negative instead
    assert [p.text for p in ledger.audit({1: 30 * USD})] == [
        f"accounts sum to {total} micros, expected 0",
        f"{free_account(2)} is negative: {-1_000 * USD}"]
    state = ledger.to_state()
    state["accounts"][HOUSE] = 1
    with pytest.raises(LedgerError):
        Ledger.from_state(state)


def test_state_round_trip() -> None:
    ledger = funded(3, 1)
    assert ledger.lock_margin(3, 7) is None
    ledger.settle(3, 7, Settlement(-2, 5, 2, 0))
    copy = Ledger.from_state(ledger.to_state())
    assert copy.accounts() == ledger.accounts()
    with pytest.raises(LedgerError):
        Ledger.from_state({"version": 99, "accounts": {}})
    with pytest.raises(LedgerError):
        Ledger.from_state({"version": 1, "accounts": {"user:x:free": 0}})


def test_a_state_with_a_negative_margin_balance_is_refused() -> None:
    """No operation leaves a margin account below 0 (a release or settlement of more than is
    locked raises first), so a state holding one, though it sums to 0, is not a ledger's."""
    ledger = funded(1)
    state = ledger.to_state()
    state["accounts"][free_account(1)] += 5
    state["accounts"][margin_account(1)] = -5
    with pytest.raises(LedgerError, match="negative margin"):
        Ledger.from_state(state)


BAD_ACCOUNT_NAMES = ("user:1:other", "bank", "user::free", "user:-1:free", "user:1:free:x",
                     "user:1", "user:x:margin", "User:1:free", "")


def test_account_names() -> None:
    assert parse_account("user:12:margin") == ("margin", 12)
    assert parse_account(HOUSE) == (HOUSE, None)
    for bad in BAD_ACCOUNT_NAMES:
        with pytest.raises(ValueError):
            parse_account(bad)


def test_a_state_is_read_with_the_account_names_parse_account_reads() -> None:
    """from_state reads the names parse_account reads: the same names pass, with the same
    users and kinds, and the same fail."""
    ledger = funded(3, 1)
    assert ledger.lock_margin(3, 7) is None
    state = ledger.to_state()
    copy = Ledger.from_state(state)
    for name, micros in state["accounts"].items():
        kind, user = parse_account(name)
        if user is None:
            assert copy._system[kind] == micros
        else:
            assert (copy._free if kind == "free" else copy._margin)[user] == micros
    for bad in BAD_ACCOUNT_NAMES:
        with pytest.raises(LedgerError, match="not a ledger account"):
            Ledger.from_state({"version": 1, "accounts": {**state["accounts"], bad: 0}})
    for value in (True, 1.0, "1", None):
        with pytest.raises(LedgerError, match="not an int"):
            Ledger.from_state({"version": 1, "accounts": {**state["accounts"],
                                                          free_account(9): value}})


ASSET = DEFAULT_ASSETS["SOL"]


@pytest.mark.parametrize("impl", IMPLS, ids=lambda i: i.name)
@settings(max_examples=120, deadline=None)
@given(data=st.data())
def test_any_sequence_keeps_the_ledger_exact(impl: Impl, data: st.DataObject) -> None:
    """Random opens (some overdrawing), ticks (closing what triggers) and manual closes: the
    ledger always sums to 0, no free balance goes negative, margins equal open margins."""
    draw: Any = data.draw
    ledger = Ledger()
    users = list(range(draw(st.integers(1, 4))))
    for user in users:
        ledger.open_user(user, draw(st.integers(0, 2_000 * USD)))
    book = impl.new_book(ASSET)
    price = draw(st.integers(5_000, 20_000))
    bid, ask = price, price + 1

    def close(pid: int, reason: CloseReason) -> None:
        record = book.close(pid)
        assert record is not None
        exit_ticks = exit_price_ticks(record.side, bid, ask)
        s = impl.settle(ASSET, record.side, record.entry_ticks, record.qty_steps,
                        record.margin_micros, exit_ticks, reason)
        assert s.payout_micros >= 0
        assert s.payout_micros + s.house_micros + s.insurance_micros == record.margin_micros
        ledger.settle(record.owner, record.margin_micros, s)

    for _ in range(draw(st.integers(1, 40))):
        action = draw(st.sampled_from(["open", "open", "tick", "close"]))
        if action == "open":
            user = draw(st.sampled_from(users))
            side = draw(st.sampled_from([Side.LONG, Side.SHORT]))
            leverage = draw(st.integers(1, 100))
            # a margin (up to 800 USD) that buys a quantity: most of a plain draw bought none
            # and was refused before the ledger saw it
            margin = draw(buying_margins(ASSET, leverage, ask if side == Side.LONG else bid,
                                         1, 800 * USD))
            plan = impl.plan_open(ASSET, side, margin, leverage, bid, ask, None, None,
                                  draw(st.sampled_from([0, 10_000])))
            if not isinstance(plan, OpenPlan):
                continue
            before = ledger.accounts()
            refused = ledger.lock_margin(user, margin)
            if refused is not None:
                assert refused.code == Code.INSUFFICIENT_BALANCE and ledger.free_micros(user) \
                    < margin and ledger.accounts() == before
                continue
            book.open(user, plan, 0)
        elif action == "tick":
            price = max(1, price + draw(st.integers(-3_000, 3_000)))
            bid, ask = price, price + draw(st.integers(0, 3))
            for pid, reason in impl.sweep(book, bid, ask):
                close(pid, reason)
        elif action == "close":
            open_ids = sorted(book.positions) if hasattr(book, "positions") \
                else book.ids().tolist()
            if open_ids:
                close(draw(st.sampled_from(open_ids)), CloseReason.MANUAL)
        assert ledger.total_micros() == 0
        assert all(ledger.free_micros(u) >= 0 for u in users)
        assert ledger.audit(book.open_margin_by_owner()) == []
