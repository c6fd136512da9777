"""The ledger and shards hosted by durable Runners in a directory, for the durability tests.

A "crash" drops a runner without its clean stop: no final snapshot, and the events it had not
committed yet (the volatile ones riding along with the next commit) are lost; reopening the
directory is what a restarted actor does. ``check_every_cut`` cuts the journal at every byte of
a batch's record: the state recovered is the one before the batch or the one after it, never
a part of it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Callable
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from cluster.durability.journal import Journal
from cluster.durability.runner import Runner
from cluster.durability.snapshot import Snapshot
from cluster.durability.store import JOURNAL_DIR
from engine.assets import DEFAULT_ASSETS
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import hash_api_key
from engine.market import Tick
from engine.messages import ShardClose
from engine.messages import ShardOpen
from engine.orders import Side
from engine.shard_machine import ShardMachine

REPO = Path(__file__).resolve().parents[3]
USD = 10**6
SIGNUP = 10_000 * USD
SOL = DEFAULT_ASSETS["SOL"]
SHARD = "shard-SOL-0"
BOOK_TAG = 3
NOW = 1_800_000_000_000_000
MAX_AGE_US = 15_000_000
VOLATILE_FIELDS = ("last_tick", "ticks_applied", "outbox", "acked_seq")
"""Shard fingerprint fields that events riding along with the next commit change."""


class Clock:
    """The runners' clock (microseconds), set by the test."""

    def __init__(self, now_us: int = NOW) -> None:
        self.now_us = now_us

    def __call__(self) -> int:
        return self.now_us


def build_ledger(snapshot: Snapshot | None) -> LedgerMachine:
    return LedgerMachine.restore(SIGNUP, snapshot)


def shard_builder(name: str = SHARD, book_tag: int = BOOK_TAG,
                  ppm: int = 0) -> Callable[[Snapshot | None], ShardMachine]:
    def build(snapshot: Snapshot | None) -> ShardMachine:
        return ShardMachine.restore(name, book_tag, SOL, ppm, MAX_AGE_US, snapshot)
    return build


def _options(options: dict[str, Any]) -> dict[str, Any]:
    options.setdefault("fsync", False)
    options.setdefault("background_snapshots", False)
    return options


def open_ledger(path: Path, clock: Callable[[], int] | None = None,
                **options: Any) -> Runner[LedgerMachine]:
    runner: Runner[LedgerMachine] = Runner.open(path, build_ledger, clock or Clock(),
                                                **_options(options))
    return runner


def open_shard(path: Path, clock: Callable[[], int] | None = None,
               build: Callable[[Snapshot | None], ShardMachine] | None = None,
               **options: Any) -> Runner[ShardMachine]:
    runner: Runner[ShardMachine] = Runner.open(path, build or shard_builder(), clock or Clock(),
                                               **_options(options))
    return runner


def crash(runner: Runner[Any]) -> None:
    """Die without the clean stop: uncommitted events are lost, no final snapshot."""
    assert runner.store is not None
    runner.store.wait_snapshot()
    runner.store.journal.close()


def one(runner: Runner[Any], command: Any) -> Any:
    """The answer to one command, run as a batch of its own."""
    [answer] = runner.execute([command])
    return answer


def account(n: int) -> tuple[str, str]:
    """Account id and API key hash of the ``n``-th test account (key ``key-<n>``)."""
    return f"acc_{n:024x}", hash_api_key(f"key-{n}")


def tick(bid_ticks: int, ask_ticks: int | None = None, ts_us: int = NOW, seq: int = 1) -> Tick:
    return Tick("SOL", bid_ticks, bid_ticks + 1 if ask_ticks is None else ask_ticks, ts_us, seq,
                "test")


def shard_open(rid: int, owner: int = 1, side: Side = Side.LONG, margin_usd: int = 100,
               leverage: int = 10, tp: int | None = None, sl: int | None = None) -> ShardOpen:
    return ShardOpen(rid, owner, side, margin_usd * USD, leverage, tp, sl, None, 100)


def shard_close(rid: int, owner: int, position_id: int) -> ShardClose:
    return ShardClose(rid, owner, position_id, None, 100)


