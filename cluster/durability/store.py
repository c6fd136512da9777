"""JournalStore: the journal, snapshots and checkpoint cadence of one hosted state machine.

The runner (cluster.durability.runner) steps commands through its machine and hands the
encoded events of each batch to a JournalStore. The store implements the recipe of
cluster.durability.recovery:

* Opening the store takes the journal's exclusive lock and restores the state from the newest
  snapshot that validates and that ``restore`` (the state's own checks) accepts; a snapshot
  whose checksums hold but whose content it refuses is skipped as a damaged file is, since the
  journal keeps the records the snapshot before it needs. That is done under the lock and
  before the journal repairs anything, so a damaged record the snapshot used already covers
  does not cost the records after it (the journal resumes past it:
  cluster.durability.journal, ``covered_seq``). ``recover`` then applies every durable journal
  record after that snapshot (``cluster.durability.recovery.recover``), and renames the newer
  snapshots it skipped to ``*.npz.corrupt``, so they do not count among the ones kept (one
  covering more than the journal held is logged as an error: what only it held is lost),
  and deletes the temporary file of a snapshot the process before it did not finish.
* ``append_encoded(events)`` buffers encoded events; ``commit()`` writes everything buffered as
  one journal commit with one write and one fdatasync (group commit): one batch record
  (engine.events.encode_batch), or as many as it takes to keep each under the journal's
  ``max_record_bytes`` (a tick that closes a million positions), which the journal keeps
  whole or drops whole. The runner commits once per batch, before it answers, so an answer is
  only ever given for changes that are on disk, and a crash mid-write leaves either all of a
  batch's changes or none of them, never a part. Recovery applies the records in order.
* ``maybe_checkpoint(snapshot_fn)`` runs after a commit: every ``snapshot_every_events``
  events journaled (or replayed) or ``snapshot_every_s`` seconds (whichever first; only if
  something was journaled) it snapshots the state. ``snapshot_fn()`` must return the
  state (arrays, meta) as it is now, in objects nothing changes later (copies, or arrays never
  written again); the file is written on a background thread (a 1M-position book is
  ~100 MB) while the actor keeps serving, and the journal segments the snapshot covers are
  trimmed on the actor's thread once it is on disk (a Journal is not thread-safe).
* ``append_only``: names of snapshot arrays the state only ever appends rows to (a history
  since the start; the runner takes them from the machine's ``APPEND_ONLY``). Each is kept in
  a rows file next to the snapshots (cluster.durability.snapshot, ``append_rows``), and a
  snapshot writes only the rows added since the snapshot it pushes out of the kept ones, into
  that one's file: a history of gigabytes would otherwise be written again, whole, every
  minute, and no two kept snapshots share a file (a damaged row costs one of them). An array
  that does not extend the one that file holds (another dtype, fewer rows, other first rows:
  a table the state wrote anew) starts a new file.
* A commit that fails poisons the journal: the store raises :class:`DurabilityError` for every
  later call, and the process must exit so Ray restarts it and it recovers from disk; with
  ``exit_on_failure=True`` (what an actor passes) the store ends the process itself.
* ``readonly=True`` (an inspection of a stopped platform, ``shardex audit --offline``) recovers
  the same way but writes nothing in the directory: the journal is read without its repair
  (a torn tail is not cut off, only not replayed), under its lock held shared (refused while a
  writer holds it, and no writer starts meanwhile), and nothing is appended, committed or
  snapshotted, not even at close.

Layout under the state's directory (``DATA_DIR/<actor name>/``)::

    journal/00000000000000000001.wal ...   checksummed records (cluster.durability.journal)
    journal/LOCK                           flock of the one writer (or of readers, shared)
    snapshots/00000000000000004242.npz     state after record 4242 (cluster.durability.snapshot)
    snapshots/history.1.rows               rows of an append-only array (one file per kept snapshot)
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from cluster.durability.journal import (
    CORRUPT_SUFFIX,
    Journal,
    JournalError,
    aside_names,
    fsync_directory,
)
from cluster.durability.recovery import Recovered, recover, trim_journal
from cluster.durability.snapshot import (
    DEFAULT_KEEP,
    Rows,
    Snapshot,
    SnapshotError,
    append_rows,
    list_snapshots,
    load_latest_snapshot,
    prune_snapshots,
    remove_temporaries,
    rows_files_of_only,
    snapshot_rows,
    snapshot_seq,
    write_snapshot,
)
from engine.events import (
    BATCH_TAG,
    batch_event_bytes,
    decode_batch,
    encode_batch,
    encode_batches,
)

log = logging.getLogger(__name__)

# the journal record codec lives with the events (engine.events); re-exported here for
# the existing importers
__all__ = ["BATCH_TAG", "DurabilityError", "JournalStore", "decode_batch", "encode_batch"]

SNAPSHOT_EVERY_EVENTS = 100_000  # events journaled between snapshots (bounds replay time)
SNAPSHOT_EVERY_S = 60.0  # and at least this often while records are written
SNAPSHOT_FAILURES_REPORTED = 3
"""Snapshots failing in a row before the host reports it (its ping: ``/healthz``, ``shardex
status``): nothing is lost, but the journal is no longer trimmed, and the replay of a restart
grows with every event; a log line alone went unseen."""
JOURNAL_DIR = "journal"
SNAPSHOT_DIR = "snapshots"
MIB = 1 << 20

SnapshotFn = Callable[[], tuple[Mapping[str, np.ndarray], Mapping[str, Any]]]

class DurabilityError(RuntimeError):
    """The journal can no longer make changes durable (I/O error): crash and recover."""


def _report_repair(journal: Journal) -> None:
    """Log what opening ``journal`` cut off: a torn last record is a crash's trace and held
    nothing acknowledged; a damaged last record (nothing valid follows it: damage that valid
    records follow is refused, JournalDamagedError) may have been acknowledged, so the operator
    hears of it; damaged records the snapshot holds cost nothing, but the medium is suspect."""
    repair = journal.repair
    where = f"journal {journal.path} (recovered to seq {journal.durable_seq})"
    if journal.readonly:  # an inspection (audit --offline): what a start will do, and why
        if repair.resumed_at:
            log.warning("%s: damaged records the snapshot at seq %d already holds; read on "
                        "from seq %d past them (read-only: nothing was changed)", where,
                        repair.resumed_at - 1, repair.resumed_at)
        if repair.torn_bytes or repair.corrupt_bytes or repair.orphaned_segments:
            log.warning("%s: a start will cut off %d bytes from a torn or damaged last record "
                        "on and set aside %d later segment(s) %s (read-only: nothing was "
                        "changed). A process stopped mid-write leaves a torn last record, which "
                        "held nothing acknowledged; other damage loses the records it holds",
                        where, repair.corrupt_bytes + repair.torn_bytes,
                        len(repair.orphaned_segments), repair.orphaned_segments)
        return
    if repair.resumed_at:
        log.warning("%s: damaged records the snapshot at seq %d already holds; resumed at "
                    "seq %d and kept every record from it on. The %d bytes of the damaged "
                    "segment(s) are in *%s files beside the segments", where,
                    repair.resumed_at - 1, repair.resumed_at, repair.covered_bytes,
                    CORRUPT_SUFFIX)
    if not repair.corrupt_bytes and not repair.orphaned_segments:
        if repair.torn_bytes:
            log.info("%s: cut off a torn last record of %d bytes, written by a process that "
                     "stopped mid-write", where, repair.torn_bytes)
        return
    log.warning("%s: a damaged record; cut off %d bytes from it on and set aside %d later "
                "segment(s) %s. The records in them are not recovered; copies are in the "
                "*%s files beside the segments", where, repair.corrupt_bytes + repair.torn_bytes,
                len(repair.orphaned_segments), repair.orphaned_segments, CORRUPT_SUFFIX)


class JournalStore:
    """Journal + snapshots of one actor state in ``directory`` (see the module docstring).

    ``restore(snapshot_or_none) -> state``: the state from a snapshot (None: a fresh one),
    raising if the snapshot's content fails the state's own checks.
    ``fsync=False`` skips the disk flush (benchmarks and tests only: survives a process kill,
    not a power loss). ``min_free_bytes``: less free space than this on the journal's disk is
    reported by :meth:`disk_problem`. ``clock`` returns seconds (monotonic); injected by tests.
    ``readonly=True``: see the module docstring. ``max_record_bytes``: the journal's bound on
    one record (a commit over it is split; None: the journal's own; tests pass a small one).
    """

    def __init__(self, directory: str | os.PathLike[str],
                 restore: Callable[[Snapshot | None], Any], *, fsync: bool = True,
                 snapshot_every_events: int = SNAPSHOT_EVERY_EVENTS,
                 snapshot_every_s: float = SNAPSHOT_EVERY_S, keep: int = DEFAULT_KEEP,
                 background_snapshots: bool = True, exit_on_failure: bool = False,
                 min_free_bytes: int = 0,
                 clock: Callable[[], float] = time.monotonic, readonly: bool = False,
                 max_record_bytes: int | None = None,
                 append_only: tuple[str, ...] = ()) -> None:
        self.directory = Path(directory)
        self.append_only = append_only
        self.min_free_bytes = min_free_bytes
        self.snapshot_dir = self.directory / SNAPSHOT_DIR
        self.snapshot_every_events = snapshot_every_events
        self.snapshot_every_s = snapshot_every_s
        self.keep = keep
        self.background_snapshots = background_snapshots
        self.exit_on_failure = exit_on_failure
        self._clock = clock
        self.readonly = readonly
        self._restore = restore
        # the snapshot picked when the journal opens and the state restored from it, for
        # recover(); how long reading and restoring took (seconds)
        self._snapshot: Snapshot | None = None
        self._state: Any = None
        self._restore_s = 0.0
        self._skipped: list[Path] = []  # newer snapshots than that one, damaged or refused
        self.journal = Journal(self.directory / JOURNAL_DIR, fsync=fsync, readonly=readonly,
                               lock_shared=readonly, max_record_bytes=max_record_bytes,
                               covered_seq=self._load_snapshot)
        # the largest encoded event a record holds: the runner rejects a command with a larger
        # one before applying it (a commit may be split between events, never inside one)
        self.max_event_bytes = batch_event_bytes(self.journal.max_record_bytes)
        _report_repair(self.journal)
        self._events: list[bytes] = []  # encoded events of the call in progress
        self._events_since_snapshot = 0
        self._failed: BaseException | None = None
        self._snapshot_seq = 0  # journal seq of the newest snapshot written (or restored)
        self._snapshot_at_s = clock()
        self._writer: threading.Thread | None = None
        self._writer_error: BaseException | None = None
        self.snapshots_written = 0
        self.snapshot_failures = 0  # in a row
        self._snapshot_error = ""
        self.recovered: Recovered[Any] | None = None
        self.recovery_s = 0.0  # how long restoring the snapshot and recover() took
        self.opened_at_s = time.time()  # wall clock when this incarnation opened the journal

    def disk_problem(self) -> str | None:
        """Why the journal's disk may soon refuse a write (less free than ``min_free_bytes``),
        or None. A full disk ends the host at its next write and Ray restarts it, which
        reads the journal back and serves again until that write: without this its health
        would look good between the restarts."""
        if self.min_free_bytes <= 0:
            return None
        try:
            fs = os.statvfs(self.directory)
        except OSError as exc:
            return f"cannot read the free space of {self.directory}: {exc}"
        free = fs.f_bavail * fs.f_frsize
        if free >= self.min_free_bytes:
            return None
        return (f"{free // MIB} MiB free on the disk of {self.directory}, below "
                f"MIN_FREE_DISK_MB ({self.min_free_bytes // MIB})")

    # ----------------------------------------------------------------- recovery
    def _load_snapshot(self) -> int:
        """Restore the state from the newest snapshot that validates and that ``restore``
        accepts (both kept for :meth:`recover`); the seq it covers (0: none)."""
        started = time.perf_counter()

        def accept(snapshot: Snapshot) -> None:
            self._state = self._restore(snapshot)

        self._snapshot = load_latest_snapshot(self.snapshot_dir, accept, self._skipped)
        self._restore_s = time.perf_counter() - started
        return 0 if self._snapshot is None else self._snapshot.seq

    def recover(self, apply_many: Callable[[Any, list[Any]], object],
                decode: Callable[[bytes], list[Any]] = decode_batch) -> Recovered[Any]:
        """Rebuild the state (cluster.durability.recovery.recover) from the one restored when
        the journal opened (a fresh one without a snapshot); call once, before serving.

        ``apply_many(state, items)`` is called once per batch after the snapshot, with the
        batch as ``decode(payload)`` returns it (a state that replays runs of events
        vectorised can decode them into arrays).
        """
        def apply_batch(state: Any, events: list[Any]) -> None:
            apply_many(state, events)
            self._events_since_snapshot += len(events)

        started = time.perf_counter()
        snapshot, state = self._snapshot, self._state
        self._snapshot = self._state = None  # the state holds what it needs of the snapshot

        def restore(given: Snapshot | None) -> Any:
            return self._restore(None) if given is None else state

        recovered = recover(self.journal, snapshot, restore, apply_batch, decode=decode)
        self._report_lost(recovered.last_seq)
        if not self.readonly:
            self._set_aside_skipped()
            # a snapshot half written by a writer that ended (the lock says none is alive):
            # else only the next snapshot written removes it, and on a disk it filled none is
            remove_temporaries(self.snapshot_dir)
        self.recovery_s = self._restore_s + time.perf_counter() - started
        self._snapshot_seq = recovered.snapshot_seq
        self.recovered = recovered
        return recovered

    def _report_lost(self, last_seq: int) -> None:
        """Log as an error each skipped snapshot that covers more than the journal held: the
        state recovered without what it alone kept (a start is not refused for it, or a
        stray file named like a snapshot would stop every start)."""
        for path in self._skipped:
            covered = snapshot_seq(path) or 0
            if covered > last_seq:
                log.error("%s: the snapshot %s was skipped and the journal ends at seq %d: "
                          "what it held of seq %d..%d is lost (the file is kept as *.corrupt)",
                          self.directory, path.name, last_seq, last_seq + 1, covered)

    def _set_aside_skipped(self) -> None:
        """Rename the snapshots recovery skipped to ``*.corrupt`` (kept for inspection), once
        it succeeded without them, and the rows files only they name (``<file>.corrupt``:
        the rows a damaged one names, whole; left under their names, the next pruning deleted
        them as named by no snapshot). Under their names the snapshots would count among the
        ones kept: the next one would delete the valid snapshot recovery used, and the
        journal trim after it the records that one needs, leaving a single usable one."""
        skipped, self._skipped = self._skipped, []
        others = [p for _, p in list_snapshots(self.snapshot_dir) if p not in skipped]
        for path in skipped:
            for aside in [*rows_files_of_only(path, others), path]:
                os.replace(aside, next(a for a in aside_names(aside) if not a.exists()))
        if skipped:
            fsync_directory(self.snapshot_dir)

    # ----------------------------------------------------------------- writing
    def append_encoded(self, encoded: list[bytes]) -> None:
        """Buffer events already encoded (engine.events.encode)."""
        self._check_writable()
        self._events.extend(encoded)

    def commit(self) -> int:
        """Make every appended event durable (one journal commit of one or more records, see
        the module docstring); returns the journal's durable seq."""
        self._check_writable()
        try:
            if self._events:
                events, self._events = self._events, []
                *parts, last = encode_batches(events, self.journal.max_record_bytes)
                for part in parts:
                    self.journal.append(part, continued=True)
                self.journal.append(last)
                self._events_since_snapshot += len(events)
            return self.journal.commit()
        except Exception as exc:  # a journal error, an event over the bound, no memory, ...
            # the events are applied in memory and now neither buffered nor surely on disk
            self._fail(exc)
            raise DurabilityError(f"journal commit failed: {exc}") from exc

    @property
    def pending(self) -> int:
        """Events appended and not yet committed."""
        return len(self._events) + self.journal.pending

    def _fail(self, exc: BaseException) -> None:
        self._failed = exc
        if self.exit_on_failure:
            # nothing in memory may be trusted or acknowledged any more: die, let Ray restart
            # the actor, which recovers exactly what reached the disk
            log.critical("journal of %s failed (%s); exiting to recover from disk",
                         self.directory, exc)
            logging.shutdown()
            os._exit(70)

    def check(self) -> None:
        """Raise DurabilityError if the journal failed (nothing may be served any more)."""
        if self._failed is not None:
            raise DurabilityError("the journal failed earlier; the state must be recovered "
                                  "from disk") from self._failed

    def _check_writable(self) -> None:
        self.check()
        if self.readonly:
            raise DurabilityError(f"the store of {self.directory} is open read-only")

    # ----------------------------------------------------------------- snapshots
    def checkpoint_due(self) -> bool:
        since = self._events_since_snapshot
        if since <= 0 or self.journal.durable_seq <= self._snapshot_seq:
            return False
        return (since >= self.snapshot_every_events
                or self._clock() - self._snapshot_at_s >= self.snapshot_every_s)

    def maybe_checkpoint(self, snapshot_fn: SnapshotFn) -> bool:
        """Snapshot when due (see the module docstring); True if one was started."""
        self._reap()
        if self._writer is not None or not self.checkpoint_due():
            return False
        self.checkpoint(snapshot_fn, wait=not self.background_snapshots)
        return True

    def checkpoint(self, snapshot_fn: SnapshotFn, wait: bool = True) -> int:
        """Snapshot the state now at the journal's last seq; returns that seq.

        Commits first (a snapshot must never hold a change whose record could still be lost).
        ``wait=False`` writes the file on a background thread; trimming happens on a later
        call once it is done (:meth:`maybe_checkpoint`, :meth:`close`).
        """
        self._check_writable()
        self.wait_snapshot()
        seq = self.commit()
        try:
            arrays, meta = snapshot_fn()
        except Exception as exc:
            self._snapshot_failed(exc)
            raise
        self._snapshot_seq = seq
        self._events_since_snapshot = 0
        self._snapshot_at_s = self._clock()
        if wait:
            try:
                self._write(seq, arrays, meta)
            except Exception as exc:
                self._written(exc)
                raise
            self._written(None)
        else:
            self._writer = threading.Thread(target=self._write_bg, args=(seq, arrays, meta),
                                            name="snapshot-writer", daemon=True)
            self._writer.start()
        return seq

    def _write(self, seq: int, arrays: Mapping[str, np.ndarray],
               meta: Mapping[str, Any]) -> None:
        base = self._evicted_rows(seq)
        inline = dict(arrays)
        rows = {name: append_rows(self.snapshot_dir, name, inline.pop(name), base.get(name))
                for name in self.append_only if name in inline}
        write_snapshot(self.snapshot_dir, seq, inline, meta, rows)
        prune_snapshots(self.snapshot_dir, self.keep)
        self.snapshots_written += 1

    def _evicted_rows(self, seq: int) -> dict[str, Rows]:
        """The rows files of the snapshot the next one (covering ``seq``) pushes out of the
        ``keep`` kept, which the next one extends ({}: fewer are kept, or its entry is
        unreadable: new files). A snapshot of ``seq`` already there is the one pushed out: the
        new one replaces it under its name (a checkpoint with nothing journaled since), and
        taking over another's file would leave two kept ones sharing it.

        So no two kept snapshots share a rows file (each kept one names its own, from the
        first one written on): a damaged row refuses only the snapshot whose file holds it,
        and recovery takes the one before, as when each held its own copy in its ``.npz``.
        Each snapshot then writes the rows added since the one it pushes out (``keep``
        snapshots' worth), not all of them; the first ``keep`` write theirs whole."""
        listed = list_snapshots(self.snapshot_dir)
        replaced = [path for covered, path in listed if covered == seq]
        if not replaced and len(listed) < self.keep:
            return {}
        try:
            return snapshot_rows(replaced[0] if replaced else listed[self.keep - 1][1])
        except SnapshotError:
            return {}

    def _write_bg(self, seq: int, arrays: Mapping[str, np.ndarray],
                  meta: Mapping[str, Any]) -> None:
        try:
            self._write(seq, arrays, meta)
        except BaseException as exc:  # reported on the actor's thread by _reap
            self._writer_error = exc

    def _reap(self) -> None:
        writer = self._writer
        if writer is None or writer.is_alive():
            return
        self._writer = None
        error, self._writer_error = self._writer_error, None
        self._written(error)

    def _written(self, error: BaseException | None) -> None:
        """After a snapshot file was written (``error`` None: trim the journal it covers) or
        failed to be."""
        if error is not None:
            self._snapshot_seq = 0
            self._snapshot_failed(error)
            return
        self.snapshot_failures = 0
        self._trim()

    def _snapshot_failed(self, error: BaseException) -> None:
        # the journal still holds everything: nothing is lost, the next one retries
        log.warning("snapshot of %s failed: %s", self.directory, error)
        self.snapshot_failures += 1
        self._snapshot_error = f"{type(error).__name__}: {error}"

    def snapshot_problem(self) -> str | None:
        """Why this store's snapshots fail (:data:`SNAPSHOT_FAILURES_REPORTED` in a row or
        more), or None."""
        if self.snapshot_failures < SNAPSHOT_FAILURES_REPORTED:
            return None
        writer = self._writer
        if writer is not None and not writer.is_alive() and self._writer_error is None:
            return None  # one written since; the count is reset as the next commit reaps it
        return (f"the last {self.snapshot_failures} snapshots of {self.directory} failed "
                f"({self._snapshot_error}): the journal keeps every event, but it is no "
                "longer trimmed and a restart replays all of it")

    def _trim(self) -> None:
        try:
            trim_journal(self.journal, self.snapshot_dir)
        except JournalError as exc:
            self._fail(exc)
            raise DurabilityError(f"journal trim failed: {exc}") from exc

    def wait_snapshot(self) -> None:
        """Block until a background snapshot write finished (and trim after it)."""
        writer = self._writer
        if writer is not None:
            writer.join()
            self._reap()

    def disk_bytes(self) -> int:
        return self.journal.disk_bytes()

    # ----------------------------------------------------------------- lifetime
    def close(self, snapshot_fn: SnapshotFn | None = None) -> None:
        """Clean stop: finish any snapshot, optionally write a final one (never when read-only),
        release the lock."""
        try:
            if snapshot_fn is not None and self._failed is None and not self.readonly \
                    and (self._events or self.journal.durable_seq > self._snapshot_seq):
                self.checkpoint(snapshot_fn, wait=True)
            else:
                self.wait_snapshot()
        finally:
            self.journal.close()
