"""The asset registry: what is traded, its Backpack symbol, steps and leverage limit."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from decimal import Decimal

from engine.amounts import MAX_UNITS, MONEY_DECIMALS, AmountError, from_units, to_units

MAX_NOTIONAL_MICROS = MAX_UNITS // 2
"""Largest ``price * quantity`` (micro-dollars) the bounds below allow: half of
:data:`~engine.amounts.MAX_UNITS`, so a margin plus a PnL (each at most a notional) still fits."""


@dataclass(frozen=True, slots=True)
class Asset:
    """One tradable asset.

    ``price_decimals``/``qty_decimals`` give the steps (``10**-decimals``): SOL's price step 0.01
    is ``price_decimals=2``. ``index`` is the asset's position in its registry (stable, 0-based),
    used wherever an asset must be a small integer (ids, arrays).
    """

    name: str
    symbol: str
    price_decimals: int
    qty_decimals: int
    max_leverage: int
    index: int = 0

    def price_to_ticks(self, value: str | int | float | Decimal) -> int:
        """Parse a positive price into integer ticks (raises AmountError)."""
        return to_units(value, self.price_decimals, allow_zero=False)

    def ticks_to_price(self, ticks: int) -> str:
        return from_units(ticks, self.price_decimals)

    def qty_to_steps(self, value: str | int | float | Decimal) -> int:
        """Parse a positive quantity into integer steps (raises AmountError)."""
        return to_units(value, self.qty_decimals, allow_zero=False)

    def steps_to_qty(self, steps: int) -> str:
        return from_units(steps, self.qty_decimals)

    @property
    def price_step(self) -> str:
        return from_units(1, self.price_decimals)

    @property
    def qty_step(self) -> str:
        return from_units(1, self.qty_decimals)

    @property
    def notional_scale(self) -> tuple[int, int]:
        """``(mul, div)`` such that ``ticks * steps * mul // div`` is the notional in micros.

        Exact (``div == 1``) whenever ``price_decimals + qty_decimals <= 6``, as for every asset
        of the default registry; otherwise the notional is floored to a micro-dollar.
        """
        shift = MONEY_DECIMALS - self.price_decimals - self.qty_decimals
        return (10**shift, 1) if shift >= 0 else (1, 10**-shift)

    def notional_micros(self, price_ticks: int, qty_steps: int) -> int:
        """Exact ``price * quantity`` in micro-dollars, rounded toward minus infinity."""
        mul, div = self.notional_scale
        return (price_ticks * qty_steps * mul) // div

    @property
    def max_price_ticks(self) -> int:
        """Largest price (ticks) a tick may carry: with :attr:`max_qty_steps`, every amount the
        engine computes from a price fits its int64 fields.

        Notional, PnL and maintenance margin are ``price * quantity`` products (a PnL's price
        difference is at most the larger price; leverage only sets how much margin buys that
        notional), so they fit when ``max_price * max_qty`` is at most
        :data:`MAX_NOTIONAL_MICROS`. That room is split evenly between price and quantity (the
        integer square root, in steps). The price levels (entry, a liquidation price at most
        about twice the entry, TP/SL, candles) stay below ``MAX_UNITS // 4``, the level above
        which ``engine.orders.plan_open`` refuses to open.
        """
        return _bounds(self.notional_scale)[0]

    @property
    def max_qty_steps(self) -> int:
        """Largest position quantity (steps) whose notional at :attr:`max_price_ticks` fits
        :data:`MAX_NOTIONAL_MICROS`."""
        return _bounds(self.notional_scale)[1]


@functools.lru_cache(maxsize=64)
def _bounds(notional_scale: tuple[int, int]) -> tuple[int, int]:
    """``(max_price_ticks, max_qty_steps)`` of an asset with this notional scale (computed
    once: every open checks them)."""
    mul, div = notional_scale
    price = max(1, min(MAX_UNITS // 4, math.isqrt(MAX_NOTIONAL_MICROS * div // mul)))
    return price, min(MAX_UNITS, MAX_NOTIONAL_MICROS * div // (mul * price))


class AssetRegistry(Mapping[str, Asset]):
    """Assets by name (``"SOL"``), in a fixed order; also looked up by Backpack symbol."""

    def __init__(self, assets: Iterable[Asset]) -> None:
        ordered = [
            Asset(a.name, a.symbol, a.price_decimals, a.qty_decimals, a.max_leverage, i)
            for i, a in enumerate(assets)
        ]
        if not ordered:
            raise ValueError("an asset registry needs at least one asset")
        self._by_name = {a.name: a for a in ordered}
        self._by_symbol = {a.symbol: a for a in ordered}
        if len(self._by_name) != len(ordered) or len(self._by_symbol) != len(ordered):
            raise ValueError("asset names and symbols must be unique")
        for a in ordered:
            if not (0 <= a.price_decimals <= 12 and 0 <= a.qty_decimals <= 12):
                raise ValueError(f"{a.name}: steps must be 10**-0 .. 10**-12")
            if a.max_leverage < 1:
                raise ValueError(f"{a.name}: max leverage must be at least 1")
        self._ordered = tuple(ordered)

    def __getitem__(self, name: str) -> Asset:
        return self._by_name[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._by_name)

    def __len__(self) -> int:
        return len(self._ordered)

    @property
    def assets(self) -> tuple[Asset, ...]:
        return self._ordered

    def by_symbol(self, symbol: str) -> Asset | None:
        return self._by_symbol.get(symbol)

    def subset(self, names: Iterable[str]) -> AssetRegistry:
        """The registry restricted to ``names`` (order kept from ``names``); KeyError if unknown."""
        return AssetRegistry(self._by_name[n] for n in names)


DEFAULT_ASSETS = AssetRegistry(
    [
        Asset("SOL", "SOL_USDC", price_decimals=2, qty_decimals=2, max_leverage=100),
        Asset("BTC", "BTC_USDC", price_decimals=1, qty_decimals=5, max_leverage=100),
        Asset("ETH", "ETH_USDC", price_decimals=2, qty_decimals=4, max_leverage=100),
    ]
)

__all__ = ["DEFAULT_ASSETS", "MAX_NOTIONAL_MICROS", "AmountError", "Asset", "AssetRegistry"]
