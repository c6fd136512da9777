"""The last filter before the shards: per asset, updates in order and no unconfirmed jumps.

A decoded tick may still be one the engine must not act on: older than the update already
delivered for its asset, or that update again (``out_of_order``), or a mid far from the last
accepted one. Such a jump may be the market gapping or a bad print; one tick cannot tell, the
next one can. So a jump is held back and accepted only if the next tick of the asset lies
within the band around it (the move is confirmed: the held tick is delivered, then the
confirming one, so the engine sweeps the price the market gapped to); otherwise the held tick
is dropped as ``jump`` and the next tick is judged on its own. A next tick stamped before the
held one cannot confirm it either (it would be delivered after a newer one): the held tick
is dropped, and the next is judged on its own. Were such ticks dropped instead, one bad print
stamped a few seconds ahead (within the clock skew allowed) would have every update of its
asset dropped until that time, every two seconds another one freezing the asset's price for
good, though every one of them ended dropped.
"""

from __future__ import annotations

from collections import Counter

from engine.market import Tick

GATE_DROP_REASONS = ("out_of_order", "jump")


def _order(tick: Tick) -> tuple[int, int]:
    return tick.ts_us, tick.seq


def mid2_within_band(mid2: int, ref2: int, band_bps: int) -> bool:
    """True when twice a mid (``bid + ask`` in ticks), ``mid2``, lies within ``band_bps``
    basis points of ``ref2``, twice the reference's (exact integer arithmetic)."""
    return abs(mid2 - ref2) * 10_000 <= band_bps * ref2


def within_band(tick: Tick, reference: Tick, band_bps: int) -> bool:
    """True when the mid of ``tick`` lies within ``band_bps`` basis points of the mid of
    ``reference`` (see :func:`mid2_within_band`)."""
    return mid2_within_band(tick.bid_ticks + tick.ask_ticks,
                            reference.bid_ticks + reference.ask_ticks, band_bps)


class TickGate:
    """Per-asset order and jump filter (state: the last delivered tick, the held one).

    ``admit(tick)`` returns the ticks to deliver, in order: none (dropped, or held), the
    tick, or the held tick it confirms and then the tick. Counters:
    ``dropped[reason]`` (:data:`GATE_DROP_REASONS`), ``held_total`` (jumps held),
    ``confirmed`` (held jumps a next tick confirmed). ``last`` maps an asset to its last
    delivered tick, ``held`` to its held one.
    """

    def __init__(self, max_tick_jump_bps: int) -> None:
        if max_tick_jump_bps <= 0:
            raise ValueError("max_tick_jump_bps must be > 0")
        self.band_bps = max_tick_jump_bps
        self.last: dict[str, Tick] = {}
        self.held: dict[str, Tick] = {}
        self.dropped: Counter[str] = Counter()
        self.held_total = 0
        self.confirmed = 0

    def is_older(self, tick: Tick) -> bool:
        """True (and counted as ``out_of_order``) when ``tick`` is older, by ``(ts_us, seq)``,
        than the last tick delivered for its asset, or is that tick again, or the tick held
        for its asset again."""
        last = self.last.get(tick.asset)
        # the same tick again (a message the topic holds twice: a producer's retry, a consumer
        # repositioned one message back) would be swept, charted and counted in a candle twice
        if (last is not None and (_order(tick) < _order(last) or tick == last)) or (
                tick == self.held.get(tick.asset)):
            self.dropped["out_of_order"] += 1
            return True
        return False

    def behind_held(self, tick: Tick) -> bool:
        """True when ``tick`` is not newer, by ``(ts_us, seq)``, than the tick held for its
        asset: it cannot confirm that one (:meth:`admit` drops that one and judges ``tick``
        alone; ``feed.conflation`` takes it only if no newer tick of its asset came)."""
        held = self.held.get(tick.asset)
        return held is not None and _order(tick) <= _order(held)

    def admit(self, tick: Tick) -> list[Tick]:
        if self.is_older(tick):
            return []
        asset = tick.asset
        last = self.last.get(asset)
        held = self.held.pop(asset, None)
        if held is not None and _order(tick) <= _order(held):
            self.dropped["jump"] += 1  # stamped ahead of the update after it: not confirmed
            held = None
        if last is None or within_band(tick, last, self.band_bps):
            if held is not None:
                self.dropped["jump"] += 1  # the next tick did not confirm the held one
            self.last[asset] = tick
            return [tick]
        if held is not None and within_band(tick, held, self.band_bps):
            self.confirmed += 1  # the market moved there: what it crossed on the way is swept
            self.last[asset] = tick
            return [held, tick]
        if held is not None:
            self.dropped["jump"] += 1
        self.held[asset] = tick
        self.held_total += 1
        return []

    def admit_all(self, ticks: dict[str, Tick]) -> list[Tick]:
        """:meth:`admit` each tick; the ones to deliver, in the input's order."""
        return [admitted for tick in ticks.values() for admitted in self.admit(tick)]
