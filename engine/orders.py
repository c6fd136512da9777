"""Opening a position: sides, close reasons, and the exact maths of an open (quantity,
liquidation price, take-profit / stop-loss validation).

All arithmetic is on Python ints: prices in ticks, quantities in steps, money in micro-dollars.
The exact liquidation price in ticks of an asset with ``pd`` price and ``qd`` quantity
decimals is ``entry -/+ (margin * 10**(pd+qd) - ppm * entry * qty) / (10**6 * qty)`` (long/short);
:func:`liquidation_ticks` floors it for a long and ceils it for a short, so that comparing an
integer tick price with the rounded level gives exactly the same answer as comparing it with
the exact price.
"""

from __future__ import annotations

import numpy as np

from engine import schema
from engine.amounts import MONEY_DECIMALS, ceil_div
from engine.assets import Asset
from engine.results import Code, Rejected

NO_LEVEL = 0
"""``tp_ticks``/``sl_ticks`` value meaning "not set" (prices are always > 0)."""

PPM = 1_000_000
"""Parts per million: the unit of ``maintenance_margin_ppm`` (rate 0.5% == 5_000 ppm)."""

MAX_COLUMN_VALUE = 2**62
"""Largest price, quantity or amount a plan may carry, so int64 columns never overflow."""


class Side(schema.Labelled, field=schema.side):
    """Direction of a position; the int value is what the book's ``side`` column (int8) holds."""

    LONG = 0
    SHORT = 1


class CloseReason(schema.Labelled, field=schema.reason):
    """Why a position closed; the int value is what sweeps return (int8)."""

    MANUAL = 0
    TAKE_PROFIT = 1
    STOP_LOSS = 2
    LIQUIDATION = 3

    @classmethod
    def parse(cls, text: str) -> CloseReason:
        """A label, exactly -> its member; ValueError otherwise."""
        try:
            return cls(cls._labels.index(text))
        except ValueError:
            raise ValueError(f"unknown close reason {text!r}") from None


OpenPlan = schema.record(
    "OpenPlan", schema.PLAN, __name__, enums={"side": Side},
    zero_default=("maintenance_margin_ppm",),
    doc="""Everything needed to open a position, computed from the request and the current tick
    (the fields of engine.schema.PLAN).

    ``entry_ticks`` is the ask for a long, the bid for a short; ``liq_ticks`` the liquidation
    price rounded to a tick so that comparing a tick price with it is exact (0 for a long that
    can never be liquidated at a positive price); ``tp_ticks``/``sl_ticks`` are ``NO_LEVEL`` when
    not set; ``mm_micros`` is the maintenance margin floored to a micro-dollar (informational);
    ``maintenance_margin_ppm`` the rate it came from (kept so the book can recompute it
    exactly).""")


def quantity_steps(asset: Asset, margin_micros: int, leverage: int, entry_ticks: int) -> int:
    """``floor_to_step(margin * leverage / entry_price)`` in quantity steps (exact)."""
    scale = asset.price_decimals + asset.qty_decimals - MONEY_DECIMALS
    if scale >= 0:
        return (margin_micros * leverage * 10**scale) // entry_ticks
    return (margin_micros * leverage) // (entry_ticks * 10**-scale)


def maintenance_margin_micros(asset: Asset, entry_ticks: int, qty_steps: int, ppm: int) -> int:
    """``rate * entry * quantity`` in micro-dollars, floored."""
    mul, div = asset.notional_scale
    return (ppm * entry_ticks * qty_steps * mul) // (div * PPM)


def liquidation_ticks(asset: Asset, side: Side, entry_ticks: int, qty_steps: int,
                      margin_micros: int, maintenance_margin_ppm: int) -> int:
    """Liquidation price in ticks: floor (long, at least 0) / ceil (short) of the exact price
    ``entry -/+ (margin - mm) / quantity``, so that ``bid <= liq_ticks`` (long) and
    ``ask >= liq_ticks`` (short) hold exactly when the tick price crosses the exact price.
    """
    scale = 10 ** (asset.price_decimals + asset.qty_decimals)
    numerator = margin_micros * scale - maintenance_margin_ppm * entry_ticks * qty_steps
    distance = ceil_div(numerator, PPM * qty_steps)
    if side is Side.LONG or side == 0:
        return max(0, entry_ticks - distance)
    return entry_ticks + distance


