"""DurableShard: a ShardCore whose book, settlement outbox and open answers survive a crash.

Same methods and answers as cluster.shard_core.ShardCore. Each mutating call runs the core's
own logic in memory, appends one shard event (engine.events) per change, and commits the
journal once before it returns; ``__init__`` rebuilds the shard from ``directory``
(``DATA_DIR/<shard name>``: newest snapshot + journal tail, cluster.journal_store).

Events per change:

* position opened -> ``PositionOpened`` with the opening request's id, so a resend of the same
  request after a restart gets the first answer, never a second position;
* position closed (by hand or by a tick's sweep) -> ``PositionClosed`` with its settlement
  number: the outbox is rebuilt on recovery and resent until the ledger has applied it (the
  ledger ignores numbers it already applied, so it takes effect exactly once);
* open request fenced by ``resolve_opens`` -> ``OpenFenced`` (a late delivery stays refused);
* the last tick of every ``apply_ticks`` call -> ``TickApplied``.

A tick batch that closed nothing is not flushed on its own (its ``TickApplied`` rides along
with the next commit): losing the newest price in a crash changes no acknowledged state, and
the feed delivers the newest price again after a restart. A tick batch that closed positions
commits before it returns, so a trigger-close is durable before the shell reports it to the
ledger. Refused opens are not journaled: a refusal was either answered (the caller never asks
again) or not (then the request is free to run again).

Recovery rebuilds the trigger indexes with the book, so positions whose trigger was crossed
while the shard was down close on the first tick it receives after recovery.
"""

from __future__ import annotations

import contextlib
import os
import struct
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cluster.journal_store import BATCH_TAG, JournalStore, decode_batch
from engine.messages import (
    ClosedPosition,
    OpenPosition,
    SettlementItem,
    ShardClose,
    ShardOpen,
)
from cluster.trading.placement import ShardSpec
from cluster.shard_core import _ABANDONED, REMEMBERED_OPENS, ShardCore
from engine.assets import Asset
from engine.book import PositionBook
from engine.events import (
    TYPE_CODES,
    OpenFenced,
    PositionClosed,
    PositionOpened,
    TickApplied,
)
from engine.events import decode as decode_event
from engine.market import Tick
from engine.orders import CloseReason, OpenPlan, Side
from engine.results import Rejected
from engine.settlement import exit_price_ticks, pnl_micros
from cluster.durability.snapshot import Snapshot

RECOVERED_TICK_SOURCE = "journal"  # Tick.source of a last tick rebuilt from the journal

_OUTBOX_COLUMNS = 19  # seq + every ClosedPosition field except the asset (the shard's own)
_OPEN_COLUMNS = 15  # request_id, kind, has_pnl, then the OpenPosition fields but asset
_SIDES = (Side.LONG, Side.SHORT)
_KIND_OPEN = 1
_KIND_FENCED = 2


# One PositionOpened inside a batch record, byte for byte: the batch's u32 length prefix,
# then engine.events' layout 0x11 ("<B" + "QQBqqqHqqqqIQ", packed little-endian).
OPENED_RECORD = np.dtype([
    ("length", "<u4"), ("type", "u1"), ("position_id", "<u8"), ("owner", "<u8"),
    ("side", "u1"), ("entry_ticks", "<i8"), ("qty_steps", "<i8"), ("margin_micros", "<i8"),
    ("leverage", "<u2"), ("liq_ticks", "<i8"), ("tp_ticks", "<i8"), ("sl_ticks", "<i8"),
    ("opened_ts_us", "<i8"), ("maintenance_margin_ppm", "<u4"), ("request_id", "<u8")])
_OPENED_TYPE = TYPE_CODES[PositionOpened]
_OPENED_LENGTH = OPENED_RECORD.itemsize - 4
MIN_VECTOR_RUN = 64  # shorter runs of opens are decoded and replayed one by one
_PLAN_FIELDS = ("side", "entry_ticks", "qty_steps", "margin_micros", "leverage", "liq_ticks",
                "tp_ticks", "sl_ticks", "maintenance_margin_ppm")
_ANSWER_FIELDS = ("request_id", "position_id", "owner", "side", "entry_ticks", "qty_steps",
                  "margin_micros", "leverage", "liq_ticks", "tp_ticks", "sl_ticks",
                  "opened_ts_us")
_LENGTH = struct.Struct("<I")


