"""Closing a position: realized PnL and the SPEC's settlement split, exact integers only."""

from __future__ import annotations

from dataclasses import dataclass

from engine.assets import Asset
from engine.orders import CloseReason, Side


@dataclass(frozen=True, slots=True)
class Settlement:
    """Money moved by one close, in micro-dollars.

    ``pnl_micros`` is the realized PnL (floored); ``payout_micros`` goes to the user's free
    balance; ``house_micros`` (``-pnl``) to the house; ``insurance_micros``
    (``margin + pnl - payout``) to the insurance fund. ``payout + house + insurance == margin``:
    the released margin is exactly redistributed.
    """

    pnl_micros: int
    payout_micros: int
    house_micros: int
    insurance_micros: int


def pnl_micros(asset: Asset, side: Side, entry_ticks: int, qty_steps: int,
               exit_ticks: int) -> int:
    """Realized PnL in micro-dollars, rounded toward minus infinity.

    Long ``(exit - entry) * qty``, short ``(entry - exit) * qty``.
    """
    mul, div = asset.notional_scale
    diff = exit_ticks - entry_ticks if side == Side.LONG else entry_ticks - exit_ticks
    return (diff * qty_steps * mul) // div


def settle(asset: Asset, side: Side, entry_ticks: int, qty_steps: int, margin_micros: int,
           exit_ticks: int, reason: CloseReason) -> Settlement:
    """Split a close per the SPEC: ``payout = max(0, margin + pnl)`` (0 for a liquidation),
    ``house = -pnl``, ``insurance = margin + pnl - payout``."""
    pnl = pnl_micros(asset, side, entry_ticks, qty_steps, exit_ticks)
    payout = 0 if reason == CloseReason.LIQUIDATION else max(0, margin_micros + pnl)
    return Settlement(pnl, payout, -pnl, margin_micros + pnl - payout)


def exit_price_ticks(side: Side, bid_ticks: int, ask_ticks: int) -> int:
    """The closing-side price: the bid for a long, the ask for a short."""
    return bid_ticks if side == Side.LONG else ask_ticks


__all__ = ["Settlement", "exit_price_ticks", "pnl_micros", "settle"]
