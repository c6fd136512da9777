"""The fast sweep (sorted trigger indexes) against the Fraction reference and the naive full
sweep, on random books and ticks, through slot reuse, merges and compactions."""

from __future__ import annotations

from typing import Any

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from engine import reference
from engine.assets import DEFAULT_ASSETS, Asset
from engine.book import PositionBook
from engine.orders import CloseReason, OpenPlan, Side, plan_open
from engine.results import Rejected
from engine.triggers import naive_sweep
from tests.unit.engine.book_checks import assert_same_but_id, checked_sweep

ASSETS = [*DEFAULT_ASSETS.assets,
          Asset("FINE", "FINE_USDC", price_decimals=4, qty_decimals=4, max_leverage=100)]
SETTINGS = settings(max_examples=150, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])


class Pair:
    """A fast book and a reference book driven in lockstep; ids mapped fast -> reference."""

    def __init__(self, asset: Asset, book_tag: int, min_pending: int, min_dead: int) -> None:
        self.asset = asset
        self.fast = PositionBook(asset, book_tag, capacity=1, min_pending=min_pending,
                                 min_dead=min_dead)
        self.ref = reference.ReferenceBook(asset)
        self.to_ref: dict[int, int] = {}
        self.issued: set[int] = set()

    def open(self, owner: int, plan: OpenPlan) -> None:
        fid = self.fast.open(owner, plan, 7)
        assert fid not in self.issued, "a position id was issued twice"
        self.issued.add(fid)
        self.to_ref[fid] = self.ref.open(owner, plan, 7)

    def close(self, fid: int) -> None:
        got = self.fast.close(fid)
        want = self.ref.close(self.to_ref.pop(fid))
        assert_same_but_id(got, want, "position_id")
        assert self.fast.get(fid) is None and self.fast.close(fid) is None

    def sweep(self, bid: int, ask: int) -> list[int]:
        ids, reasons = checked_sweep(self.fast, naive_sweep, bid, ask)
        fast = {self.to_ref[int(i)]: CloseReason(int(r)) for i, r in zip(ids, reasons,
                                                                          strict=True)}
        assert fast == dict(self.ref.sweep(bid, ask))
        return [int(i) for i in ids]


