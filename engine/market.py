"""Market data as the engine sees it: one best bid/ask per asset, in integer ticks."""

from __future__ import annotations

from typing import NamedTuple


class Tick(NamedTuple):
    """The newest top of book of one asset.

    ``bid_ticks``/``ask_ticks`` are integer counts of the asset's price step (``0 < bid <= ask``);
    ``ts_us`` is the exchange's engine time in microseconds since the epoch; ``seq`` the
    exchange's update id (monotonic per symbol); ``source`` where it came from
    (``backpack`` / ``sim`` / ``replay``).
    """

    asset: str
    bid_ticks: int
    ask_ticks: int
    ts_us: int
    seq: int
    source: str
