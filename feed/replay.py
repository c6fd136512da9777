"""The replay source: a jsonl file of raw Backpack frames (e.g. a recording), played back.

Frames go through the same :class:`feed.frames.FrameNormalizer` as live ones. Timing follows the
recorded engine time ``T`` divided by ``speed`` (``0`` = as fast as possible), except that two
consecutive frames more than :data:`MAX_REPLAY_GAP_US` apart (either way) are played one after
the other: one frame stamped years off would otherwise hold every later price back that long.
A looped round lasts the recording's range of (played) times, at least
:data:`MIN_ROUND_US`. ``ts_us`` is re-stamped with the wall-clock time of playback: a recording
from last month would otherwise be refused by the engine as stale. ``seq`` keeps the recorded
update id (shifted up on each loop so it never goes backwards).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from engine.assets import AssetRegistry
from feed.frames import MAX_FRAME_BYTES, ErrorFrame, FrameNormalizer
from feed.message import MarketDataMessage

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


def parse_replay(lines: Iterable[str | bytes], normalizer: FrameNormalizer) -> list[ReplayItem]:
    """The valid bookTicker updates of a jsonl recording, in file order (blank lines skipped)."""
    items: list[ReplayItem] = []
    for line in lines:
        if not line.strip():
            continue
        out = normalizer.feed(line)
        if isinstance(out, MarketDataMessage):
            items.append(ReplayItem(out.ts_us, out))
        elif isinstance(out, ErrorFrame):
            log.warning("replay: error frame in recording: %s %s", out.code, out.message)
    return items


def bounded_lines(fh: BinaryIO, max_bytes: int = MAX_FRAME_BYTES) -> Iterator[bytes]:
    """The lines of ``fh``, each read in at most ``max_bytes + 1`` bytes: of a longer line only
    that much is yielded (the normalizer drops it as ``oversized``) and the rest is skipped
    unkept, so memory never holds more of a line than a frame may be."""
    while line := fh.readline(max_bytes + 1):
        if len(line) > max_bytes and not line.endswith(b"\n"):
            while (rest := fh.readline(_SKIP_CHUNK)) and not rest.endswith(b"\n"):
                pass
        yield line


def play_times(recorded_us: list[int]) -> list[int]:
    """When each frame plays (µs of recorded time from the first frame): the recorded offsets,
    except that a step of more than :data:`MAX_REPLAY_GAP_US` between consecutive frames
    starts a new stretch right after the latest time played so far."""
    out: list[int] = []
    base_rec, base_play, top, prev = recorded_us[0], 0, 0, recorded_us[0]
    for rec in recorded_us:
        if abs(rec - prev) > MAX_REPLAY_GAP_US:
            base_rec, base_play = rec, top
        played = base_play + rec - base_rec
        out.append(played)
        top = max(top, played)
        prev = rec
    return out


class ReplaySource:
    """Play ``path`` at ``speed`` x the recorded pace; ``loop`` starts over at the end.
    ValueError when the path is not a regular file, is not UTF-8 text, or holds no valid update
    of ``assets``."""

    name = "replay"

    def __init__(self, path: str | Path, assets: AssetRegistry, speed: float = 1.0,
                 loop: bool = False) -> None:
        if speed < 0:
            raise ValueError("replay speed must be >= 0")
        self.path = Path(path)
        self.normalizer = FrameNormalizer(assets, source="replay")
        self.items = self._load()
        if not self.items:  # refused at start: a platform with no price would trade nothing
            raise ValueError(f"replay: {self.path} holds no valid bookTicker frame of "
                             f"{','.join(assets)}")
        self.play_us = play_times([i.at_us for i in self.items])
        # a round lasts the recording's range of times: its last frame may be older than its
        # first (recordings joined), and a round from first to last would then last nothing
        self.round_us = max(max(self.play_us) - min(self.play_us) + 1, MIN_ROUND_US)
        self.speed = speed
        self.loop = loop
        self.emitted = 0

    def _load(self) -> list[ReplayItem]:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise ValueError(f"replay: {self.path} is not a regular file")
        os.set_blocking(fd, True)
        with os.fdopen(fd, "rb") as fh:
            return parse_replay(self._text_lines(fh), self.normalizer)

    def _text_lines(self, fh: BinaryIO) -> Iterator[str]:
        for number, line in enumerate(bounded_lines(fh), 1):
            try:
                yield line.decode("utf-8")
            except UnicodeDecodeError:
                if len(line) > MAX_FRAME_BYTES:  # cut mid-character: dropped as oversized
                    yield line.decode("utf-8", "replace")
                    continue
                raise ValueError(f"replay: {self.path} is not UTF-8 text (line {number})")\
                    from None

    def stats(self) -> dict[str, object]:
        return {"emitted": self.emitted, "frames": self.normalizer.stats()}

    async def stream(self, stop: asyncio.Event) -> AsyncIterator[MarketDataMessage]:
        seq_span = max(i.message.seq for i in self.items) - min(i.message.seq for i in self.items)
        start_mono = time.monotonic()
        rounds = 0
        while not stop.is_set():
            for item, played_us in zip(self.items, self.play_us, strict=True):
                offset_us = played_us + rounds * self.round_us
                if self.speed > 0:
                    delay = start_mono + offset_us / 1e6 / self.speed - time.monotonic()
                    if delay > 0:
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), delay)
                if stop.is_set():
                    return
                msg = item.message
                self.emitted += 1
                yield replace(msg, ts_us=time.time_ns() // 1000,
                              seq=msg.seq + rounds * (seq_span + 1))
            if not self.loop:
                return
            rounds += 1
