"""The answered clientOrderIds of a ledger as one append-only snapshot table, and their store.

A snapshot listed every held answer in its JSON meta: with 1,000,000 held that took 1.1 s of
the ledger's thread, 1.1 s of the snapshot writer's and 194 MB at every snapshot, however few
were new. The table (uint8, ASCII) holds them instead, two lines per answer, in the order they
were answered::

    [user,"kind","clientOrderId",answered_ts_us,"asked as hex"]
    <the stored answer: encode_answer's text, or null>

A snapshot's table is the one before with the answers given since after it, so the durable
store writes only those bytes (``APPEND_ONLY``). Answers expire oldest first: the first
``dropped`` entries of the table are gone. A table more than half gone, or one whose written
entries changed (an answer given again, terms recorded after the answer: neither comes from
the platform's own sequence), is written anew at the next snapshot, from what is held.

Held in memory, the table is also where each written answer's text is read from: the ledger
holds a written answer as its text's place (``start << 32 | length``, an int of 32 bytes)
instead of the text (a str of about 150 bytes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, MutableMapping
from itertools import islice
from typing import Any

import numpy as np

from engine.messages import IdemKey

_LENGTH_BITS = 32
_LENGTH_MASK = (1 << _LENGTH_BITS) - 1
_NEWLINE = ord("\n")
_QUOTE, _BACKSLASH = ord('"'), ord("\\")
_OPENS, _CLOSES = b"[{", b"]}"
_MIN_BYTES = 1 << 16  # a buffer's least size (doubling from there)
_quote = json.encoder.encode_basestring_ascii
_HEAD_TYPES = [int, str, str, int, str]  # user, kind, clientOrderId, answered_us, asked

Stored = str | int | None
"""An answer as the ledger holds it: its text, its place in the table, or None (pending)."""


class AnswerLog:
    """The table of a ledger's answered clientOrderIds (module docstring), and what it knows of
    the answers given since: ``entries`` answers written (``dropped`` of them, the first ones,
    expired since), ``unwritten`` the newest answers, given since it was written, ``dirty``
    whether the next table is written anew."""

    __slots__ = ("_buffer", "_size", "dirty", "dropped", "entries", "unwritten")

    def __init__(self) -> None:
        self._buffer: np.ndarray | None = None  # uint8; its first _size bytes are the table
        self._size = 0
        self.entries = 0
        self.dropped = 0
        self.unwritten = 0
        self.dirty = False

    # ------------------------------------------------------------------ as answers change
    def answered(self) -> None:
        """A new answer was given (the newest of those held)."""
        self.unwritten += 1

    def expired(self) -> None:
        """The oldest answer held was dropped."""
        if self.entries > self.dropped:
            self.dropped += 1
        else:
            self.unwritten -= 1

    def changed(self) -> None:
        """An answer held changed in a way the table cannot follow by appending."""
        self.dirty = True

    def text(self, stored: str | int) -> str:
        """The text of an answer held as ``stored`` (its text, or its place)."""
        if isinstance(stored, str):
            return stored
        assert self._buffer is not None
        start = stored >> _LENGTH_BITS
        return self._buffer[start:start + (stored & _LENGTH_MASK)].tobytes().decode("ascii")

    def place_valid(self, stored: int) -> bool:
        """Whether ``stored`` is a place inside the table."""
        start, length = stored >> _LENGTH_BITS, stored & _LENGTH_MASK
        return stored >= 0 and length > 0 and start + length <= self._size

    def consistent(self, answered: int) -> bool:
        """Whether the counts agree with ``answered`` answers held (a dirty log counts none)."""
        return self.dirty or (0 <= self.dropped <= self.entries and self.unwritten >= 0
                              and self.entries - self.dropped + self.unwritten == answered)

    # ------------------------------------------------------------------ snapshots
    def table(self, answered: dict[IdemKey, int], answers: MutableMapping[IdemKey, Stored],
              asked: Mapping[IdemKey, bytes]) -> tuple[np.ndarray, dict[str, int]]:
        """The table (uint8[n], read-only: the snapshot's writer reads it meanwhile) and the
        meta that goes with it, of the ``answered`` (key -> answered ts, oldest first) with
        their ``answers`` and ``asked`` terms; the answers it writes are then held by place
        (``answers`` is updated).

        Only the ``unwritten`` newest are encoded. A table more than half dropped keeps the
        bytes of the others, moved to the front of a new table (one copy, and a shift of
        their places: encoding 1,000,000 again took 3.3 s); a dirty one encodes every one."""
        first = self._size
        buffer = self._buffer
        if self.dirty:
            keys: list[IdemKey] = list(answered)
            first, buffer, self.entries, self.dropped = 0, None, 0, 0
        else:
            keys = list(islice(reversed(answered), self.unwritten))[::-1]
            if 2 * self.dropped > self.entries:
                buffer = self._compacted(answered, answers)
                first = self._size
        lines: list[str] = []
        lengths: list[int] = []
        for key in keys:
            stored = answers.get(key)
            text = "null" if stored is None else self.text(stored)
            if not text.isascii() or "\n" in text:  # (not the encoder's: it writes neither)
                text = json.dumps(json.loads(text), separators=(",", ":"))
            head = (f"[{int(key.user)},{_quote(key.kind)},{_quote(key.client_order_id)},"
                    f"{int(answered[key])},\"{asked.get(key, b'').hex()}\"]")
            lines += (head, text)
            lengths += (len(head), len(text))
        data = ("\n".join(lines) + "\n").encode("ascii") if lines else b""
        # (a loaded table has no room: it is never written to, as a table given out is not)
        if buffer is None or buffer.size < first + len(data):
            buffer = self._grown(buffer, first, len(data))
        if data:
            buffer[first:first + len(data)] = np.frombuffer(data, dtype=np.uint8)
        at = first
        for n, key in enumerate(keys):
            at += lengths[2 * n] + 1
            length = lengths[2 * n + 1]
            if answers.get(key) is not None:
                answers[key] = at << _LENGTH_BITS | length
            at += length + 1
        self._buffer, self._size = buffer, first + len(data)
        self.entries += len(keys)
        self.unwritten, self.dirty = 0, False
        table = buffer[:self._size]
        table.flags.writeable = False
        return table, {"entries": self.entries, "dropped": self.dropped}

    @staticmethod
    def _grown(buffer: np.ndarray | None, size: int, more: int) -> np.ndarray:
        """A new buffer with ``buffer``'s first ``size`` bytes and room for ``more`` (and as
        many again: each byte is copied O(1) times in all)."""
        grown = np.zeros(max(2 * (size + more), _MIN_BYTES), dtype=np.uint8)
        if size:
            assert buffer is not None
            grown[:size] = buffer[:size]
        return grown

    def _compacted(self, answered: Mapping[IdemKey, int],
                   answers: MutableMapping[IdemKey, Stored]) -> np.ndarray:
        """A new buffer holding the entries not dropped, from its first byte on (``_size``
        their bytes); their places in ``answers`` move with them."""
        assert self._buffer is not None
        old = self._buffer[:self._size]
        cut = int(np.flatnonzero(old == _NEWLINE)[2 * self.dropped - 1]) + 1 \
            if self.dropped else 0
        shift = cut << _LENGTH_BITS
        for key in islice(answered, self.entries - self.dropped):  # (the table's, in order)
            stored = answers[key]
            if stored is not None:
                answers[key] = int(stored) - shift
        buffer = self._grown(old[cut:], self._size - cut, 0)
        self._size -= cut
        self.entries -= self.dropped
        self.dropped = 0
        return buffer

    @classmethod
    def load(cls, table: np.ndarray, meta: Mapping[str, Any],
             answers: MutableMapping[IdemKey, Stored], answered: MutableMapping[IdemKey, int],
             asked: MutableMapping[IdemKey, bytes], check: Callable[[Any], object]
             ) -> AnswerLog:
        """The log of a snapshot's ``table`` and ``meta`` (what :meth:`table` gave); the
        answers it holds are added, oldest first, to ``answers`` (by place), ``answered``
        and ``asked``, which hold none of them yet. ValueError for a table that is not one
        (lines that are not one JSON value each, an entry of the wrong shape, a key listed
        twice or already in ``answers``, counts that do not fit) or an answer ``check``
        raises it for (the caller says what an answer is). The texts are parsed in one go."""
        table = np.asarray(table)
        entries, dropped = meta["entries"], meta["dropped"]
        if table.dtype != np.uint8 or table.ndim != 1:
            raise ValueError("the answers table is not bytes")
        if type(entries) is not int or type(dropped) is not int \
                or not 0 <= dropped <= entries:
            raise ValueError("the answers table's counts are not counts")
        ends = np.flatnonzero(table == _NEWLINE)
        if ends.size != 2 * entries or (table.size and table[-1] != _NEWLINE):
            raise ValueError(f"the answers table holds {ends.size} lines, not {2 * entries}")
        data = table.tobytes()
        if not data.isascii():
            raise ValueError("the answers table is not ASCII")
        parsed = json.loads("[" + data.decode("ascii").replace("\n", ",")[:-1] + "]") \
            if entries else []
        if len(parsed) != 2 * entries or not _one_value_per_line(table, ends):
            raise ValueError("a line of the answers table is not one JSON value")
        places = _places(ends)
        held = len(answers)
        for head, text, place in zip(parsed[2 * dropped::2], parsed[2 * dropped + 1::2],
                                     places[dropped:], strict=True):
            if type(head) is not list or list(map(type, head)) != _HEAD_TYPES:
                raise ValueError("an entry of the answers table is not "
                                 "[user, kind, clientOrderId, answered_us, asked]")
            key = IdemKey(head[0], head[1], head[2])
            if text is not None:
                check(text)
            answers[key] = None if text is None else place
            answered[key] = head[3]
            if head[4]:
                asked[key] = bytes.fromhex(head[4])
        if len(answers) != held + entries - dropped:
            raise ValueError("a clientOrderId is listed twice among the answers")
        log = cls()
        log._buffer, log._size = table, int(table.size)
        log.entries, log.dropped = entries, dropped
        return log


def _places(ends: np.ndarray) -> list[int]:
    """The place of each entry's answer line (``start << 32 | length``) in a table whose lines
    end at ``ends`` (intp[2n], the newlines), packed as Python ints: in int64 they overflowed
    past 2**31 bytes."""
    starts, lengths = (ends[0::2] + 1).tolist(), (ends[1::2] - ends[0::2] - 1).tolist()
    return [start << _LENGTH_BITS | length
            for start, length in zip(starts, lengths, strict=True)]


def _one_value_per_line(table: np.ndarray, ends: np.ndarray) -> bool:
    """Whether each line of ``table`` (uint8, lines ending at ``ends``, that read as JSON
    values with a comma for each newline) holds one value: whether no newline is inside a
    string or a bracket. As many values as lines is not enough: a line holding two and
    another's value split over two lines count as many, and each answer's place would be
    another line's bytes."""
    quotes = np.flatnonzero(table == _QUOTE)
    slashes = np.flatnonzero(table == _BACKSLASH)  # (only in strings: the table read as JSON)
    if slashes.size and quotes.size:  # a quote after an odd run of backslashes is escaped
        starts = np.flatnonzero(np.diff(slashes, prepend=-2) != 1)
        stops = np.append(starts[1:], slashes.size)
        last, odd = slashes[stops - 1], (stops - starts) % 2 == 1
        run = np.minimum(np.searchsorted(last, quotes - 1), last.size - 1)
        quotes = quotes[~((last[run] == quotes - 1) & odd[run])]
    if (np.searchsorted(quotes, ends) % 2).any():  # (an odd count of quotes before: inside)
        return False
    brackets = np.flatnonzero(_any_of(table, _OPENS + _CLOSES))
    brackets = brackets[np.searchsorted(quotes, brackets) % 2 == 0]  # those not in strings
    depth = np.cumsum(np.where(_any_of(table[brackets], _OPENS), 1, -1))
    return not np.concatenate(([0], depth))[np.searchsorted(brackets, ends)].any()


def _any_of(array: np.ndarray, values: bytes) -> np.ndarray:
    """Where ``array`` (uint8) holds one of ``values`` (bool; np.isin took 12 times as long)."""
    found = array == values[0]
    for value in values[1:]:
        found |= array == value
    return found
