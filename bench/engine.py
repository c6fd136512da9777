"""Engine benchmark: the per-tick trigger sweep of one big position book and one big
pending-order book.

Builds a book of N random open positions of one asset (longs and shorts, leverage 1..100, some
with take-profit / stop-loss, entries spread around the current price, none already triggered)
and a book of M random pending orders of the same asset (limit and stop, both sides, triggers
within 10% of the current price on the side that does not fill yet, half with an expiry within
a day), then walks the price a tick at a time, 100 ms apart. Each step times ``book.sweep``
(sorted trigger indexes), the naive full PnL recompute over the same book, the order book's
sweep and its naive full sweep, and a floor (``np.max`` over a float64 array of N).
Triggered positions are closed and similar ones reopened, filled and expired orders removed and
similar ones placed, between ticks (not timed), so both books keep their size. Finally times
single ``open``/``close`` and ``place``/``remove`` calls on the full books.

``shardex bench engine --positions 1000000 [--orders 1000000] [--ticks 60] [--seed 1]
[--json]``; the last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np

from bench.options import nonneg_int, positive_int
from engine.assets import DEFAULT_ASSETS, Asset
from engine.book import PositionBook
from engine.order_book import OrderBook, OrderKind, OrderTerms
from engine.order_book import naive_sweep as naive_order_sweep
from engine.orders import OpenPlan, Side, plan_open, plan_open_arrays
from engine.triggers import naive_sweep

# a realistic current price per asset, in its ticks (SOL 150.00, BTC 60000.0, ETH 3000.00)
_MID_PRICE = {"SOL": "150.00", "BTC": "60000.0", "ETH": "3000.00"}
_T = TypeVar("_T")


def _random_requests(rng: np.random.Generator, n: int, entry_lo: int, entry_hi: int
                     ) -> tuple[np.ndarray, ...]:
    side = rng.integers(0, 2, n)
    margin = rng.integers(10_000_000, 1_000_000_000, n)  # $10 .. $1000
    lev = rng.integers(1, 101, n)
    entry = rng.integers(entry_lo, entry_hi + 1, n)
    return side, margin, lev, entry


def build_plans(asset: Asset, n: int, rng: np.random.Generator, mid: int
                ) -> dict[str, np.ndarray]:
    """``n`` valid plans (int64 columns) opened at prices within +-10% of ``mid``, with none
    of their triggers crossed at ``mid`` (a book as a running market would leave it)."""
    out: list[dict[str, np.ndarray]] = []
    have = 0
    while have < n:
        m = (n - have) * 2 + 1024
        side, margin, lev, entry = _random_requests(rng, m, mid * 9 // 10, mid * 11 // 10)
        # vectorised plan at each row's own entry price (bid == ask == entry)
        plans, ok = _plans_at_entries(asset, side, margin, lev, entry)
        liq = plans["liq_ticks"]
        long = side == 0
        # about a third with a TP, a third with an SL, both drawn on the valid side
        u = rng.random(m)
        frac = rng.uniform(0.02, 0.3, m)
        tp = np.where(long, entry + np.maximum(1, (entry * frac).astype(np.int64)),
                      entry - np.maximum(1, (entry * frac / 2).astype(np.int64)))
        tp = np.where(u < 0.33, tp, 0)
        gap = np.abs(entry - liq)
        sl_off = 1 + (rng.random(m) * np.maximum(gap - 2, 0)).astype(np.int64)
        sl = np.where(long, entry - sl_off, entry + sl_off)
        sl = np.where((rng.random(m) < 0.33) & (gap >= 2), sl, 0)
        plans["tp_ticks"], plans["sl_ticks"] = tp, sl
        stop = np.where(sl != 0, sl, liq)
        alive_at_mid = np.where(long, (stop < mid) & ((tp == 0) | (tp > mid)),
                                (stop > mid + 1) & ((tp == 0) | (tp < mid + 1)))
        keep = ok & alive_at_mid & (np.where(long, tp > entry, (tp < entry) & (tp > 0))
                                    | (tp == 0))
        keep &= (sl == 0) | np.where(long, (sl > liq) & (sl < entry), (sl > entry) & (sl < liq))
        chunk = {k: v[keep] for k, v in plans.items()}
        out.append(chunk)
        have += int(keep.sum())
    merged = {k: np.concatenate([c[k] for c in out])[:n] for k in out[0]}
    return merged


def _plans_at_entries(asset: Asset, side: np.ndarray, margin: np.ndarray, lev: np.ndarray,
                      entry: np.ndarray) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Vectorised plans of rows opened at different prices (bid == ask == entry)."""
    zeros = np.zeros(side.size, dtype=np.int64)
    return plan_open_arrays(asset, side, margin, lev, entry, entry, zeros, zeros)