def _trigger_problem(asset: Asset, side: Side, entry_ticks: int, liq_ticks: int,
                     tp_ticks: int, sl_ticks: int) -> str | None:
    """Why a TP/SL pair is invalid for this position, naming the prices it must lie beyond
    (the entry is the fill's price, which the client did not know), or None when valid (or
    not set)."""
    long = side == Side.LONG
    tp_wrong = tp_ticks != NO_LEVEL and not (
        tp_ticks > entry_ticks if long else 0 < tp_ticks < entry_ticks)
    sl_wrong = sl_ticks != NO_LEVEL and not (
        liq_ticks < sl_ticks < entry_ticks if long else entry_ticks < sl_ticks < liq_ticks)
    if not (tp_wrong or sl_wrong):
        return None  # (the book checks every open: the prices are written only for a refusal)
    entry, liq = asset.ticks_to_price(entry_ticks), asset.ticks_to_price(liq_ticks)
    if tp_wrong:
        return (f"take-profit of a {'long must be above' if long else 'short must be below'} "
                f"the entry price ({entry})")
    if long:
        return (f"stop-loss of a long must lie between the liquidation price ({liq}) and the "
                f"entry ({entry})")
    return (f"stop-loss of a short must lie between the entry ({entry}) and the liquidation "
            f"price ({liq})")


def plan_open(asset: Asset, side: Side, margin_micros: int, leverage: int, bid_ticks: int,
              ask_ticks: int, tp_ticks: int | None, sl_ticks: int | None,
              maintenance_margin_ppm: int = 0) -> OpenPlan | Rejected:
    """Plan an open at the current top of book, or say why it is refused.

    Long enters at ``ask_ticks``, short at ``bid_ticks``. Refusals: LEVERAGE_OUT_OF_RANGE
    (outside ``1..asset.max_leverage``), PRICE_UNAVAILABLE (no sane bid/ask), INVALID_REQUEST
    (margin <= 0, quantity below one step, values too large for the book), WOULD_LIQUIDATE
    (the liquidation price is already crossed by the closing-side price: long ``bid <= liq``,
    short ``ask >= liq``; a margin not above the maintenance margin puts it at or beyond the
    entry, crossed by any price), INVALID_TRIGGER (TP not on
    the profit side, SL not strictly between the liquidation price and the entry; a level <= 0
    is invalid, ``None`` means not set).
    ``maintenance_margin_ppm`` is a configuration value; outside ``0..10**6`` raises ValueError.
    """
    if not 0 <= maintenance_margin_ppm < PPM:
        raise ValueError("maintenance_margin_ppm must be in 0..999999")
    side = Side(side)
    if isinstance(leverage, bool) or not isinstance(leverage, int) \
            or not 1 <= leverage <= asset.max_leverage:
        return Rejected(Code.LEVERAGE_OUT_OF_RANGE,
                        f"leverage must be an integer in 1..{asset.max_leverage}")
    if margin_micros <= 0:
        return Rejected(Code.INVALID_REQUEST, "margin must be greater than zero")
    if margin_micros > MAX_COLUMN_VALUE:
        return Rejected(Code.INVALID_REQUEST, "margin too large")
    if not 0 < bid_ticks <= ask_ticks or ask_ticks > MAX_COLUMN_VALUE // 4:
        return Rejected(Code.PRICE_UNAVAILABLE, "no valid price for this asset")
    entry = ask_ticks if side is Side.LONG else bid_ticks
    qty = quantity_steps(asset, margin_micros, leverage, entry)
    if qty < 1:
        return Rejected(Code.INVALID_REQUEST,
                        f"margin * leverage buys less than one step ({asset.qty_step})")
    if qty > asset.max_qty_steps:  # every amount of a larger one may not fit int64
        return Rejected(Code.INVALID_REQUEST, (
            f"position too large: {asset.steps_to_qty(qty)} {asset.name} at this price, at "
            f"most {asset.steps_to_qty(asset.max_qty_steps)}"))
    mm = maintenance_margin_micros(asset, entry, qty, maintenance_margin_ppm)
    scale = 10 ** (asset.price_decimals + asset.qty_decimals)
    if margin_micros * scale <= maintenance_margin_ppm * entry * qty:
        # its liquidation price lies at or beyond the entry: crossed by any closing price
        return Rejected(Code.WOULD_LIQUIDATE, "the margin does not exceed the maintenance "
                        "margin: the position would be liquidated at once")
    liq = liquidation_ticks(asset, side, entry, qty, margin_micros, maintenance_margin_ppm)
    if (bid_ticks <= liq) if side is Side.LONG else (ask_ticks >= liq):
        return Rejected(Code.WOULD_LIQUIDATE,
                        f"the liquidation price {asset.ticks_to_price(liq)} is already crossed "
                        f"by the current {'bid' if side is Side.LONG else 'ask'}")
    tp = NO_LEVEL if tp_ticks is None else tp_ticks
    sl = NO_LEVEL if sl_ticks is None else sl_ticks
    if (tp_ticks is not None and tp_ticks <= 0) or (sl_ticks is not None and sl_ticks <= 0):
        return Rejected(Code.INVALID_TRIGGER, "take-profit and stop-loss must be positive prices")
    if tp > MAX_COLUMN_VALUE or sl > MAX_COLUMN_VALUE:
        return Rejected(Code.INVALID_TRIGGER, "take-profit or stop-loss too large")
    problem = _trigger_problem(asset, side, entry, liq, tp, sl)
    if problem is not None:
        return Rejected(Code.INVALID_TRIGGER, problem)
    return OpenPlan(side, entry, qty, margin_micros, leverage, liq, tp, sl, mm,
                    maintenance_margin_ppm)