def decode_shard_batch(payload: bytes) -> list[Any]:
    """The items of one shard journal record: events, except that a run of at least
    ``MIN_VECTOR_RUN`` consecutive ``PositionOpened`` comes as one read-only structured array
    (``OPENED_RECORD``) decoded without a Python object per position."""
    if not payload or payload[0] != BATCH_TAG:
        return decode_batch(payload)
    items: list[Any] = []
    size = len(payload)
    pos = 1
    while pos < size:
        (n,) = _LENGTH.unpack_from(payload, pos)
        if n == _OPENED_LENGTH and payload[pos + 4] == _OPENED_TYPE:
            count = (size - pos) // OPENED_RECORD.itemsize
            if count >= MIN_VECTOR_RUN:
                run = np.frombuffer(payload, OPENED_RECORD, count=count, offset=pos)
                ok = (run["length"] == _OPENED_LENGTH) & (run["type"] == _OPENED_TYPE)
                stop = count if ok.all() else int(np.argmin(ok))
                if stop >= MIN_VECTOR_RUN:
                    items.append(run[:stop])
                    pos += stop * OPENED_RECORD.itemsize
                    continue
        end = pos + 4 + n
        if end > size:
            raise ValueError("batch record shorter than its length fields")
        items.append(decode_event(payload[pos + 4 : end]))
        pos = end
    return items


class ShardRecoveryError(RuntimeError):
    """A journaled shard event does not replay onto the state before it."""


