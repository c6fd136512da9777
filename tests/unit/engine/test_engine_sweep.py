"""The fast sweep (sorted trigger indexes) against the Fraction reference and the naive full
sweep, on random books and ticks, through slot reuse, amends, merges and compactions."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from engine import reference
from engine.assets import DEFAULT_ASSETS
from engine.assets import Asset
from engine.book import PositionBook
from engine.orders import CloseReason
from engine.orders import OpenPlan
from engine.orders import Side
from engine.orders import liquidation_ticks
from engine.orders import plan_open
from engine.results import Rejected
from engine.triggers import naive_sweep
from hypothesis import HealthCheck
from hypothesis import example
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from tests.unit.engine.book_checks import assert_same_but_id
from tests.unit.engine.book_checks import checked_sweep
from tests.unit.engine.draws import magnitudes

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
        # levels amended away, by fast id: ticks there must not fire them, and amends back to
        # one find its old index entry perhaps still stored
        self.old_levels: dict[int, list[int]] = {}

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

    def amend(self, fid: int, changes: dict[str, int]) -> None:
        """Amend in both books: both refuse (and change nothing) or both give the same row."""
        before = self.fast.get(fid)
        assert before is not None
        try:
            got = self.fast.amend(fid, **changes)
        except ValueError:
            with pytest.raises(ValueError):
                self.ref.amend(self.to_ref[fid], **changes)
            assert self.fast.get(fid) == before
            return
        assert_same_but_id(got, self.ref.amend(self.to_ref[fid], **changes), "position_id")
        assert got is not None and got == self.fast.get(fid) and got.position_id == fid
        self.old_levels.setdefault(fid, []).extend(
            lv for lv in (before.liq_ticks, before.tp_ticks, before.sl_ticks) if lv > 0)

    def verify(self, bid: int, ask: int) -> None:
        """Fast, naive and reference sweeps agree at this tick, the book is sound, and a
        snapshot of it restores to the same arrays and the same sweep."""
        swept = self.sweep(bid, ask)
        assert self.fast.check() == []
        restored = PositionBook.from_arrays(self.asset, self.fast.book_tag,
                                            self.fast.to_arrays())
        assert restored.check() == []
        for name, array in self.fast.to_arrays().items():
            assert np.array_equal(restored.to_arrays()[name], array), name
        assert restored.sweep(bid, ask)[0].tolist() == swept

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
    # or within four decades of what buys the largest position at the mid (at a large mid,
    # amounts in 10**-(pd+qd) USD leave int64 when pd+qd > 6)
    top = max(1, asset.notional_micros(mid, asset.max_qty_steps) // leverage)
    margin = draw(st.one_of(st.integers(1, 10**10), magnitudes(max(1, top // 10**4), top)))
    bid = max(1, mid + draw(st.integers(-mid // 5, mid // 5)))
    ask = bid + draw(st.integers(0, 3))
    ppm = draw(st.sampled_from([0, 0, 0, 1, 5_000, 20_000]))
    return side, leverage, margin, bid, ask, ppm


def open_step(draw: Any, asset: Asset, mid: int, pair: Pair) -> bool:
    """Plan a random open in both planners (same answer), and open it in both books if it is
    accepted; whether it was."""
    side, leverage, margin, bid, ask, ppm = draw(open_request(asset, mid))
    base = plan_open(asset, side, margin, leverage, bid, ask, None, None, ppm)
    ref_base = reference.plan_open(asset, side, margin, leverage, bid, ask, None, None, ppm)
    assert type(base) is type(ref_base)
    if isinstance(base, Rejected):
        assert isinstance(ref_base, Rejected) and base.code == ref_base.code
        return False
    assert base == ref_base
    tp, sl = levels(draw, base)
    plan = plan_open(asset, side, margin, leverage, bid, ask, tp, sl, ppm)
    ref_plan = reference.plan_open(asset, side, margin, leverage, bid, ask, tp, sl, ppm)
    if isinstance(plan, Rejected):
        assert isinstance(ref_plan, Rejected) and plan.code == ref_plan.code
        return False
    assert plan == ref_plan
    pair.open(draw(st.integers(0, 5)), plan)
    return True


def near(lo: int, hi: int, entry: int, past: list[int]) -> st.SearchStrategy[int]:
    """A level within 3 ticks of ``lo``..``hi`` or of ``entry``, anywhere up to 3x entry, or
    one of the ``past`` levels."""
    return st.one_of(st.integers(max(1, lo - 3), hi + 3),
                     st.integers(max(1, entry - 3), entry + 3),
                     st.integers(1, 3 * entry + 3), st.sampled_from([*past, entry]))


def amend_request(draw: Any, asset: Asset, p: Any, past: list[int]) -> dict[str, int]:
    """A random change of an open position (a reference record) as a caller would make it: a
    new (or earlier, from ``past``) or removed TP or SL near the boundaries the book checks,
    or a new margin (added or removed) or the rest of a partial close, with the liquidation
    price recomputed (now and then off by one tick, or making the SL invalid, to be
    refused)."""
    stop = p.sl_ticks or p.liq_ticks
    kind = draw(st.sampled_from(["tp", "sl", "no_tp", "no_sl", "margin", "qty"]))
    if kind == "tp":
        return {"tp_ticks": draw(near(min(stop, p.entry_ticks), max(stop, p.entry_ticks),
                                      p.entry_ticks, past))}
    if kind == "sl":
        lo, hi = sorted((p.liq_ticks, p.tp_ticks or p.entry_ticks))
        return {"sl_ticks": draw(near(lo, hi, p.entry_ticks, past))}
    if kind in ("no_tp", "no_sl"):
        return {f"{kind[3:]}_ticks": 0}
    if kind == "margin":
        qty, margin = p.qty_steps, draw(st.integers(1, 3 * p.margin_micros))
        changes = {"margin_micros": margin}
    else:  # the rest of a partial close: the closed part takes its share of the margin
        qty = draw(st.integers(1, p.qty_steps))
        margin = p.margin_micros - p.margin_micros * (p.qty_steps - qty) // p.qty_steps
        changes = {"qty_steps": qty, "margin_micros": margin}
    liq = liquidation_ticks(asset, p.side, p.entry_ticks, qty, margin,
                            p.maintenance_margin_ppm)
    changes["liq_ticks"] = max(0, liq + draw(st.sampled_from([0, 0, 0, 0, 0, 1, -1])))
    return changes


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
        levels += [lv for old in pair.old_levels.values() for lv in old]
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


def draw_pair(draw: Any) -> tuple[Asset, int, Pair]:
    """An asset, a mid price (ticks; up to half the asset's largest price) and an empty pair of
    books with tiny merge and compaction thresholds."""
    asset = draw(st.sampled_from(ASSETS))
    pair = Pair(asset, draw(st.integers(0, 255)), draw(st.integers(1, 6)),
                draw(st.integers(1, 6)))
    return asset, draw(st.one_of(st.integers(50, 10**7),
                                 magnitudes(10**7, asset.max_price_ticks // 2))), pair


@SETTINGS
@given(st.data())
def test_fast_sweep_equals_reference_and_naive(data: st.DataObject) -> None:
    draw = data.draw
    asset, mid, pair = draw_pair(draw)
    for _ in range(draw(st.integers(1, 60))):
        action = draw(st.sampled_from(["open", "open", "open", "close", "tick"]))
        if action == "open":
            open_step(draw, asset, mid, pair)
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
    assert pair.fast.open_count_by_owner() == pair.ref.open_count_by_owner()
    restored = PositionBook.from_arrays(asset, pair.fast.book_tag, pair.fast.to_arrays())
    assert restored.check() == []
    bid, ask = tick(draw, mid, pair)
    for book in (pair.fast, restored):
        ids, reasons = book.sweep(bid, ask)
        want = dict(pair.ref.sweep(bid, ask))
        assert {pair.to_ref[int(i)]: CloseReason(int(r)) for i, r in zip(ids, reasons,
                                                                         strict=True)} == want


def test_sweeps_agree_where_amounts_in_atoms_leave_int64() -> None:
    """An asset with 4+4 decimals counts in 1e-8 USD: a $100bn margin is 10**19 atoms and the
    PnL of a billion steps far from a 1,000,000.0000 entry is as large, both past int64. At
    ticks around the liquidation price, the entry and far beyond, the naive sweep, the fast
    one and the reference still agree."""
    fine = ASSETS[-1]
    entry = 10**10
    for side, leverage, ppm in ((Side.LONG, 1, 0), (Side.LONG, 1, 5_000),
                                (Side.SHORT, 1, 0), (Side.SHORT, 2, 20_000)):
        pair = Pair(fine, 0, 1, 1)
        plan = plan_open(fine, side, 10**17, leverage, entry, entry, None, None, ppm)
        assert isinstance(plan, OpenPlan)
        pair.open(1, plan)
        liq = plan.liq_ticks
        for bid in (1, liq - 1, liq, liq + 1, entry // 2, entry, 2 * entry, 2**61):
            if bid >= 1:
                pair.sweep(bid, bid)


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


@SETTINGS
@given(st.data())
def test_amends_keep_fast_naive_and_reference_in_lockstep(data: st.DataObject) -> None:
    """Random amends (new, moved and removed TP/SL, margin added or removed, partial-close
    rests) among opens, closes, sweeps and compactions, with tiny merge and compaction
    thresholds: after every step the fast sweep at a tick near a current or amended-away level
    equals the naive one and the reference's, ``check()`` is clean and a snapshot restores."""
    draw = data.draw
    asset, mid, pair = draw_pair(draw)
    for _ in range(draw(st.integers(1, 40))):
        action = draw(st.sampled_from(["open", "open", "amend", "amend", "amend", "close",
                                       "tick", "compact"]))
        if action == "open":  # a few tries: most random requests are refused
            any(open_step(draw, asset, mid, pair) for _ in range(4))
        elif action == "amend" and pair.to_ref:
            fid = draw(st.sampled_from(sorted(pair.to_ref)))
            record = pair.ref.positions[pair.to_ref[fid]]
            pair.amend(fid, amend_request(draw, asset, record, pair.old_levels.get(fid, [])))
        elif action == "close" and pair.to_ref:
            pair.close(draw(st.sampled_from(sorted(pair.to_ref))))
        elif action == "tick":
            for fid in pair.sweep(*tick(draw, mid, pair)):
                pair.close(fid)
        elif action == "compact":
            pair.fast.compact()
        pair.verify(*tick(draw, mid, pair))


def random_amend(rng: np.random.Generator, asset: Asset, p: Any, past: list[int]
                 ) -> dict[str, int]:
    """A change of the position ``p`` (a record): mostly a valid new TP or SL (or an earlier
    level of it from ``past``, valid or not), a removed one, or a new margin with its
    liquidation price."""
    r = rng.random()
    long = p.side == Side.LONG
    if r < 0.7:
        field = "sl_ticks" if r < 0.35 else "tp_ticks"
        if past and rng.random() < 0.3:
            return {field: int(rng.choice(past))}
        # the open interval the book accepts for it, in price order
        if field == "sl_ticks":
            lo, hi = (p.liq_ticks, p.tp_ticks or 2 * p.entry_ticks) if long \
                else (p.tp_ticks, p.liq_ticks)
        else:
            stop = p.sl_ticks or p.liq_ticks
            lo, hi = (stop, 2 * p.entry_ticks) if long else (0, stop)
        return {field: int(rng.integers(lo + 1, hi))} if hi - lo > 1 else {field: 0}
    if r < 0.8:
        return {"tp_ticks" if r < 0.75 else "sl_ticks": 0}
    margin = max(1, int(p.margin_micros * rng.uniform(0.5, 2.0)))
    return {"margin_micros": margin, "liq_ticks": liquidation_ticks(
        asset, p.side, p.entry_ticks, p.qty_steps, margin, p.maintenance_margin_ppm)}


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.integers(0, 2**32 - 1), st.integers(1, 8), st.integers(1, 8))
@example(143, 1, 1)  # the first position amended had no level to leave behind
def test_sweep_after_amend_churn(seed: int, min_pending: int, min_dead: int) -> None:
    """Thousands of amends of a few hundred positions (levels moved, removed, set back to an
    earlier level whose old entry may still be stored, margins changed) among sweeps, closes
    and reopens: the fast sweep stays the naive one, at current and amended-away levels, and
    ``check()`` stays clean."""
    asset = DEFAULT_ASSETS["SOL"]
    rng = np.random.default_rng(seed)
    book = PositionBook(asset, 3, capacity=8, min_pending=min_pending, min_dead=min_dead)
    past: dict[int, list[int]] = {}

    def reopen() -> None:
        while True:
            bid = int(rng.integers(9_000, 11_000))
            plan = plan_open(asset, Side(int(rng.integers(2))), int(rng.integers(10**6, 10**9)),
                             int(rng.integers(1, 101)), bid, bid + 1, None, None,
                             int(rng.choice([0, 5_000])))
            if isinstance(plan, OpenPlan):
                book.open(1, plan, 0)
                return

    for _ in range(200):
        reopen()
    for step in range(3_000):
        live = book.ids()
        pid = int(rng.choice(live))
        before = book.get(pid)
        changes = random_amend(rng, asset, before, past.get(pid, []))
        try:
            book.amend(pid, **changes)
        except ValueError:
            assert book.get(pid) == before
        else:
            assert before is not None
            past.setdefault(pid, []).extend(
                lv for lv in (before.tp_ticks, before.sl_ticks, before.liq_ticks) if lv > 0)
        if step % 25 == 0:
            levels = [lv for old in past.values() for lv in old]
            # (none yet when every amend so far was refused: only prices around the book)
            amended_away = rng.choice(levels, 3).tolist() if levels else []
            for bid in [*amended_away, *rng.integers(8_000, 12_000, 2)]:
                ids, _ = checked_sweep(book, naive_sweep, int(bid), int(bid) + 1)
                for hit in ids.tolist()[:5]:  # the shard closes some, similar ones open
                    book.close(hit)
                    reopen()
        if step % 250 == 0:
            assert book.check() == []
    assert book.check() == []
    restored = PositionBook.from_arrays(asset, 3, book.to_arrays())
    for bid in rng.integers(8_000, 12_000, 20).tolist():
        assert restored.sweep(bid, bid + 1)[0].tolist() == book.sweep(bid, bid + 1)[0].tolist()
