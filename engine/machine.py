"""The shape every durable state of the platform has: decide, then apply.

A state machine (the ledger, a shard) is changed only by :meth:`Machine.apply` of an event.
:meth:`Machine.decide` looks at a command and the state and returns the answer together with the
events that would carry it out, changing nothing. :func:`step` is the one place that goes from
a command to a changed state:

1. ``decide(command, now_us)`` -> ``(answer, events)``;
2. every event is encoded (engine.events); an event that does not fit its layout, or whose
   bytes exceed the journal's bound for one event, turns the whole command into a
   ``Rejected(INVALID_REQUEST)`` and nothing is applied;
3. every event is applied, in order.

The durable runner (cluster.durability.runner) journals the encoded events of a batch of
commands and commits them once before it answers; recovery applies the same events through the
same ``apply``. A read is a command that decides no events.

A machine may declare ``APPEND_ONLY``: the names of its snapshot arrays that mostly grow by
rows appended (a snapshot's array is the one before with rows after it, or one written anew);
the durable store then writes only the new rows of each (cluster.durability.store).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple, Protocol

import numpy as np

from engine.events import VOLATILE_EVENTS, Event, EventError, encode
from engine.results import Code, Rejected


class Machine(Protocol):
    """A state machine hosted by the durable runner (see the module docstring)."""

    def decide(self, command: Any, now_us: int) -> tuple[Any, Sequence[Event]]:
        """The answer to ``command`` and the events that carry it out; changes nothing."""
        ...

    def apply(self, event: Event) -> None:
        """Change the state by one event (the only code that changes it)."""
        ...

    def apply_batch(self, items: list[Any]) -> None:
        """Recovery: apply the items of one journal record, as :meth:`decode_record` gave them."""
        ...

    def decode_record(self, payload: bytes) -> list[Any]:
        """The items of one journal record (events, or vectorised runs of them)."""
        ...

    def snapshot(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """Copies of the whole state: ``(arrays, meta)`` (numpy arrays, JSON-able meta)."""
        ...

    def check(self) -> list[str]:
        """The state's invariants: a list of differences, [] when they hold."""
        ...


class SnapshotParts(Protocol):
    """A loaded snapshot (cluster.durability.snapshot.Snapshot): the ``arrays`` and ``meta`` of
    a :meth:`Machine.snapshot`, as a machine's ``restore`` reads them."""

    @property
    def arrays(self) -> Mapping[str, np.ndarray]: ...

    @property
    def meta(self) -> Mapping[str, Any]: ...


class StateCorrupted(RuntimeError):
    """``apply`` failed partway: the state in memory can no longer be trusted (a bug)."""


class Stepped(NamedTuple):
    """What :func:`step` did with one command.

    ``encoded``: the applied events' bytes (to journal); ``urgent``: whether any of them must
    be durable before the answer is given (every event but the VOLATILE_EVENTS).
    """

    answer: Any
    encoded: list[bytes]
    urgent: bool


def step(machine: Machine, command: Any, now_us: int,
         max_event_bytes: int | None = None) -> Stepped:
    """decide -> encode -> apply for one command (see the module docstring).

    ``max_event_bytes``: the largest encoded event the journal can hold (None: no bound).
    An exception from ``decide`` propagates with nothing changed. An exception from ``apply``
    is raised as :class:`StateCorrupted`: the caller must discard the state (recover it).
    """
    answer, events = machine.decide(command, now_us)
    if not events:
        return Stepped(answer, [], False)
    try:
        encoded = [encode(event) for event in events]
    except EventError as exc:
        return Stepped(Rejected(Code.INVALID_REQUEST, f"a value is out of range: {exc}"), [],
                       False)
    if max_event_bytes is not None:
        largest = max(map(len, encoded))
        if largest > max_event_bytes:  # no journal record could hold it: it never happens
            return Stepped(Rejected(Code.INVALID_REQUEST,
                                    f"an event of {largest} bytes exceeds the journal's bound "
                                    f"of {max_event_bytes}"), [], False)
    urgent = False
    try:
        for event in events:
            machine.apply(event)
            urgent = urgent or not isinstance(event, VOLATILE_EVENTS)
    except Exception as exc:
        raise StateCorrupted(f"applying {type(event).__name__} failed: {exc!r}") from exc
    return Stepped(answer, encoded, urgent)


def run(machine: Machine, command: Any, now_us: int = 0) -> Any:
    """``step`` without a journal: the answer (tests, the in-memory platform)."""
    return step(machine, command, now_us).answer