def check_plan(asset: Asset, plan: OpenPlan) -> None:
    """Raise ValueError unless ``plan`` is internally consistent (what :func:`plan_open` makes).

    The book calls this on every open: a plan that did not come from ``plan_open`` (or a
    corrupted journal record) must not enter the book with a wrong liquidation price.
    """
    if plan.side not in (Side.LONG, Side.SHORT):
        raise ValueError("bad side")
    if not (0 < plan.entry_ticks <= MAX_COLUMN_VALUE and 0 < plan.qty_steps <= MAX_COLUMN_VALUE
            and 0 < plan.margin_micros <= MAX_COLUMN_VALUE):
        raise ValueError("entry, quantity and margin must be positive and in range")
    if not 1 <= plan.leverage <= min(asset.max_leverage, 2**31 - 1):
        raise ValueError("leverage out of range")
    if not 0 <= plan.maintenance_margin_ppm < PPM:
        raise ValueError("maintenance margin rate out of range")
    liq = liquidation_ticks(asset, plan.side, plan.entry_ticks, plan.qty_steps,
                            plan.margin_micros, plan.maintenance_margin_ppm)
    if liq != plan.liq_ticks:
        raise ValueError(f"liquidation price {plan.liq_ticks} does not match the plan ({liq})")
    if plan.tp_ticks < 0 or plan.sl_ticks < 0 or max(plan.tp_ticks, plan.sl_ticks) \
            > MAX_COLUMN_VALUE:
        raise ValueError("trigger levels out of range")
    problem = _trigger_problem(asset, plan.side, plan.entry_ticks, liq, plan.tp_ticks,
                               plan.sl_ticks)
    if problem is not None:
        raise ValueError(problem)


_INT64_SAFE = float(2**62)
_INT64_MAX = (1 << 63) - 1


