"""Runner: the one host of a state machine (engine.machine), durable or in memory.

``execute(commands)`` is the whole write path of the ledger and of every shard:

1. each command goes through :func:`engine.machine.step` (decide -> encode -> apply), in order,
   so a command sees the effects of the ones before it in the batch; a command whose events do
   not fit their layouts, or one of which is larger than a journal record holds, was already
   turned into a rejection there and changed nothing;
2. the encoded events of the whole batch are appended to the journal and committed once (one
   commit, of as many records as the journal's bound on one takes, one fdatasync: group
   commit) when any of them must be durable, or when :data:`MAX_PENDING_EVENTS` wait
   (volatile ones, such as the prices of a shard nobody trades on: they would otherwise grow
   memory without end);
3. only then are the answers returned.

Nothing reads the state between 1 and 3 (the runner is driven by one thread at a time), and a
commit that fails ends the process when the store says so (``exit_on_failure``), so no answer
and no read ever reflects a change the disk does not hold. An ``apply`` that fails (a bug)
leaves memory untrustworthy: the runner stops serving (and ends the process under the same
rule), and recovery rebuilds the state from disk.

Recovery is the same ``apply``: newest valid snapshot, then every journal record after it
through ``machine.apply_batch``.

A runner over a read-only store (``Runner.open(..., readonly=True)``: an inspection of a stopped
platform such as ``shardex audit --offline``) recovers the same way and then steps commands the
same way, but journals nothing: their events change its memory only. That memory answers only
the inspection and ends with it; nothing it decided binds a later start, which decides again
from the disk.

Every execute leaves an :class:`ExecuteTiming` (where its time went) in a ring of the newest
:data:`TIMINGS_KEPT`, read with :meth:`Runner.timings_since`: what ``shardex bench latency``
splits a call to a host into. Keeping it costs four clock reads and a tuple per batch, not per
command.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Generic, NamedTuple, TypeVar

from cluster.durability.journal import MAX_RECORD_BYTES
from cluster.durability.snapshot import Snapshot
from cluster.durability.store import DurabilityError, JournalStore
from engine.events import batch_event_bytes
from engine.machine import Machine, StateCorrupted, step

log = logging.getLogger(__name__)

M = TypeVar("M", bound=Machine)

Build = Callable[[Snapshot | None], Any]  # restore a machine from a snapshot (None = fresh)

TIMINGS_KEPT = 4096  # executes whose timings a runner keeps (the newest)
# Volatile events kept in memory at most before they are committed on their own: one fdatasync
# per this many ticks of a shard without trading (seconds apart at a live feed's rate), and the
# newest price a restart recovers is at most this many ticks old.
MAX_PENDING_EVENTS = 1024


class Failed(NamedTuple):
    """The answer to a command whose ``decide`` raised (a bug, reported, nothing changed)."""

    error: str


class ExecuteTiming(NamedTuple):
    """Where one :meth:`Runner.execute` spent its time, in microseconds.

    ``start_us`` and ``end_us``: wall clock (``time.time_ns() // 1000``, comparable across the
    processes of one machine) when the batch began and when its answers were ready (durable);
    ``commands``: the batch's size; ``step_us``: stepping its commands (decide, encode and
    apply, which engine.machine.step interleaves per command); ``commit_us``: the journal
    append, the commit (its fdatasync) and the snapshot check (0 in memory); ``after_us``: what
    the host did with the batch after the runner answered (publishing its outbound messages;
    :meth:`Runner.note_after_us`).
    """

    start_us: int
    commands: int
    step_us: int
    commit_us: int
    end_us: int
    after_us: int = 0


def wall_clock_us() -> int:
    """Microseconds since the epoch: the one clock the core's hosts read."""
    return time.time_ns() // 1000


