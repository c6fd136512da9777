"""The replay source: a jsonl file of raw Backpack frames (e.g. a recording), played back.

The file is read, parsed and published as it goes (a day of frames is gigabytes held whole):
what playback holds does not grow with the recording, and a looped round reads the file again
from its start. The file is opened once, when the source is made, and that open file is played
(a recording replaced or changed on disk later is not read from its path again).

Frames go through the same :class:`feed.frames.FrameNormalizer` as live ones. Timing follows the
recorded engine time ``T`` divided by ``speed`` (``0`` = as fast as possible), except that two
consecutive frames more than :data:`MAX_REPLAY_GAP_US` apart (either way) are played one after
the other: one frame stamped years off would otherwise hold every later price back that long.
A looped round lasts the round's range of (played) times, at least :data:`MIN_ROUND_US`.
``ts_us`` is re-stamped with the wall-clock time of playback: a recording from last month would
otherwise be refused by the engine as stale. ``seq``: the first round keeps the recorded update
ids; each later round numbers its frames one by one on from the highest ``seq`` sent, so a loop
never passes ``SEQ_LIMIT - 1`` and goes backwards only where the numbering starts over at 0
past it (only a recording whose own ids reach that far gets there; each tick's fresh ``ts_us``
still orders it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import stat
import time
import weakref
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from engine.assets import AssetRegistry
from feed.frames import MAX_FRAME_BYTES, ErrorFrame, FrameNormalizer
from feed.message import MarketDataMessage
from feed.settings import SEQ_LIMIT

log = logging.getLogger(__name__)

# Recorded time between two consecutive frames beyond which they are played without a pause
# (a gap in the recording, or a corrupt ``T``): longer than any quiet spell of a bookTicker
# stream, and over MAX_PRICE_AGE_S, so a real pause still shows as stale prices.
MAX_REPLAY_GAP_US = 60_000_000
# Shortest looped round (recorded time): a recording of one moment repeats once a second at
# speed 1, not as fast as the loop can go.
MIN_ROUND_US = 1_000_000
_SKIP_CHUNK = 1 << 16  # bytes read at a time while skipping the rest of an overlong line


@dataclass(frozen=True, slots=True)
class ReplayItem:
    """One valid update of a recording: ``at_us`` = recorded time, ``message`` as recorded."""

    at_us: int
    message: MarketDataMessage


def replay_items(lines: Iterable[str | bytes], normalizer: FrameNormalizer, *,
                 log_errors: bool = True) -> Iterator[ReplayItem]:
    """The valid bookTicker updates of jsonl ``lines``, in order, as they are read (blank lines
    skipped; the others counted by ``normalizer``). ``log_errors``: log each error frame."""
    for line in lines:
        if not line.strip():
            continue
        out = normalizer.feed(line)
        if isinstance(out, MarketDataMessage):
            yield ReplayItem(out.ts_us, out)
        elif isinstance(out, ErrorFrame) and log_errors:
            log.warning("replay: error frame in recording: %s %s", out.code, out.message)


def bounded_lines(fh: BinaryIO, max_bytes: int = MAX_FRAME_BYTES) -> Iterator[bytes]:
    """The lines of ``fh``, each read in at most ``max_bytes + 1`` bytes: of a longer line only
    that much is yielded (the normalizer drops it as ``oversized``) and the rest is skipped
    unkept, so memory never holds more of a line than a frame may be."""
    while line := fh.readline(max_bytes + 1):
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (rest := fh.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                pass
        yield line


class PlayClock:
    """When each frame of a round plays, one frame at a time (state: a few integers).

    ``next(recorded_us)`` -> µs of recorded time from the round's first frame: the recorded
    offset, except that a step of more than :data:`MAX_REPLAY_GAP_US` between consecutive frames
    starts a new stretch right after the latest time played so far. ``range_us``: from the
    earliest to the latest time played, + 1 (0 before a frame).
    """

    def __init__(self) -> None:
        self.frames = 0
        self._base_rec = self._base_play = self._prev = 0
        self._top = self._bottom = 0

    def next(self, recorded_us: int) -> int:
        if self.frames == 0:
            self._base_rec = self._prev = recorded_us
        elif abs(recorded_us - self._prev) > MAX_REPLAY_GAP_US:
            self._base_rec, self._base_play = recorded_us, self._top
        played = self._base_play + recorded_us - self._base_rec
        self._top = max(self._top, played)
        self._bottom = min(self._bottom, played)
        self._prev = recorded_us
        self.frames += 1
        return played

    @property
    def range_us(self) -> int:
        return self._top - self._bottom + 1 if self.frames else 0


class ReplaySource:
    """Play ``path`` at ``speed`` x the recorded pace; ``loop`` starts over at the end.

    The file is opened here and read up to its first valid update: ValueError when the path is
    not a regular file, holds no valid update of ``assets``, or a line before that one is not
    UTF-8 text (a later such line is dropped as ``malformed``). Playback reads on from there,
    holding one line at a time. ``close()`` closes the file (also done when the source is
    collected).
    """

    name = "replay"

    def __init__(self, path: str | Path, assets: AssetRegistry, speed: float = 1.0,
                 loop: bool = False) -> None:
        if speed < 0:
            raise ValueError("replay speed must be >= 0")
        self.path = Path(path)
        self.assets = assets
        self.normalizer = FrameNormalizer(assets, source="replay")
        self.speed = speed
        self.loop = loop
        self.emitted = 0
        self._fh = self._open()
        self._closer = weakref.finalize(self, self._fh.close)
        try:
            first = self._first_item()
        except BaseException:
            self.close()
            raise
        if first is None:  # refused at start: a platform with no price would trade nothing
            self.close()
            raise ValueError(f"replay: {self.path} holds no valid bookTicker frame of "
                             f"{','.join(assets)}")
        # played first by the next stream, which reads on after it (the file is read once)
        self._first: ReplayItem | None = first

    def _open(self) -> BinaryIO:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"replay: {self.path} is not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")

    def _first_item(self) -> ReplayItem | None:
        for number, line in enumerate(bounded_lines(self._fh), 1):
            if len(line) <= MAX_FRAME_BYTES:  # one cut mid-character is dropped as oversized
                try:
                    line.decode("utf-8")
                except UnicodeDecodeError:
                    raise ValueError(f"replay: {self.path} is not UTF-8 text (line {number})")\
                        from None
            for item in replay_items((line,), self.normalizer):
                return item
        return None

    def close(self) -> None:
        """Close the recording (a stream started later fails)."""
        self._closer()

    def stats(self) -> dict[str, object]:
        return {"emitted": self.emitted, "frames": self.normalizer.stats()}

    def _round(self) -> Iterator[ReplayItem]:
        """The updates of one round, read as they are played. The first round after the
        source is made reads on after the update read when it was made, counted in
        ``normalizer``; a later one reads the file again from its start with a normalizer of its
        own, so each line is counted once, however many rounds play it."""
        if self._first is not None:
            first, self._first = self._first, None
            return itertools.chain((first,), replay_items(bounded_lines(self._fh),
                                                          self.normalizer))
        self._fh.seek(0)
        again = FrameNormalizer(self.assets, source="replay")
        return replay_items(bounded_lines(self._fh), again, log_errors=False)

    async def stream(self, stop: asyncio.Event) -> AsyncIterator[MarketDataMessage]:
        start_mono = time.monotonic()
        round_start_us = 0  # recorded time from the first frame played to this round's start
        next_seq: int | None = None  # in a later round: the seq of its next frame
        top_seq = -1
        while not stop.is_set():
            clock = PlayClock()
            for item in self._round():
                offset_us = round_start_us + clock.next(item.at_us)
                if self.speed > 0:
                    delay = start_mono + offset_us / 1e6 / self.speed - time.monotonic()
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
                if next_seq is None:
                    seq = item.message.seq
                    top_seq = max(top_seq, seq)
                else:
                    seq, next_seq = next_seq, (next_seq + 1) % SEQ_LIMIT
                self.emitted += 1
                yield replace(item.message, ts_us=time.time_ns() // 1000, seq=seq)
            if not self.loop:
                return
            if clock.frames == 0:  # the file changed since: a loop of nothing would spin
                log.error("replay: %s holds no valid bookTicker frame any more; replay ends",
                          self.path)
                return
            round_start_us += max(clock.range_us, MIN_ROUND_US)
            if next_seq is None:
                next_seq = (top_seq + 1) % SEQ_LIMIT
