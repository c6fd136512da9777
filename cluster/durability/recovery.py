"""Recovery of a journaled state: newest valid snapshot plus the journal records after it.

:func:`recover` builds the state from the newest valid snapshot (``restore(snapshot)``, or
``restore(None)`` for a fresh start; the store reads it before the journal repairs anything),
then decodes and applies every durable journal record
after the snapshot's seq, in order. The runner (cluster.durability.runner) passes the machine's
own ``apply``, the one the live path runs, so a replay rebuilds exactly the state that was
acknowledged. :func:`trim_journal` drops the journal segments that even the oldest kept snapshot
no longer needs (the store calls it once a snapshot is on disk), so the fallback to the previous
snapshot, when the newest turns out corrupt, always finds its journal tail.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from cluster.durability.journal import Journal, JournalError
from cluster.durability.snapshot import Snapshot, list_snapshots
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


def recover(journal: Journal, snapshot: Snapshot | None,
            restore: Callable[[Snapshot | None], S], apply: Callable[[S, Any], object],
            decode: Callable[[bytes], Any] = decode_event) -> Recovered[S]:
    """Rebuild a state from ``snapshot`` (the newest valid one, :func:`load_latest_snapshot`;
    None: a fresh start) and ``journal`` (see the module docstring).

    ``restore(snapshot_or_none) -> state``; ``apply(state, event)`` mutates it; ``decode``
    turns a journal payload into the event (default: :func:`engine.events.decode`). Raises
    :class:`RecoveryError` when records after the snapshot are missing from the journal, or
    one of them fails to decode or apply (naming the journal and the record's seq).
    When the journal is behind the snapshot (it was removed, or lost records the snapshot
    already holds), a writable journal is moved forward so no seq is ever reused.
    """
    state = restore(snapshot)
    base = snapshot.seq if snapshot is not None else 0
    if journal.durable_seq < base and not journal.readonly:
        journal.advance_to(base)
    expected = base + 1
    try:
        for seq, payload in journal.replay(after_seq=base):
            if seq != expected:
                raise RecoveryError(f"journal jumps from {expected - 1} to {seq}")
            try:
                apply(state, decode(payload))
            except Exception as exc:  # a valid record this state cannot take: name it
                raise RecoveryError(
                    f"journal {journal.path}: record {seq} does not replay "
                    f"({type(exc).__name__}: {exc}); a record of another host's journal, or "
                    f"one written by a version that no longer reads it") from exc
            expected += 1
    except RecoveryError:
        raise
    except JournalError as exc:
        raise RecoveryError(f"cannot replay after snapshot {base}: {exc}") from exc
    if expected - 1 < journal.durable_seq:  # the log changed under a reader, or was damaged
        raise RecoveryError(f"journal replay stopped at {expected - 1}, "
                            f"before its last record {journal.durable_seq}")
    return Recovered(state, base, expected - 1 - base, max(expected - 1, base))


def trim_journal(journal: Journal, snapshot_dir: str | os.PathLike[str]) -> int:
    """Delete the journal segments that even the oldest kept snapshot no longer needs.

    Called on the writer's thread (a Journal is not thread-safe) once a snapshot written off
    that thread is on disk. Returns the number of segments deleted.
    """
    kept = list_snapshots(snapshot_dir)
    if not kept:
        return 0
    return journal.truncate_before(min(s for s, _ in kept) + 1)