@contextlib.contextmanager
def collector_paused() -> Iterator[None]:
    """Python's cycle collector paused for the block (a recovery). A recovery makes millions
    of objects that all stay, and the collector, started again and again by so many new ones,
    walked them each time: 2.5 s of the 3.9 s a ledger took to restore 300,000 answers. What
    is freed meanwhile is freed as usual (reference counts); cycles wait for the end."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class Runner(Generic[M]):
    """Steps batches of commands through one machine; journals them when ``store`` is given."""

    def __init__(self, machine: M, store: JournalStore | None = None,
                 clock_us: Callable[[], int] = wall_clock_us) -> None:
        self.machine = machine
        self.store = store
        if store is not None:  # the snapshot arrays it only appends rows to (JournalStore)
            store.append_only = tuple(getattr(machine, "APPEND_ONLY", ()))
        self.clock_us = clock_us
        # in memory as well: the platform without a disk refuses what the durable one would
        self.max_event_bytes = batch_event_bytes(MAX_RECORD_BYTES) if store is None \
            else store.max_event_bytes
        self._broken: BaseException | None = None
        self.commands = 0
        self.batches = 0
        self._timings: deque[ExecuteTiming] = deque(maxlen=TIMINGS_KEPT)
        self._timed = 0  # executes timed since the start (the ring keeps the newest)

    @classmethod
    def open(cls, directory: str | os.PathLike[str], build: Build,
             clock_us: Callable[[], int] = wall_clock_us, **store_options: Any) -> Runner[Any]:
        """Recover the machine kept in ``directory`` (``build(snapshot)`` + journal replay);
        ``store_options`` go to the JournalStore (``readonly=True``: the module docstring)."""
        restored: list[Machine] = []

        def restore(snapshot: Snapshot | None) -> Machine:
            restored[:] = [build(snapshot)]  # a snapshot it raises for is skipped: not kept
            return restored[0]

        def decode(payload: bytes) -> list[Any]:  # records are read after restore()
            return restored[0].decode_record(payload)

        store = JournalStore(directory, restore, **store_options)
        try:
            with collector_paused():
                recovered = store.recover(lambda m, items: m.apply_batch(items), decode=decode)
                if store.exit_on_failure:
                    # the process is this machine's (an actor's): what the recovery built stays
                    # for its life, out of the collector's generations, which each full
                    # collection walked again (0.30 s for 1,000,000 answers held). Elsewhere a
                    # process may open it again, and a frozen closed machine's cycles would stay.
                    gc.freeze()
        except BaseException:
            store.journal.close()  # its lock too: an open that fails holds nothing
            raise
        return Runner(recovered.state, store, clock_us)

    # ----------------------------------------------------------------- the write path
    def execute(self, commands: Sequence[Any]) -> list[Any]:
        """One answer per command, in order; returned only once their events are durable."""
        self._check()
        start_ns = time.time_ns()
        now_us = self.clock_us()
        answers: list[Any] = []
        encoded: list[bytes] = []
        urgent = False
        for command in commands:
            try:
                stepped = step(self.machine, command, now_us, self.max_event_bytes)
            except StateCorrupted as exc:
                self._break(exc, "applying an event")
                raise
            except Exception as exc:  # a bug in decide: this command fails, nothing changed
                log.exception("command %s failed", type(command).__name__)
                answers.append(Failed(f"{type(exc).__name__}: {exc}"))
                continue
            answers.append(stepped.answer)
            if stepped.encoded:
                encoded.extend(stepped.encoded)
                urgent = urgent or stepped.urgent
        self.commands += len(commands)
        self.batches += 1
        stepped_ns = time.time_ns()
        # a read-only store (an inspection) journals nothing: the events change memory only
        store = self.store if self.store is not None and not self.store.readonly else None
        if store is not None:
            try:
                if encoded:
                    store.append_encoded(encoded)
                if urgent or store.pending >= MAX_PENDING_EVENTS:
                    store.commit()
                    self._maybe_checkpoint(store)
            except DurabilityError as exc:  # memory holds what the disk may not: stop
                self._broken = exc
                raise
            except Exception as exc:  # the same, failing on the way to the store
                self._break(exc, "journaling a batch")
                raise
        end_ns = time.time_ns()
        self._timings.append(ExecuteTiming(
            start_ns // 1000, len(commands), (stepped_ns - start_ns) // 1000,
            (end_ns - stepped_ns) // 1000 if store is not None else 0, end_ns // 1000))
        self._timed += 1
        return answers

    def _maybe_checkpoint(self, store: JournalStore) -> None:
        """A snapshot when one is due. The batch is committed and applied by now, so a snapshot
        that cannot be taken (say, memory for the copy) fails only itself: the journal keeps
        every event, and the next due batch tries again."""
        try:
            store.maybe_checkpoint(self.machine.snapshot)
        except DurabilityError:
            raise
        except Exception:
            log.exception("snapshot failed; the journal still holds every event")

    # ----------------------------------------------------------------- timings
    def note_after_us(self, after_us: int) -> None:
        """Record what the host spent on the last batch after the runner answered it."""
        if self._timings:
            self._timings[-1] = self._timings[-1]._replace(after_us=after_us)

    def timings_since(self, since: int = 0) -> tuple[int, list[ExecuteTiming]]:
        """``(count, timings)``: how many executes were timed so far, and the timings of those
        after the first ``since`` (a count an earlier call returned; 0: every one kept), oldest
        first; only the newest :data:`TIMINGS_KEPT` are kept, so a reader that waited longer
        misses the ones in between."""
        count, kept = self._timed, len(self._timings)
        newer = min(kept, max(0, count - since))
        return count, list(itertools.islice(self._timings, kept - newer, kept))

    def _check(self) -> None:
        """Refuse to serve (reads included) once memory may hold what the disk does not."""
        if self._broken is not None:
            raise DurabilityError("the state failed earlier and must be recovered") \
                from self._broken
        if self.store is not None:
            self.store.check()

    def _break(self, exc: BaseException, what: str) -> None:
        self._broken = exc
        log.critical("state machine failed while %s: %s", what, exc)
        if self.store is not None and self.store.exit_on_failure:
            logging.shutdown()
            os._exit(70)

    # ----------------------------------------------------------------- lifetime
    def checkpoint(self) -> int:
        """Snapshot now (waits for the file); returns the journal seq it covers (0 in memory)."""
        self._check()
        if self.store is None:
            return 0
        return self.store.checkpoint(self.machine.snapshot, wait=True)

    def problem(self) -> str | None:
        """Why this runner may not take writes, or should be looked at (it failed and waits to
        be recovered, its journal's disk is nearly full, its snapshots keep failing), or
        None."""
        if self._broken is not None:
            return f"failed ({self._broken}); waiting to be recovered"
        if self.store is None:
            return None
        return self.store.disk_problem() or self.store.snapshot_problem()

    def journal_bytes(self) -> int:
        return 0 if self.store is None else self.store.disk_bytes()

    def recovery_s(self) -> float:
        return 0.0 if self.store is None else self.store.recovery_s

    def close(self) -> None:
        """Clean stop: a final snapshot (fast restart; none when read-only), release the
        journal."""
        if self.store is not None:
            self.store.close(self.machine.snapshot if self._broken is None else None)