def _random_plan(asset: Asset, rng: np.random.Generator, bid: int, ask: int) -> OpenPlan:
    """A random valid single plan at the current price (for reopens and open timing)."""
    while True:
        side = Side(int(rng.integers(0, 2)))
        lev = int(rng.integers(1, 101))
        margin = int(rng.integers(10_000_000, 1_000_000_000))
        plan = plan_open(asset, side, margin, lev, bid, ask, None, None)
        if isinstance(plan, OpenPlan):
            return plan


_DAY_US = 86_400_000_000


def _order_columns(rng: np.random.Generator, n: int, bid: int, ask: int, now_us: int
                   ) -> dict[str, np.ndarray]:
    """``n`` random order terms (int64 columns, engine.schema.ORDER_TERMS) that the tick
    ``bid``/``ask`` does not fill: triggers 1 tick to 10% away from the opening-side price, on
    the side it has not crossed (limit long and stop short below, limit short and stop long
    above); half expire within a day of ``now_us``."""
    side = rng.integers(0, 2, n)
    kind = rng.integers(0, 2, n)
    ref = np.where(side == Side.LONG, ask, bid)
    dist = 1 + (rng.random(n) * np.maximum(1, ref // 10)).astype(np.int64)
    above = (side == Side.SHORT) == (kind == OrderKind.LIMIT)
    expires = now_us + rng.integers(1_000_000, _DAY_US, n)
    return {
        "side": side, "kind": kind, "trigger_ticks": np.where(above, ref + dist, ref - dist),
        "margin_micros": rng.integers(10_000_000, 1_000_000_000, n),  # $10 .. $1000
        "leverage": rng.integers(1, 101, n),
        "tp_ticks": np.zeros(n, dtype=np.int64), "sl_ticks": np.zeros(n, dtype=np.int64),
        "expires_ts_us": np.where(rng.random(n) < 0.5, 0, expires),
    }


def _random_order(rng: np.random.Generator, bid: int, ask: int, now_us: int) -> OrderTerms:
    """One random order the current tick does not fill (for replacements and place timing)."""
    cols = {k: int(v[0]) for k, v in _order_columns(rng, 1, bid, ask, now_us).items()}
    return OrderTerms(Side(cols.pop("side")), OrderKind(cols.pop("kind")), **cols)


def _median_ms(samples_ns: list[int]) -> float:
    return statistics.median(samples_ns) / 1e6


def _single_op_ns(remove: Callable[[int], object], ids: list[int],
                  insert: Callable[[int, _T, int], object], items: list[_T], ts_us: int
                  ) -> tuple[list[int], list[int]]:
    """Nanoseconds of each ``remove(id)`` over ``ids``, then of each ``insert(i, item, ts_us)``
    over ``items`` (``i`` the owner), timed one call at a time."""
    remove_ns: list[int] = []
    for one in ids:
        a = time.perf_counter_ns()
        remove(one)
        remove_ns.append(time.perf_counter_ns() - a)
    insert_ns: list[int] = []
    for i, item in enumerate(items):
        a = time.perf_counter_ns()
        insert(i, item, ts_us)
        insert_ns.append(time.perf_counter_ns() - a)
    return remove_ns, insert_ns


def _single_op_us(**samples_ns: list[int]) -> dict[str, float]:
    """Each named op's median, then each one's p99, in microseconds (2 decimals), keyed
    ``<name>_us_median`` and ``<name>_us_p99`` in the order the names are given."""
    ordered = {name: sorted(ns) for name, ns in samples_ns.items()}
    medians = {f"{name}_us_median": round(statistics.median(ns) / 1e3, 2)
               for name, ns in ordered.items()}
    p99s = {f"{name}_us_p99": round(ns[len(ns) * 99 // 100] / 1e3, 2)
            for name, ns in ordered.items()}
    return medians | p99s


def run(positions: int, ticks: int, seed: int, asset_name: str = "SOL", orders: int = 0
        ) -> dict[str, Any]:
    asset = DEFAULT_ASSETS[asset_name]
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    mid = asset.price_to_ticks(_MID_PRICE.get(asset.name, "100"))
    plans = build_plans(asset, positions, rng, mid)
    owners = rng.integers(0, max(1, positions // 10), positions)
    t1 = time.perf_counter()
    book = PositionBook(asset, book_tag=1, capacity=positions)
    book.open_many(owners, plans, 1_700_000_000_000_000)
    t2 = time.perf_counter()
    now_us = 1_700_000_000_000_000
    order_book = OrderBook(asset, book_tag=1, capacity=orders)
    if orders:
        order_book.place_many(rng.integers(0, max(1, orders // 10), orders),
                              _order_columns(rng, orders, mid, mid + 1, now_us), now_us)
    t3 = time.perf_counter()

    floor_array = rng.random(positions)
    sweep_ns: list[int] = []
    naive_ns: list[int] = []
    floor_ns: list[int] = []
    triggered: list[int] = []
    order_ns: list[int] = []
    order_naive_ns: list[int] = []
    order_hits: list[int] = []
    mismatches = 0
    price = mid
    lo, hi = mid - 25, mid + 25
    for step in range(ticks + 3):
        price = min(hi, max(lo, price + int(rng.choice((-1, 1)))))
        bid, ask = price, price + 1
        now_us += 100_000
        # a shard sweeps both books on each tick: the order sweep is timed right after the
        # position sweep, before the naive sweeps stream the whole columns through the caches
        a = time.perf_counter_ns()
        ids, reasons = book.sweep(bid, ask)
        b = time.perf_counter_ns()
        if orders:
            order_ids, outcomes = order_book.sweep(bid, ask, now_us)
        e = time.perf_counter_ns()
        naive_ids, naive_reasons = naive_sweep(book, bid, ask)
        c = time.perf_counter_ns()
        float(np.max(floor_array))
        d = time.perf_counter_ns()
        if not (np.array_equal(ids, naive_ids) and np.array_equal(reasons, naive_reasons)):
            mismatches += 1
        if orders:
            f = time.perf_counter_ns()
            naive_order_ids, naive_outcomes = naive_order_sweep(order_book, bid, ask, now_us)
            g = time.perf_counter_ns()
            if not (np.array_equal(order_ids, naive_order_ids)
                    and np.array_equal(outcomes, naive_outcomes)):
                mismatches += 1
        if step >= 3:  # the first ticks warm caches and clear the band around the start price
            sweep_ns.append(b - a)
            naive_ns.append(c - e)
            floor_ns.append(d - c)
            triggered.append(int(ids.size))
            if orders:
                order_ns.append(e - b)
                order_naive_ns.append(g - f)
                order_hits.append(int(order_ids.size))
        for pid in ids.tolist():
            record = book.close(pid)
            assert record is not None
            book.open(record.owner, _random_plan(asset, rng, bid, ask), 1_700_000_000_000_001)
        for oid in (order_ids.tolist() if orders else ()):
            removed = order_book.remove(oid)
            assert removed is not None
            order_book.place(removed.owner, _random_order(rng, bid, ask, now_us), now_us)

    # single-op latency on the full book: close random positions, then open as many
    live = book.ids()
    victims = rng.choice(live, size=min(5000, live.size), replace=False).tolist()
    spare = [_random_plan(asset, rng, price, price + 1) for _ in victims]
    close_ns, open_ns = _single_op_ns(book.close, victims, book.open, spare, 1_700_000_000_000_002)

    a = time.perf_counter_ns()
    book.compact()  # the worst pause opens/closes can hit: a full merge + compaction
    compact_ms = (time.perf_counter_ns() - a) / 1e6
    place_ns: list[int] = []
    remove_ns: list[int] = []
    order_compact_ms = 0.0
    if orders:
        live_orders = order_book.ids()
        victims = rng.choice(live_orders, size=min(5000, live_orders.size),
                             replace=False).tolist()
        fresh = [_random_order(rng, price, price + 1, now_us) for _ in victims]
        remove_ns, place_ns = _single_op_ns(order_book.remove, victims, order_book.place,
                                            fresh, now_us)
        a = time.perf_counter_ns()
        order_book.compact()
        order_compact_ms = (time.perf_counter_ns() - a) / 1e6

    sweep_ms = _median_ms(sweep_ns)
    naive_ms = _median_ms(naive_ns)
    floor_ms = _median_ms(floor_ns)
    order_figures: dict[str, Any] = {}
    if orders:
        order_ms = _median_ms(order_ns)
        both_ms = _median_ms([p + o for p, o in zip(sweep_ns, order_ns, strict=True)])
        order_figures = {
            "orders": len(order_book),
            "order_hits_per_tick_mean": round(statistics.mean(order_hits), 2),
            "order_sweep_ms_median": round(order_ms, 4),
            "order_naive_ms_median": round(_median_ms(order_naive_ns), 4),
            "order_sweep_vs_floor": round(order_ms / floor_ms, 3),
            "both_sweeps_ms_median": round(both_ms, 4),
            "both_sweeps_vs_floor": round(both_ms / floor_ms, 3),
            "bytes_per_order": round(order_book.nbytes / len(order_book), 1),
            **_single_op_us(place=place_ns, remove=remove_ns),
            "order_compact_ms": round(order_compact_ms, 2),
            "order_bulk_load_s": round(t3 - t2, 2),
        }
    return {
        "bench": "engine",
        "asset": asset.name,
        "positions": len(book),
        "ticks": len(sweep_ns),
        "triggered_per_tick_mean": round(statistics.mean(triggered), 2),
        "sweep_ms_median": round(sweep_ms, 4),
        "naive_ms_median": round(naive_ms, 4),
        "floor_ms_median": round(floor_ms, 4),
        "speedup_vs_naive": round(naive_ms / sweep_ms, 1),
        "sweep_vs_floor": round(sweep_ms / floor_ms, 3),
        "bytes_per_position": round(book.nbytes / len(book), 1),
        **_single_op_us(open=open_ns, close=close_ns),
        "compact_ms": round(compact_ms, 2),
        "sweep_mismatches_vs_naive": mismatches,
        "plan_s": round(t1 - t0, 2),
        "bulk_load_s": round(t2 - t1, 2),
        **order_figures,
    }


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="shardex bench engine", description=__doc__)
    parser.add_argument("--positions", type=positive_int, default=1_000_000)
    parser.add_argument("--orders", type=nonneg_int, default=1_000_000,
                        help="pending orders in the order book (0: positions only)")
    parser.add_argument("--ticks", type=positive_int, default=60,
                        help="timed ticks (>= 30 advised)")
    parser.add_argument("--seed", type=nonneg_int, default=1)  # numpy takes no negative one
    parser.add_argument("--asset", default="SOL", choices=list(DEFAULT_ASSETS))
    parser.add_argument("--json", action="store_true", help="(the JSON line is always last)")
    args = parser.parse_args(argv)
    result = run(args.positions, args.ticks, args.seed, args.asset, args.orders)
    rows = [
        ("per-tick trigger sweep (sorted indexes)", f"{result['sweep_ms_median']:.4f} ms"),
        ("naive full PnL recompute", f"{result['naive_ms_median']:.4f} ms"),
        ("floor: np.max over N float64", f"{result['floor_ms_median']:.4f} ms"),
        ("speedup vs naive", f"{result['speedup_vs_naive']}x"),
        ("sweep / floor", f"{result['sweep_vs_floor']}"),
        ("triggered rows per tick (mean)", f"{result['triggered_per_tick_mean']}"),
        ("bytes per position (all book memory)", f"{result['bytes_per_position']}"),
        ("open (single, median)", f"{result['open_us_median']} us"),
        ("close (single, median)", f"{result['close_us_median']} us"),
        ("open / close p99", f"{result['open_us_p99']} / {result['close_us_p99']} us"),
        ("full index merge + compaction", f"{result['compact_ms']} ms"),
    ]
    if args.orders:
        rows += [
            ("per-tick order sweep (sorted indexes)",
             f"{result['order_sweep_ms_median']:.4f} ms"),
            ("naive full order sweep", f"{result['order_naive_ms_median']:.4f} ms"),
            ("order sweep / floor", f"{result['order_sweep_vs_floor']}"),
            ("positions + orders sweep / floor", f"{result['both_sweeps_vs_floor']}"),
            ("orders filled or expired per tick (mean)",
             f"{result['order_hits_per_tick_mean']}"),
            ("bytes per order (all book memory)", f"{result['bytes_per_order']}"),
            ("place / remove (single, median)",
             f"{result['place_us_median']} / {result['remove_us_median']} us"),
            ("place / remove p99", f"{result['place_us_p99']} / {result['remove_us_p99']} us"),
            ("full order index merge + compaction", f"{result['order_compact_ms']} ms"),
        ]
    rows.append(("sweep answers differing from naive", f"{result['sweep_mismatches_vs_naive']}"))
    print(f"engine benchmark: {result['positions']} {result['asset']} positions, "
          f"{result.get('orders', 0)} pending orders, {result['ticks']} ticks (medians)")
    width = max(len(r[0]) for r in rows)
    for label, value in rows:
        print(f"  {label:<{width}}  {value:>14}")
    print(json.dumps(result))
    return 0 if result["sweep_mismatches_vs_naive"] == 0 else 1


if __name__ == "__main__":
    import sys

    raise SystemExit(main(sys.argv[1:]))