@st.composite
def open_request(draw: Any, asset: Asset, mid: int) -> tuple[Any, ...]:
    side = draw(st.sampled_from([Side.LONG, Side.SHORT]))
    leverage = draw(st.integers(1, asset.max_leverage))
    margin = draw(st.integers(1, 10**10))
    bid = max(1, mid + draw(st.integers(-mid // 5, mid // 5)))
    ask = bid + draw(st.integers(0, 3))
    ppm = draw(st.sampled_from([0, 0, 0, 1, 5_000, 20_000]))
    return side, leverage, margin, bid, ask, ppm


def levels(draw: Any, plan: OpenPlan) -> tuple[int | None, int | None]:
    """TP/SL near the interesting boundaries (some invalid on purpose)."""
    entry, liq = plan.entry_ticks, plan.liq_ticks
    lo, hi = min(entry, liq), max(entry, liq)
    pick = st.one_of(st.none(), st.integers(max(1, lo - 2), hi + 2),
                     st.integers(max(1, entry - 3), entry + 3),
                     st.integers(1, 3 * entry + 3))
    return draw(pick), draw(pick)


def tick(draw: Any, mid: int, pair: Pair | None = None) -> tuple[int, int]:
    """A top of book: anywhere, near the mid, or (often) right at an open position's level, so
    the exact boundaries are exercised on both sides."""
    spread = draw(st.integers(0, 5))
    levels = []
    if pair is not None:
        for p in pair.ref.positions.values():
            levels += [lv for lv in (p.liq_ticks, p.tp_ticks, p.sl_ticks) if lv > 0]
    if levels and draw(st.integers(0, 2)):
        level = draw(st.sampled_from(sorted(levels))) + draw(st.integers(-1, 1))
        if draw(st.booleans()):  # put the ask, not the bid, on the level
            return max(1, level - spread), max(1, level)
        return max(1, level), max(1, level) + spread
    bid = draw(st.one_of(st.integers(max(1, mid - mid // 4), mid + mid // 4),
                         st.integers(1, 3 * mid)))
    return bid, bid + spread


@SETTINGS
@given(st.data())
def test_fast_sweep_equals_reference_and_naive(data: st.DataObject) -> None:
    draw = data.draw
    asset = draw(st.sampled_from(ASSETS))
    mid = draw(st.integers(50, 10**7))
    pair = Pair(asset, draw(st.integers(0, 255)), draw(st.integers(1, 6)),
                draw(st.integers(1, 6)))
    for _ in range(draw(st.integers(1, 60))):
        action = draw(st.sampled_from(["open", "open", "open", "close", "tick"]))
        if action == "open":
            side, leverage, margin, bid, ask, ppm = draw(open_request(asset, mid))
            base = plan_open(asset, side, margin, leverage, bid, ask, None, None, ppm)
            ref_base = reference.plan_open(asset, side, margin, leverage, bid, ask, None, None,
                                           ppm)
            assert type(base) is type(ref_base)
            if isinstance(base, Rejected):
                assert isinstance(ref_base, Rejected) and base.code == ref_base.code
                continue
            assert base == ref_base
            tp, sl = levels(draw, base)
            plan = plan_open(asset, side, margin, leverage, bid, ask, tp, sl, ppm)
            ref_plan = reference.plan_open(asset, side, margin, leverage, bid, ask, tp, sl, ppm)
            if isinstance(plan, Rejected):
                assert isinstance(ref_plan, Rejected) and plan.code == ref_plan.code
                continue
            assert plan == ref_plan
            pair.open(draw(st.integers(0, 5)), plan)
        elif action == "close" and pair.to_ref:
            pair.close(draw(st.sampled_from(sorted(pair.to_ref))))
        elif action == "tick":
            bid, ask = tick(draw, mid, pair)
            hit = pair.sweep(bid, ask)
            if draw(st.booleans()):  # the shard closes what triggered (usually)
                for fid in hit:
                    pair.close(fid)
    assert pair.fast.check() == []
    assert pair.fast.open_margin_by_owner() == pair.ref.open_margin_by_owner()
    restored = PositionBook.from_arrays(asset, pair.fast.book_tag, pair.fast.to_arrays())
    assert restored.check() == []
    bid, ask = tick(draw, mid, pair)
    for book in (pair.fast, restored):
        ids, reasons = book.sweep(bid, ask)
        want = dict(pair.ref.sweep(bid, ask))
        assert {pair.to_ref[int(i)]: CloseReason(int(r)) for i, r in zip(ids, reasons,
                                                                         strict=True)} == want


@SETTINGS
@given(st.data())
def test_sweep_after_churn_in_a_bulk_loaded_book(data: st.DataObject) -> None:
    """A book loaded with open_many, then heavy close/reopen churn (rows reused many times,
    pending merges and compactions), still sweeps exactly like the naive sweep."""
    draw = data.draw
    asset = DEFAULT_ASSETS["SOL"]
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    book = PositionBook(asset, 9, capacity=8, min_pending=draw(st.integers(1, 8)),
                        min_dead=draw(st.integers(1, 8)))
    live: list[int] = []
    for _round in range(draw(st.integers(1, 6))):
        n = int(rng.integers(1, 60))
        requests = [plan_open(asset, Side(int(rng.integers(0, 2))), int(rng.integers(1, 10**9)),
                              int(rng.integers(1, 101)), int(b), int(b) + 1, None, None)
                    for b in rng.integers(9_000, 11_000, n)]
        plans = [p for p in requests if isinstance(p, OpenPlan)]
        if draw(st.booleans()):
            cols = {f: np.array([getattr(p, f) for p in plans], dtype=np.int64)
                    for f in ("side", "entry_ticks", "qty_steps", "margin_micros", "leverage",
                              "liq_ticks", "tp_ticks", "sl_ticks")}
            live += book.open_many(np.arange(len(plans)), cols, 5).tolist()
        else:
            live += [book.open(1, p, 5) for p in plans]
        rng.shuffle(live)
        for _ in range(int(rng.integers(0, len(live) + 1))):
            assert book.close(live.pop()) is not None
        bid = int(rng.integers(8_000, 12_000))
        fast = book.sweep(bid, bid + 1)
        naive = naive_sweep(book, bid, bid + 1)
        assert np.array_equal(fast[0], naive[0]) and np.array_equal(fast[1], naive[1])
        for pid in fast[0].tolist():
            book.close(pid)
            live.remove(pid)
        assert book.check() == []
    assert sorted(live) == book.ids().tolist()