def liquidation_ticks_array(asset: Asset, side: np.ndarray, entry_ticks: np.ndarray,
                            qty_steps: np.ndarray, margin_micros: np.ndarray,
                            maintenance_margin_ppm: np.ndarray) -> np.ndarray:
    """Vectorised :func:`liquidation_ticks` (int64 arrays in, int64 out, bit-for-bit equal);
    computes on Python ints where int64 could overflow. OverflowError when a price lies past
    int64 (a margin far above its notional with many decimals)."""
    side = np.asarray(side, dtype=np.int64)
    entry = np.asarray(entry_ticks, dtype=np.int64)
    qty = np.asarray(qty_steps, dtype=np.int64)
    margin = np.asarray(margin_micros, dtype=np.int64)
    ppm = np.asarray(maintenance_margin_ppm, dtype=np.int64)
    if entry.size == 0:
        return np.zeros(0, dtype=np.int64)
    scale = 10 ** (asset.price_decimals + asset.qty_decimals)
    bound = max(float(np.max(margin)) * scale,
                float(np.max(ppm)) * float(np.max(entry)) * float(np.max(qty)),
                float(PPM) * float(np.max(qty)), float(np.max(entry)) * 4.0)
    if bound < _INT64_SAFE:
        numerator = margin * scale - ppm * entry * qty
        distance = -((-numerator) // (PPM * qty))
        return np.where(side == 0, np.maximum(entry - distance, 0), entry + distance)
    exact = [liquidation_ticks(asset, Side(s), e, q, m, p) for s, e, q, m, p in
             zip(side.tolist(), entry.tolist(), qty.tolist(), margin.tolist(), ppm.tolist(),
                 strict=True)]
    return np.array(exact, dtype=np.int64)


def _floor_div(values: np.ndarray, divisor: int) -> np.ndarray:
    """``values // divisor`` (int64 array, ``divisor > 0``) for a divisor past int64 as well
    (``10**(pd+qd)`` of steps with 19 or more decimals in all): numpy cannot take it, and every
    int64 lies within one such divisor of 0, so the floor is 0 or -1."""
    if divisor <= _INT64_MAX:
        return values // divisor
    return np.where(values < 0, -1, 0).astype(np.int64)


def plan_open_arrays(asset: Asset, side: np.ndarray, margin_micros: np.ndarray,
                     leverage: np.ndarray, bid_ticks: int | np.ndarray,
                     ask_ticks: int | np.ndarray, tp_ticks: np.ndarray,
                     sl_ticks: np.ndarray, maintenance_margin_ppm: int = 0
                     ) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Vectorised :func:`plan_open` for bulk loads and benchmarks.

    Arrays are one entry per request (int64; ``tp_ticks``/``sl_ticks`` use ``NO_LEVEL`` for
    "not set"); ``bid_ticks``/``ask_ticks`` are one top of book or one per request. Returns
    the plan columns (keys as :class:`OpenPlan` fields, int64) and a bool mask of the requests
    :func:`plan_open` would accept; the columns of refused rows are meaningless.
    ValueError if values are so large that int64 could overflow.
    """
    side = np.asarray(side, dtype=np.int64)
    margin = np.asarray(margin_micros, dtype=np.int64)
    lev = np.asarray(leverage, dtype=np.int64)
    tp = np.asarray(tp_ticks, dtype=np.int64)
    sl = np.asarray(sl_ticks, dtype=np.int64)
    if not 0 <= maintenance_margin_ppm < PPM:
        raise ValueError("maintenance_margin_ppm must be in 0..999999")
    bid = np.asarray(bid_ticks, dtype=np.int64)
    ask = np.asarray(ask_ticks, dtype=np.int64)
    if not ((bid > 0) & (bid <= ask)).all():
        raise ValueError("invalid top of book")
    n = side.size
    entry = np.broadcast_to(np.where(side == 0, ask, bid), (n,)).astype(np.int64)
    shift = asset.price_decimals + asset.qty_decimals - MONEY_DECIMALS
    bound = float(np.max(margin, initial=0)) * float(np.max(lev, initial=0)) \
        * 10.0 ** max(shift, 0) * max(1.0, float(maintenance_margin_ppm))
    if bound >= _INT64_SAFE or int(np.max(ask, initial=0)) > MAX_COLUMN_VALUE // 4:
        raise ValueError("values too large for the vectorised planner; use plan_open")
    safe_lev = np.clip(lev, 1, None)
    if shift >= 0:
        qty = (margin * safe_lev * 10**shift) // entry
    else:
        # floor(floor(x / a) / b) == floor(x / (a * b)): ``entry * 10**-shift`` would leave
        # int64 (wrapping to any divisor) at a price above 2**63 / 10**-shift ticks
        qty = (margin * safe_lev) // 10**-shift // entry
    ok = (lev >= 1) & (lev <= asset.max_leverage) & (margin > 0) & (qty >= 1) \
        & (qty <= asset.max_qty_steps) & ((side == 0) | (side == 1))
    safe_qty = np.clip(qty, 1, None)
    ppm = np.full(n, maintenance_margin_ppm, dtype=np.int64)
    scale = 10 ** (asset.price_decimals + asset.qty_decimals)
    # plan_open's ``margin * scale > ppm * entry * qty`` (margin above the maintenance margin),
    # divided by scale: for an integer margin it is exact, and it never forms
    # ``margin * scale``, which leaves int64 far below the bound above (BTC: beyond $9.2M)
    ok &= margin > _floor_div(ppm * entry * safe_qty, scale)
    liq = liquidation_ticks_array(asset, side, entry, safe_qty, np.clip(margin, 1, None), ppm)
    mul, div = asset.notional_scale
    mm = _floor_div(ppm * entry * safe_qty * mul, div * PPM)
    long = side == 0
    tp_ok = (tp == 0) | np.where(long, tp > entry, (tp > 0) & (tp < entry))
    sl_ok = (sl == 0) | np.where(long, (sl > liq) & (sl < entry), (sl > entry) & (sl < liq))
    # plan_open refuses a level above MAX_COLUMN_VALUE (the book could not hold it); a
    # long's take-profit has no other upper bound, so without this it passed here
    ok &= tp_ok & sl_ok & (tp >= 0) & (sl >= 0) & (tp <= MAX_COLUMN_VALUE) \
        & (sl <= MAX_COLUMN_VALUE)
    ok &= np.where(long, bid > liq, ask < liq)  # not already liquidatable (WOULD_LIQUIDATE)
    plans = {
        "side": side, "entry_ticks": entry, "qty_steps": qty, "margin_micros": margin,
        "leverage": lev, "liq_ticks": liq, "tp_ticks": tp, "sl_ticks": sl, "mm_micros": mm,
        "maintenance_margin_ppm": ppm,
    }
    return plans, ok


__all__ = [
    "MAX_COLUMN_VALUE",
    "NO_LEVEL",
    "PPM",
    "CloseReason",
    "OpenPlan",
    "Side",
    "check_plan",
    "liquidation_ticks",
    "liquidation_ticks_array",
    "maintenance_margin_micros",
    "plan_open",
    "plan_open_arrays",
    "quantity_steps",
]