class DurableShard(ShardCore):
    """ShardCore journaled to ``directory``; see the module docstring.

    ``store_options`` go to :class:`cluster.journal_store.JournalStore` (fsync, snapshot
    cadence, clock, background snapshots).
    """

    def __init__(self, spec: ShardSpec, asset: Asset, maintenance_margin_ppm: int,
                 max_price_age_us: int, directory: str | os.PathLike[str],
                 capacity: int = 1024, **store_options: Any) -> None:
        super().__init__(spec, asset, maintenance_margin_ppm, max_price_age_us, capacity)
        self.store = JournalStore(Path(directory), **store_options)
        try:
            self.recovered = self.store.recover(self._restore, DurableShard._apply_event,
                                                DurableShard._apply_events,
                                                decode_shard_batch)
        except BaseException:
            self.store.close()
            raise

    # ----------------------------------------------------------------- call framing
    @contextlib.contextmanager
    def _call(self) -> Iterator[list[bool]]:
        """One batched call; the body sets ``flag[0] = False`` when nothing it changed needs
        to be durable before answering. Commits once at the end (also after an error), then
        checkpoints if due."""
        flag = [True]
        try:
            yield flag
        finally:
            if flag[0] and self.store.pending:
                self.store.commit()
                self.store.maybe_checkpoint(self._snapshot)

    def _append_closes(self, since_seq: int) -> int:
        """Journal the settlements numbered after ``since_seq`` (made by this call)."""
        n = self._last_seq - since_seq
        if n <= 0:
            return 0
        for item in self._outbox[-n:]:
            c = item.closed
            self.store.append(PositionClosed(c.position_id, c.reason, c.exit_ticks,
                                             c.closed_ts_us, item.seq))
        return n

    # ----------------------------------------------------------------- mutations
    def apply_ticks(self, ticks: Iterable[Tick], now_us: int) -> int:
        with self._call() as durable:
            since, tick_before = self._last_seq, self.last_tick
            closed = super().apply_ticks(ticks, now_us)
            self._append_closes(since)
            tick = self.last_tick
            if tick is not None and tick is not tick_before:
                self.store.append(TickApplied(tick.bid_ticks, tick.ask_ticks, tick.ts_us))
            durable[0] = closed > 0
            return closed

    def open_many(self, requests: Sequence[ShardOpen],
                  now_us: int) -> list[OpenPosition | Rejected]:
        with self._call():
            known = {r.request_id for r in requests if r.request_id in self._open_results}
            out = super().open_many(requests, now_us)
            for req, result in zip(requests, out, strict=True):
                if req.request_id in known or not isinstance(result, OpenPosition):
                    continue
                known.add(req.request_id)
                record = self.book.get(result.position_id)
                ppm = self.maintenance_margin_ppm if record is None \
                    else record.maintenance_margin_ppm
                self.store.append(PositionOpened(
                    result.position_id, result.owner, int(result.side), result.entry_ticks,
                    result.qty_steps, result.margin_micros, result.leverage, result.liq_ticks,
                    result.tp_ticks, result.sl_ticks, result.opened_ts_us, ppm, req.request_id))
            return out

    def resolve_opens(self, request_ids: Sequence[int]) -> list[OpenPosition | Rejected | None]:
        with self._call():
            unknown = [r for r in dict.fromkeys(request_ids) if r not in self._open_results]
            out = super().resolve_opens(request_ids)
            for request_id in unknown:
                self.store.append(OpenFenced(request_id))
            return out

    def close_many(self, requests: Sequence[ShardClose],
                   now_us: int) -> list[SettlementItem | Rejected]:
        with self._call():
            since = self._last_seq
            out = super().close_many(requests, now_us)
            self._append_closes(since)
            return out

    def resume_seq(self, applied_seq: int) -> None:
        """Continue after what the ledger applied and drop those settlements from the outbox
        (acknowledgements are not journaled: a recovered outbox may hold applied ones)."""
        super().resume_seq(applied_seq)
        self.ack_outbox(applied_seq)

    # ----------------------------------------------------------------- replay
    def _apply_events(self, items: list[Any]) -> None:
        """Re-apply one journaled batch as :func:`decode_shard_batch` returns it: a run of
        opens (a structured array) goes into the book with one vectorised ``open_many``, which
        gives the same rows and ids as one open after the other (free rows are reused in the
        same order); every other event is applied on its own."""
        for item in items:
            if isinstance(item, np.ndarray):
                self._apply_open_run(item)
            else:
                self._apply_event(item)

    def _apply_open_run(self, run: np.ndarray) -> None:
        plans = {name: run[name].astype(np.int64) for name in _PLAN_FIELDS}
        ids = self.book.open_many(run["owner"].astype(np.int64), plans,
                                  run["opened_ts_us"].astype(np.int64))
        if not np.array_equal(ids, run["position_id"].astype(np.int64)):
            raise ShardRecoveryError("replayed opens got other ids than the journaled ones")
        self._opens += int(run.size)
        # only the newest REMEMBERED_OPENS answers are kept: build just those
        tail = run[max(0, run.size - REMEMBERED_OPENS):]
        tail = tail[tail["request_id"] != 0]
        if not tail.size:
            return
        tick = self.last_tick
        marks: list[int | None]
        if tick is None:
            marks = [None] * int(tail.size)
        else:
            marks = self.book.unrealized_pnl_micros(tail["position_id"].astype(np.int64),
                                                    tick.bid_ticks, tick.ask_ticks).tolist()
        name = self.asset.name
        columns = [tail[f].tolist() for f in _ANSWER_FIELDS]
        for (rid, pid, owner, side, entry, qty, margin, lev, liq, tp, sl, ts), mark in zip(
                zip(*columns, strict=True), marks, strict=True):
            self._remember(rid, OpenPosition(pid, owner, name, _SIDES[side], entry, qty,
                                             margin, lev, liq, tp, sl, ts, mark))

    def _apply_event(self, event: Any) -> None:
        """Re-apply one journaled event (recovery only)."""
        if isinstance(event, PositionOpened):
            side = Side(event.side)
            plan = OpenPlan(side, event.entry_ticks, event.qty_steps, event.margin_micros,
                            event.leverage, event.liq_ticks, event.tp_ticks, event.sl_ticks, 0,
                            event.maintenance_margin_ppm)
            position_id = self.book.open(event.owner, plan, event.opened_ts_us)
            if position_id != event.position_id:
                raise ShardRecoveryError(f"replayed open got id {position_id}, journaled "
                                         f"{event.position_id}")
            self._opens += 1
            if event.request_id:
                tick = self.last_tick
                mark = None if tick is None else pnl_micros(
                    self.asset, side, event.entry_ticks, event.qty_steps,
                    exit_price_ticks(side, tick.bid_ticks, tick.ask_ticks))
                self._remember(event.request_id, OpenPosition(
                    position_id, event.owner, self.asset.name, side, event.entry_ticks,
                    event.qty_steps, event.margin_micros, event.leverage, event.liq_ticks,
                    event.tp_ticks, event.sl_ticks, event.opened_ts_us, mark))
        elif isinstance(event, PositionClosed):
            record = self.book.close(event.position_id)
            if record is None or event.settlement_seq != self._last_seq + 1:
                raise ShardRecoveryError(f"journaled close of {event.position_id} "
                                         f"(settlement {event.settlement_seq}) does not replay")
            self._settle(record, event.exit_ticks, event.exit_ticks, CloseReason(event.reason),
                         event.ts_us)
        elif isinstance(event, TickApplied):
            self.last_tick = Tick(self.asset.name, event.bid_ticks, event.ask_ticks,
                                  event.ts_us, 0, RECOVERED_TICK_SOURCE)
        elif isinstance(event, OpenFenced):
            if event.request_id not in self._open_results:
                self._remember(event.request_id, _ABANDONED)
        else:
            raise ShardRecoveryError(f"not a shard event: {event!r}")

    # ----------------------------------------------------------------- snapshots
    def _snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """Copies of the state: book columns, outbox and remembered opens as int64 arrays."""
        arrays = self.book.to_arrays()
        arrays["outbox"] = np.array(
            [(item.seq, *item.closed[:2], *item.closed[3:]) for item in self._outbox],
            dtype=np.int64).reshape(-1, _OUTBOX_COLUMNS)
        opens: list[tuple[int, ...]] = []
        for request_id, result in self._open_results.items():
            if result is _ABANDONED:
                opens.append((request_id, _KIND_FENCED, *([0] * (_OPEN_COLUMNS - 2))))
            elif isinstance(result, OpenPosition):
                pnl = result.unrealized_pnl_micros
                opens.append((request_id, _KIND_OPEN, int(pnl is not None), *result[:2],
                              *result[3:12], pnl or 0))
        arrays["open_results"] = np.array(opens, dtype=np.int64).reshape(-1, _OPEN_COLUMNS)
        tick = self.last_tick
        meta = {
            "shard": self.spec.name,
            "asset": self.asset.name,
            "last_seq": self._last_seq,
            "acked_seq": self._acked_seq,
            "last_tick": None if tick is None else [tick.bid_ticks, tick.ask_ticks, tick.ts_us,
                                                    tick.seq, tick.source],
            "ticks_applied": self._ticks_applied,
            "opens": self._opens,
            "closes": list(self._closes),
        }
        return arrays, meta

    def _restore(self, snapshot: Snapshot | None) -> DurableShard:
        if snapshot is None:
            return self
        meta, arrays = snapshot.meta, snapshot.arrays
        if meta["asset"] != self.asset.name:
            raise ShardRecoveryError(f"snapshot holds {meta['asset']}, shard trades "
                                     f"{self.asset.name}")
        book_arrays = {k: v for k, v in arrays.items() if k not in ("outbox", "open_results")}
        self.book = PositionBook.from_arrays(self.asset, self.spec.book_tag, book_arrays)
        name = self.asset.name
        self._outbox = [SettlementItem(row[0], ClosedPosition(row[1], row[2], name,
                                                              Side(row[3]), *row[4:]))
                        for row in arrays["outbox"].tolist()]
        for row in arrays["open_results"].tolist():
            request_id, kind, has_pnl = row[0], row[1], row[2]
            if kind == _KIND_FENCED:
                self._remember(request_id, _ABANDONED)
            else:
                (pid, owner, side, entry, qty, margin, leverage, liq, tp, sl, ts,
                 pnl) = row[3:]
                self._remember(request_id, OpenPosition(
                    pid, owner, name, Side(side), entry, qty, margin, leverage, liq, tp, sl,
                    ts, pnl if has_pnl else None))
        self._last_seq = int(meta["last_seq"])
        self._acked_seq = int(meta["acked_seq"])
        tick = meta["last_tick"]
        if tick is not None:
            self.last_tick = Tick(name, tick[0], tick[1], tick[2], tick[3], tick[4])
        self._ticks_applied = int(meta["ticks_applied"])
        self._opens = int(meta["opens"])
        self._closes = [int(x) for x in meta["closes"]]
        return self

    # ----------------------------------------------------------------- lifetime
    def checkpoint(self) -> int:
        """Snapshot now (waits for the file); returns the journal seq it covers."""
        return self.store.checkpoint(self._snapshot, wait=True)

    def journal_bytes(self) -> int:
        return self.store.disk_bytes()

    def close(self) -> None:
        """Clean stop: final snapshot (fast restart), release the journal lock."""
        self.store.close(self._snapshot)
