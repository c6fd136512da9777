"""Recovery of a journaled state: newest valid snapshot plus the journal records after it.

Used the same way by the ledger and by every shard:

* :func:`recover` builds the state from the newest valid snapshot (``restore(snapshot)``, or
  ``restore(None)`` for a fresh start), then decodes and applies every durable journal record
  after the snapshot's seq, in order, with ``apply(state, event)``. The same ``apply`` must be
  what the live actor runs after journaling an event, so a replay rebuilds exactly the state
  that was acknowledged.
* :func:`checkpoint` commits the journal, snapshots the state at the journal's last seq, keeps
  the newest snapshots and deletes journal segments only the oldest kept snapshot still covers,
  so the fallback to the previous snapshot (when the newest turns out corrupt) always finds
  its journal tail.

How a (sync, single-threaded) actor uses this:

1. ``__init__``: open its own ``Journal(DATA_DIR/<name>/journal)`` (exclusive), then
   ``recover(journal, DATA_DIR/<name>/snapshots, restore, apply)``; serve nothing before.
2. Every batched call: validate and perform each request on the in-memory state, append one
   event per change (``journal.append(encode(event))``), then ``journal.commit()`` once for
   the batch, and only then return the answers. A commit that raises means the journal is
   poisoned: the actor must exit (Ray restarts it and it recovers from disk), never answer.
3. Every N records or T seconds of records (the shell decides; the engine has no clock),
   ``checkpoint(journal, snapshot_dir, arrays, meta)`` between batches.
4. Work that must reach another actor (a shard's settlements to the ledger) is journaled by
   the sender first, numbered by a per-sender seq, resent until acknowledged, and applied by
   the receiver only if it is the next seq it expects (journaling the applied seq with the
   change), so it takes effect exactly once.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from cluster.durability.journal import Journal, JournalError
from cluster.durability.snapshot import (
    DEFAULT_KEEP,
    Snapshot,
    list_snapshots,
    load_latest_snapshot,
    prune_snapshots,
    write_snapshot,
)
from engine.events import decode as decode_event

S = TypeVar("S")


class RecoveryError(JournalError):
    """The journal and snapshots do not chain: acknowledged records would be missing."""


@dataclass(frozen=True, slots=True)
class Recovered(Generic[S]):
    """The outcome of :func:`recover`.

    ``snapshot_seq``: seq of the snapshot used (0 = none); ``replayed``: journal records
    applied on top of it; ``last_seq``: the seq the state now reflects (the next journal
    append gets ``last_seq + 1``).
    """

    state: S
    snapshot_seq: int
    replayed: int
    last_seq: int


def recover(journal: Journal, snapshot_dir: str | os.PathLike[str],
            restore: Callable[[Snapshot | None], S], apply: Callable[[S, Any], object],
            decode: Callable[[bytes], Any] = decode_event) -> Recovered[S]:
    """Rebuild a state from ``snapshot_dir`` and ``journal`` (see the module docstring).

    ``restore(snapshot_or_none) -> state``; ``apply(state, event)`` mutates it; ``decode``
    turns a journal payload into the event (default: :func:`engine.events.decode`). Raises
    :class:`RecoveryError` when records after the snapshot are missing from the journal.
    When the journal is behind the snapshot (it was removed, or lost records the snapshot
    already holds), a writable journal is moved forward so no seq is ever reused.
    """
    snapshot = load_latest_snapshot(snapshot_dir)
    state = restore(snapshot)
    base = snapshot.seq if snapshot is not None else 0
    if journal.durable_seq < base and not journal.readonly:
        journal.advance_to(base)
    expected = base + 1
    try:
        for seq, payload in journal.replay(after_seq=base):
            if seq != expected:
                raise RecoveryError(f"journal jumps from {expected - 1} to {seq}")
            apply(state, decode(payload))
            expected += 1
    except RecoveryError:
        raise
    except JournalError as exc:
        raise RecoveryError(f"cannot replay after snapshot {base}: {exc}") from exc
    if expected - 1 < journal.durable_seq:  # the log changed under a reader, or was damaged
        raise RecoveryError(f"journal replay stopped at {expected - 1}, "
                            f"before its last record {journal.durable_seq}")
    return Recovered(state, base, expected - 1 - base, max(expected - 1, base))


def checkpoint(journal: Journal, snapshot_dir: str | os.PathLike[str],
               arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
               keep: int = DEFAULT_KEEP) -> Path:
    """Snapshot a state that reflects every record appended to ``journal``; trim both.

    Commits the journal first (a snapshot must never hold a change whose record could still
    be lost, or a restart would reuse its seq), writes the snapshot at ``journal.last_seq``,
    keeps the ``keep`` newest snapshots and drops journal segments older than the oldest kept.
    Returns the new snapshot's path.
    """
    seq = journal.commit()
    path = write_snapshot(snapshot_dir, seq, arrays, meta)
    prune_snapshots(snapshot_dir, keep)
    trim_journal(journal, snapshot_dir)
    return path


def trim_journal(journal: Journal, snapshot_dir: str | os.PathLike[str]) -> int:
    """Delete the journal segments that even the oldest kept snapshot no longer needs.

    The second half of :func:`checkpoint`, for an actor that writes big snapshots off its
    thread: ``seq = journal.commit()``, copy the state, hand ``write_snapshot`` +
    ``prune_snapshots`` to a worker thread, and once that finished call this on the actor's
    thread (a Journal is not thread-safe). Returns the number of segments deleted.
    """
    kept = list_snapshots(snapshot_dir)
    if not kept:
        return 0
    return journal.truncate_before(min(s for s, _ in kept) + 1)