def run_python(script: str) -> subprocess.CompletedProcess[bytes]:
    """``script`` run by a new Python process in the repository (what an actor's process
    does, here one that may end itself)."""
    return subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=60)


# ----------------------------------------------------------------------------- journals
def journal_tail(path: Path) -> list[tuple[int, bytes]]:
    """``(seq, payload)`` of every record the journal in ``path`` still stores (read-only,
    beside a live writer; snapshots trim the older ones)."""
    with Journal(path / JOURNAL_DIR, readonly=True) as journal:
        return list(journal.replay(journal.first_seq - 1))


def journal_records(path: Path) -> list[bytes]:
    """Every record of the journal in ``path``, which must not have been trimmed."""
    tail = journal_tail(path)
    assert not tail or tail[0][0] == 1, "the journal was trimmed: a full replay is impossible"
    return [payload for _, payload in tail]


def replayed(path: Path, build: Callable[[Snapshot | None], Any]) -> Any:
    """A fresh machine with every record of the journal in ``path`` applied (no snapshot)."""
    return replay(journal_records(path), build)


def replay(records: Sequence[bytes], build: Callable[[Snapshot | None], Any]) -> Any:
    """A fresh machine with ``records`` applied, as recovery applies them."""
    machine = build(None)
    for payload in records:
        machine.apply_batch(machine.decode_record(payload))
    return machine


def assert_same(got: dict[str, Any], want: dict[str, Any], skip: Sequence[str] = ()) -> None:
    """Two fingerprints equal field by field (``skip``: fields left out)."""
    assert got.keys() == want.keys()
    for name in want:
        if name not in skip:
            assert got[name] == want[name], f"field {name!r} differs"


def segment(path: Path) -> Path:
    [seg] = sorted((path / JOURNAL_DIR).glob("*.wal"))
    return seg


def check_every_cut(path: Path, runner: Runner[Any], commands: Sequence[Any],
                    reopen: Callable[[Path], Runner[Any]]) -> list[Any]:
    """Execute ``commands`` as one batch; a copy of ``path`` whose journal ends at any byte of
    the batch's record (the file cut there, or the rest of the record still the zeros it was
    written over) recovers to the state before the batch (what the directory held: the live
    state, but for uncommitted volatile events) or, ending after the record, to the live state
    after it. Returns the batch's answers."""
    assert runner.store is not None
    scratch = Path(tempfile.mkdtemp(prefix="torn-"))
    try:
        durable = scratch / "durable"
        shutil.copytree(path, durable)
        held = reopen(durable)
        before = held.machine.fingerprint()
        crash(held)
        if runner.store.pending == 0:
            assert before == runner.machine.fingerprint()
        start = runner.store.disk_bytes()  # where the records end (the zeros after them)
        answers = runner.execute(commands)
        after = runner.machine.fingerprint()
        end = runner.store.disk_bytes()
        data = segment(path).read_bytes()
        assert end > start, "the batch journaled nothing"
        assert data[end:] == bytes(len(data) - end), "the segment does not end in zeros"
        copy = scratch / "cut"
        shutil.copytree(path, copy)
        journal = copy / JOURNAL_DIR
        files = set(os.listdir(journal))
        torn = segment(copy)
        for cut in range(start, end + 1):
            # the file cut there, or the record's rest still zeros (4 KiB of them stand for
            # the segment's zeros: a reader reads all, the same whatever their length)
            for kept in (data[:cut], data[:cut] + bytes(end + 4096 - cut)):
                for name in set(os.listdir(journal)) - files:  # set aside by the last repair
                    os.unlink(journal / name)
                torn.write_bytes(kept)
                again = reopen(copy)
                try:
                    whole = kept[:end] == data[:end]  # the record's last bytes may be zeros
                    assert again.machine.fingerprint() == (after if whole else before), \
                        f"cut at byte {cut} of {start}..{end} ({len(kept)} bytes kept)"
                    assert again.machine.check() == []
                finally:
                    crash(again)
        return answers
    finally:
        shutil.rmtree(scratch)
