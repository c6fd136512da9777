"""The journal: an append-only, checksummed, segmented record log with group commit.

A journal is a directory of segment files named by the sequence number of their first record
(``00000000000000000001.wal``). Each record is framed as::

    [u32 payload length][u32 crc32(seq field || payload)][u64 seq field][payload bytes]

(little-endian). The seq field is the record's seq, with :data:`CONTINUED` set when the next
record belongs to the same commit. Sequence numbers start at 1 and increase by exactly one per
record across segments, so the name of a segment plus its records always tell where the log
stands, even when a snapshot let every older segment be deleted.

Durability model: :meth:`Journal.append` only buffers a record in memory and returns its seq;
:meth:`Journal.commit` writes everything buffered since the last commit with one ``write`` and
one ``fdatasync`` (group commit: a batch of requests costs one disk flush). A caller
acknowledges a request only after the commit that covers its records has returned. A commit is
kept whole or not at all: records appended with ``continued=True`` count only together with
the record that ends their commit (a batch larger than one record's bound is several records,
and a crash must not leave a part of it).

Zeroed ahead: the active segment is extended with zeros :data:`ZEROED_AHEAD_BYTES` at a time,
and records overwrite them. A flush of an append that grows a file must also commit the file
system's metadata (its size, its new blocks); an overwrite of written blocks flushes only the
data, which takes less time and less CPU (the README has the figures). So the active segment
ends in zeros after its last record: a clean end, which a reader stops at as it does at the end
of a file (no record has an all-zero header: seqs start at 1). A commit that reaches past the
zeros writes the next zeros first, over its records' place as well, so a full disk refuses
zeros (a clean end) and never leaves a part of a record. A segment rolled over, or the
active one when the journal closes, is cut to its records.

Crash model: a process killed at any instant leaves at most one torn (partially written) tail.
Opening the journal for writing scans it, keeps every record up to the first one that is
incomplete, fails its checksum or breaks the seq chain, and truncates the segment there, so a
torn record is dropped whole and never applied in part; so are the records before it that
belong to its commit (a commit's pages may reach the disk in any order before its flush). The
bytes cut off are first copied aside to a ``.corrupt`` file, as are later segments left
without records to keep, so nothing is silently destroyed. That is for a torn last write: the
damage (an incomplete record, one that fails its checksum, a break in the chain) is cut only if
no valid record follows it, in its segment or a later one. A crash tears only its last write;
records after damage were acknowledged (a damaged length field mid-file announces an end past
them, as a torn record does), so the journal refuses to open (:class:`JournalDamagedError`,
naming the file and the byte) rather than cut them off. Damage in records a snapshot already
holds is the exception (``covered_seq``): the journal resumes at the first record after the
snapshot and keeps what follows, since cutting there would lose acknowledged records that are
intact. A failed write or fsync poisons the journal: the page cache may have dropped the data,
so retrying would be a lie; the owner must crash and recover from disk.

Only one writer may hold a journal (an exclusive ``flock`` on ``LOCK``); readers open it with
``readonly=True``, which never writes and stops at the first bad record (past damage a snapshot
covers, it reads on from where a writer would resume; damage a writer refuses, it refuses). A
reader that must see a journal no writer is using (an inspection of a stopped platform) also
passes ``lock_shared=True``: it holds ``LOCK`` shared, so it is refused while a writer holds the
journal and a writer is refused while it reads.
"""

from __future__ import annotations

import contextlib
import fcntl
import itertools
import os
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

SEGMENT_SUFFIX = ".wal"
CORRUPT_SUFFIX = ".corrupt"
LOCK_NAME = "LOCK"
# [u32 length][u32 crc][u64 seq]
HEADER = struct.Struct("<IIQ")
HEADER_BYTES = HEADER.size
_SEQ = struct.Struct("<Q")
CONTINUED = 1 << 63
"""Set in a record's seq field when the next record belongs to the same commit (seqs never
reach it); the checksum covers it."""
_SEQ_BITS = CONTINUED - 1
# A record larger than this is treated as garbage when scanning (a corrupted length field must
# not make the scanner trust gigabytes of whatever follows); a writer may keep to less.
MAX_RECORD_BYTES = 64 * 1024 * 1024
DEFAULT_SEGMENT_BYTES = 64 * 1024 * 1024
ZEROED_AHEAD_BYTES = 1024 * 1024
"""How far past its last record the active segment is zeroed, when a commit reaches the zeros'
end (at most up to ``segment_bytes``)."""
_ZEROS = memoryview(bytes(ZEROED_AHEAD_BYTES))

_crc32 = zlib.crc32
_pack_header = HEADER.pack
_pack_seq = _SEQ.pack
_fdatasync = getattr(os, "fdatasync", os.fsync)


class JournalError(Exception):
    """The journal cannot do what was asked: poisoned by an I/O error, locked, closed, or a gap."""


class JournalLockedError(JournalError):
    """Another process holds this journal: a writer, or a reader holding it shared."""


class JournalGapError(JournalError):
    """Records that were asked for are no longer in the journal (deleted after a snapshot)."""


class JournalDamagedError(JournalError):
    """Damage that valid records follow: not a crash's torn last write, and the records after
    it were acknowledged, so the journal refuses to open rather than cut them off."""


@dataclass(slots=True)
class Repair:
    """What opening the journal had to cut off (all zero for a clean log).

    ``torn_bytes``: an incomplete last record (the normal trace of a crash mid-write), up to
    its announced end (the segment's zeros after it are not counted).
    ``corrupt_bytes``: a complete but invalid record and everything after it.
    Both are copied aside to ``<segment>.<offset>.corrupt`` before being cut off.
    ``orphaned_segments``: later segment files that no longer continued the chain, set aside
    (only ones without a record past the snapshot: else the journal refuses to open).
    ``resumed_at``: the seq the journal resumed at past damage that a snapshot covers (0:
    none); ``covered_bytes``: the bytes of the segments that held the damage, set aside whole.
    """

    torn_bytes: int = 0
    corrupt_bytes: int = 0
    orphaned_segments: list[str] = field(default_factory=list)
    resumed_at: int = 0
    covered_bytes: int = 0

    def count_cut(self, tail: str, cut_bytes: int) -> None:
        """Count ``cut_bytes`` of a last record that ``_scan`` found ``tail`` (``torn`` or
        damaged)."""
        if tail == "torn":
            self.torn_bytes += cut_bytes
        else:
            self.corrupt_bytes += cut_bytes

    @property
    def clean(self) -> bool:
        return self.torn_bytes == 0 and self.corrupt_bytes == 0 and not self.orphaned_segments \
            and not self.resumed_at


def frame(seq: int, payload: bytes, continued: bool = False) -> bytes:
    """One record exactly as it is stored (header + payload); ``continued``: the next record
    belongs to the same commit."""
    field = seq | CONTINUED if continued else seq
    return _pack_header(len(payload), _crc32(payload, _crc32(_pack_seq(field))), field) + payload


def _segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}{SEGMENT_SUFFIX}"


def file_number(path: Path, suffix: str) -> int | None:
    """The number a file named ``<20 digits><suffix>`` (a segment, a snapshot) carries, or
    None for another name."""
    stem = path.name[: -len(suffix)]
    if not path.name.endswith(suffix) or len(stem) != 20 or not stem.isdigit():
        return None
    return int(stem)


def numbered_files(directory: str | os.PathLike[str], suffix: str) -> list[tuple[int, Path]]:
    """``(number, path)`` of every file of ``directory`` that :func:`file_number` names, by
    number ([] when there is no such directory). Anything else under such a name (a
    directory, say) is left out."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted((n, p) for p in directory.iterdir()
                  if (n := file_number(p, suffix)) is not None and p.is_file())


def _frames(view: memoryview, expected_seq: int, end_seq: int | None = None
            ) -> Iterator[tuple[int, int, int, bool]]:
    """``(seq, payload_start, payload_end, continued)`` of each valid record of one segment's
    bytes, in order, from the start; stops at the first record that is incomplete, too large,
    out of the seq chain or fails its checksum (and after ``end_seq``)."""
    size = len(view)
    pos = 0
    unpack = HEADER.unpack_from
    while size - pos >= HEADER_BYTES and (end_seq is None or expected_seq <= end_seq):
        length, crc, field = unpack(view, pos)
        start = pos + HEADER_BYTES
        end = start + length
        if length > MAX_RECORD_BYTES or end > size or field & _SEQ_BITS != expected_seq \
                or _crc32(view[start:end], _crc32(_pack_seq(field))) != crc:
            return
        yield expected_seq, start, end, field != expected_seq
        expected_seq += 1
        pos = end


def _records(view: memoryview, expected_seq: int, end_seq: int | None = None
             ) -> Iterator[tuple[int, int, int]]:
    """``(seq, payload_start, payload_end)`` of each record of one segment's bytes whose whole
    commit is valid (:func:`_frames`), in order, from the start."""
    commit: list[tuple[int, int, int]] = []
    for seq, start, end, continued in _frames(view, expected_seq, end_seq):
        commit.append((seq, start, end))
        if not continued:
            yield from commit
            commit.clear()


def _zeros(data: bytes, start: int) -> bool:
    """Whether every byte of ``data`` from ``start`` on is zero."""
    return start >= len(data) or data.count(0, start) == len(data) - start


def _scan(data: bytes, expected_seq: int) -> tuple[int, int, str, int]:
    """Walk the valid prefix of one segment's bytes.

    Returns ``(good_end, next_seq, tail, tail_end)``: the byte offset just past the last valid
    record, the seq the next record must carry, what follows it: ``"end"`` (nothing, or only
    the zeros of a segment zeroed ahead), ``"torn"`` (a record merely incomplete: its header or
    the payload it announces is cut off, or it ends in the zeros it was written over, or the
    records of a commit end before the one that ends it) or ``"corrupt"`` (a record complete
    but wrong, and whatever follows), and where the bytes that tail holds end: for a torn one,
    the torn record's announced end (only zeros follow it: the segment's, zeroed ahead), else
    the end of ``data``. The records of a commit that does not end are not valid.
    """
    view = memoryview(data)
    good_end = valid_end = 0
    next_seq = expected_seq
    for seq, _, end, continued in _frames(view, expected_seq):
        valid_end = end
        if not continued:
            good_end, next_seq = end, seq + 1
    rest = len(view) - valid_end
    if _zeros(data, valid_end):  # after records of an unfinished commit: its rest never came
        if valid_end == good_end:
            return good_end, next_seq, "end", good_end
        return good_end, next_seq, "torn", valid_end
    length = HEADER.unpack_from(view, valid_end)[0] if rest >= HEADER_BYTES else 0
    torn = rest < HEADER_BYTES or (length <= MAX_RECORD_BYTES and (
        HEADER_BYTES + length > rest or _zeros(data, valid_end + HEADER_BYTES + length)))
    if not torn:
        return good_end, next_seq, "corrupt", len(data)
    return good_end, next_seq, "torn", min(len(data), valid_end + HEADER_BYTES + length)


def _valid_at(data: bytes, pos: int) -> bool:
    """Whether a whole record that passes its checksum starts at byte ``pos`` of ``data``
    (whatever its seq)."""
    length, crc, field = HEADER.unpack_from(data, pos)
    end = pos + HEADER_BYTES + length
    return length <= MAX_RECORD_BYTES and end <= len(data) \
        and _crc32(memoryview(data)[pos + HEADER_BYTES:end], _crc32(_pack_seq(field))) == crc


def _find_records(data: bytes, seq: int, start: int) -> list[int]:
    """The offsets of the valid records with ``seq`` (either flag) in ``data`` from ``start``
    on, however the bytes around them look, in order. Some may be bytes inside a payload that
    happen to frame a valid record (client text can hold anything)."""
    found: list[int] = []
    for seq_field in (seq, seq | CONTINUED):
        needle = _pack_seq(seq_field)
        at = data.find(needle, start + HEADER_BYTES - _SEQ.size)
        while at >= 0:
            pos = at - (HEADER_BYTES - _SEQ.size)
            if _valid_at(data, pos):
                found.append(pos)
            at = data.find(needle, at + 1)
    return sorted(found)


FOLLOWING_SEQS = 4096
"""How many seqs past a damaged record :func:`_followed` looks for (a stretch of damage that
hides more records than that is taken for a torn tail)."""


def _followed(data: bytes, start: int, seq: int, floor: int) -> bool:
    """Whether, past the damage that ends the valid records of ``data`` from ``start`` on
    (``seq`` the first), a valid record with a seq from ``floor`` on (up to
    :data:`FOLLOWING_SEQS` past the damaged one) lies before the zeros ``data`` ends in."""
    at = start
    for last, _, end, _ in _frames(memoryview(data)[start:], seq):
        seq, at = last + 1, start + end
    first = max(seq, floor)
    stop = min(len(data), at + len(data[at:].rstrip(b"\0")) + _SEQ.size)  # a seq is not 0
    found = [np.empty(0, np.intp)]
    for field_at in range(at + HEADER_BYTES - _SEQ.size, min(at + HEADER_BYTES, stop - 7)):
        fields = np.frombuffer(data, "<u8", (stop - field_at) // 8, field_at)  # each alignment
        hits = (fields & np.uint64(_SEQ_BITS)) - np.uint64(first) < FOLLOWING_SEQS
        found.append(np.flatnonzero(hits) * 8 + field_at - (HEADER_BYTES - _SEQ.size))
    return any(_valid_at(data, pos) for pos in np.sort(np.concatenate(found)).tolist())


def _holds_records(segments: list[tuple[int, Path]], floor: int) -> bool:
    """Whether any of ``segments`` holds a valid record with a seq from ``floor`` on."""
    return any(_scan(p.read_bytes(), base)[1] > max(base, floor) for base, p in segments)


def _damaged(path: Path, at: int, seq: int) -> JournalDamagedError:
    return JournalDamagedError(
        f"journal {path} is damaged at byte {at} (record {seq}) and valid records follow it: "
        f"not the torn last write of a crash, so nothing was cut off; restore the journal, or "
        f"set aside by hand what follows byte {at} to drop the records from {seq} on")


def _write_at(fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
    """All of ``data`` into file ``fd`` at ``offset``."""
    view = memoryview(data)
    written = 0
    while written < len(view):
        written += os.pwrite(fd, view[written:], offset + written)


def lock_holders(path: str | os.PathLike[str]) -> list[str]:
    """Who holds an ``flock`` on ``path``: ``"pid N (command line)"`` for each lock Linux lists
    in ``/proc/locks`` (the process that took it), [] where that cannot be read."""
    try:
        st = os.stat(path)
        with open("/proc/locks") as f:
            lines = f.read().splitlines()
    except OSError:
        return []
    # a lock line: "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF" (device in hex)
    device = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    return [f"pid {fields[4]}{_command_of(fields[4])}" for fields in map(str.split, lines)
            if len(fields) >= 6 and fields[1] == "FLOCK" and fields[5] == device]


def _command_of(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            command = " ".join(f.read().replace(b"\0", b" ").decode(errors="replace").split())
    except OSError:
        return ""
    return f" ({command[:120]})" if command else ""


def _held_by(path: Path) -> str:
    holders = lock_holders(path)
    return f": {', '.join(holders)}" if holders else ""


def fsync_directory(directory: str | os.PathLike[str]) -> None:
    """Flush a directory's entries (new, renamed or deleted files) to disk."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_whole(path: Path, data: bytes | memoryview) -> None:
    """``data`` in ``path``, whole or not at all and durable: written beside it, fsynced,
    renamed over it, and the directory fsynced (a crash leaves the old file or the new one,
    never a torn one)."""
    temp = path.with_name(path.name + ".tmp")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    finally:
        with contextlib.suppress(OSError):
            temp.unlink()
    fsync_directory(path.parent)


def aside_names(path: Path, tag: str = "") -> Iterator[Path]:
    """Names beside ``path`` for a copy of it set aside, in the order to try them:
    ``<name><tag>.corrupt``, then ``<name><tag>.1.corrupt``, ... (never over an earlier copy)."""
    for n in itertools.count():
        yield path.with_name(f"{path.name}{tag}{f'.{n}' if n else ''}{CORRUPT_SUFFIX}")


def create_directory(directory: str | os.PathLike[str]) -> Path:
    """``mkdir -p`` whose entries are durable, the ones it finds as well as the ones it makes:
    a process killed between a ``mkdir`` and the flush of its parent leaves an entry the disk
    may not keep, which the next one finds and writes under. So every level's parent is
    flushed, up to the root (one this process cannot open or flush, such as an ancestor it may
    not read or one on a read-only mount, is skipped unless it made an entry in it)."""
    path = Path(directory)
    levels = [path.absolute(), *path.absolute().parents]
    made_in = {level.parent for level in levels if not level.exists()}
    path.mkdir(parents=True, exist_ok=True)
    for parent in levels[1:]:
        try:
            fsync_directory(parent)
        except OSError:
            if parent in made_in:
                raise
    return path


class Journal:
    """A segmented append-only record log in ``path`` (a directory, created if missing).

    ``fsync=False`` skips the disk flush in :meth:`commit` (tests and benchmarks only: such a
    journal survives a process kill but not a power loss). ``segment_bytes`` is the size after
    which a commit starts a new segment; ``zeroed_ahead_bytes``: how far past its records the
    active segment is zeroed (0: every commit appends, as a benchmark compares);
    ``max_record_bytes``: the largest payload :meth:`append` takes (at most, and by default,
    :data:`MAX_RECORD_BYTES`, the largest a reader trusts).
    ``readonly=True`` opens without the lock, never repairs or writes, and replays only the
    valid prefix (its :attr:`repair` says what a writer opening it would cut off); with
    ``lock_shared=True`` as well, it holds the lock shared while open
    (:class:`JournalLockedError` while a writer holds it; a missing ``LOCK`` file, which no
    writer ever made, is not created).

    ``covered_seq``: called once the lock is held, before any repair, it returns
    the seq the snapshot the journal will be replayed after covers (0: none). A damaged record
    at or below it, or a break in the chain below it (a segment missing, or read back as
    zeros), does not end the journal there: the records it covers are not needed, so the
    journal resumes at the valid record ``covered_seq + 1`` found past the damage (moved into
    a segment of its own) and keeps every record after it (:attr:`Repair.resumed_at`). A
    reader finds it the same way and reads from there, changing nothing.
    """

    def __init__(self, path: str | os.PathLike[str], fsync: bool = True, *,
                 segment_bytes: int = DEFAULT_SEGMENT_BYTES, readonly: bool = False,
                 lock_shared: bool = False,
                 zeroed_ahead_bytes: int = ZEROED_AHEAD_BYTES,
                 max_record_bytes: int | None = None,
                 covered_seq: Callable[[], int] | None = None) -> None:
        if lock_shared and not readonly:
            raise ValueError("lock_shared is for a read-only journal (a writer locks it alone)")
        if segment_bytes < HEADER_BYTES:
            raise ValueError("segment_bytes is too small")
        if zeroed_ahead_bytes < 0:
            raise ValueError("zeroed_ahead_bytes must not be negative")
        if max_record_bytes is not None and not 0 < max_record_bytes <= MAX_RECORD_BYTES:
            raise ValueError(f"max_record_bytes must be in 1..{MAX_RECORD_BYTES}")
        self._max_record_bytes = max_record_bytes
        self.zeroed_ahead_bytes = zeroed_ahead_bytes
        self.path = Path(path)
        self.fsync = fsync
        self.segment_bytes = segment_bytes
        self.readonly = readonly
        self.repair = Repair()
        self._buf = bytearray()
        self._continued = False  # the last record appended leaves its commit unfinished
        self._failed: BaseException | None = None
        self._closed = False
        self._lock_fd = -1
        self._fd = -1
        self._size = 0  # bytes of records in the active segment: where the next one goes
        self._zeroed = 0  # bytes of the active segment's file (records, then zeros)
        # (first_seq, path) of every segment, oldest first; the last one is the active segment.
        self._segments: list[tuple[int, Path]] = []
        # where the records of a segment begin, when not at its start: a reader that resumed
        # past covered damage in the middle of it (a writer moves them to a segment instead)
        self._offsets: dict[Path, int] = {}
        if readonly:
            if lock_shared:
                self._lock_shared()
        else:
            create_directory(self.path)
            self._lock()
        try:
            covered = 0 if covered_seq is None else covered_seq()
            if readonly:
                self._open_readonly(covered)
            else:
                self._open_for_writing(covered)
        except BaseException:
            self.close()
            raise
        self._last_seq = self._durable_seq

    # -- opening -------------------------------------------------------------------------------

    def _lock(self) -> None:
        self._take_lock(os.open(self.path / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644),
                        fcntl.LOCK_EX, "another writer or a locked reader")

    def _lock_shared(self) -> None:
        try:
            fd = os.open(self.path / LOCK_NAME, os.O_RDONLY)
        except FileNotFoundError:  # no writer ever opened it: there is nobody to exclude
            return
        self._take_lock(fd, fcntl.LOCK_SH, "a writer")

    def _take_lock(self, fd: int, mode: int, refused_by: str) -> None:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise JournalLockedError(f"journal {self.path} is held by {refused_by}"
                                     f"{_held_by(self.path / LOCK_NAME)}") from None
        self._lock_fd = fd

    def _open_readonly(self, covered: int) -> None:
        segments = numbered_files(self.path, SEGMENT_SUFFIX)
        kept: list[tuple[int, Path]] = []
        next_seq = segments[0][0] if segments else 1
        i = offset = 0  # offset: where the records of segments[i] begin
        while i < len(segments):
            base, p = segments[i]
            found: tuple[int, bytes, int] | None = None
            if not offset and base != next_seq:
                # a break below the snapshot: read on from the record after it, as a writer
                # resumes there (without writing anything)
                if next_seq <= covered:
                    found = self._resume_point(segments, i, p.read_bytes(), 0, covered + 1)
                if found is None:
                    if _holds_records(segments[i:], covered + 1):
                        raise _damaged(p, 0, next_seq)
                    self.repair.orphaned_segments += [q.name for _, q in segments[i:]]
                    break
            else:
                data = p.read_bytes()
                good_end, reached, tail, tail_end = _scan(data[offset:], next_seq)
                if tail != "end" and reached <= covered:  # damage below the snapshot: the same
                    found = self._resume_point(segments, i, data, offset + good_end, covered + 1)
                if tail != "end" and found is None:
                    self._check_damage(segments, i, data, offset + good_end, reached, covered)
            if found is not None:
                kept, self._offsets, next_seq = [], {}, covered + 1
                i, _, offset = found
                self.repair.resumed_at = next_seq
                continue
            kept.append((next_seq if offset else base, p))
            if offset:
                self._offsets[p] = offset
            self._size = offset + good_end
            next_seq = reached
            if tail != "end":  # what a writer cuts off and sets aside (nothing is, here)
                self.repair.count_cut(tail, tail_end - good_end)
                self.repair.orphaned_segments += [q.name for _, q in segments[i + 1:]]
                break
            i, offset = i + 1, 0
        self._segments = kept
        self._durable_seq = next_seq - 1

    def _open_for_writing(self, covered: int) -> None:
        segments = numbered_files(self.path, SEGMENT_SUFFIX)
        kept: list[tuple[int, Path]] = []
        next_seq = segments[0][0] if segments else 1
        i = 0
        while i < len(segments):
            base, p = segments[i]
            if base != next_seq and next_seq <= covered:
                # a break below the snapshot (a covered segment missing, or read back as zeros,
                # a clean end): the records it lost are not needed either
                resumed = self._resume(segments, i - 1, i, p.read_bytes(), 0, covered + 1)
                if resumed is not None:
                    segments, kept, next_seq, i = resumed, [], covered + 1, 0
                    continue
            if base != next_seq:
                if _holds_records(segments[i:], covered + 1):
                    raise _damaged(p, 0, next_seq)
                self._set_aside_segments(segments[i:])
                break
            data = p.read_bytes()
            good_end, next_seq, tail, tail_end = _scan(data, base)
            if tail != "end" and next_seq <= covered:
                resumed = self._resume(segments, i, i, data, good_end, covered + 1)
                if resumed is not None:  # start over from the segment it resumes with
                    segments, kept, next_seq, i = resumed, [], covered + 1, 0
                    continue
            if tail != "end":
                self._check_damage(segments, i, data, good_end, next_seq, covered)
            kept.append((base, p))
            self._size, self._zeroed = good_end, len(data)
            if tail == "end" and good_end < len(data) and i + 1 < len(segments) \
                    and segments[i + 1][0] == next_seq:
                os.truncate(p, good_end)  # rolled over, but its zeros' cut was lost in a crash
            if tail != "end":
                self.repair.count_cut(tail, tail_end - good_end)
                # Kept even for a torn tail: a damaged length field of the last record also
                # looks torn (one that valid records follow was refused above).
                # The zeros past it are not kept: they are the segment's, zeroed ahead.
                self._set_aside(p, data[good_end:tail_end], offset=good_end)
                with open(p, "r+b") as f:
                    f.truncate(good_end)
                    f.flush()
                    os.fsync(f.fileno())
                self._zeroed = good_end
                self._set_aside_segments(segments[i + 1 :])
                break
            i += 1
        self._durable_seq = next_seq - 1
        if not kept:
            kept.append((next_seq, self.path / _segment_name(next_seq)))
            self._size = self._zeroed = 0
        self._segments = kept
        self._fd = os.open(kept[-1][1], os.O_WRONLY | os.O_CREAT, 0o644)
        if self.fsync and self._size:
            # A writer killed between its write and its flush left records that only the page
            # cache may hold; they are served from now on (a retry gets their answer), so they
            # must be on the disk first. Earlier segments were flushed before they were left.
            # Written again, not only flushed: after a failed fdatasync (the writer that saw
            # it ended) Linux may keep the pages as clean though the disk never got them, and
            # a flush writes only dirty pages. Writing what was read back changes no byte.
            with open(kept[-1][1], "rb") as f:
                _write_at(self._fd, f.read(self._size), 0)
            _fdatasync(self._fd)
        # Every time, not only after a repair: a segment found here may be one a writer killed
        # between creating it and flushing the directory left (a roll-over's new segment), and
        # the records appended to it from now on are acknowledged.
        fsync_directory(self.path)

    @staticmethod
    def _check_damage(segments: list[tuple[int, Path]], i: int, data: bytes, start: int,
                    seq: int, covered: int) -> None:
        """Raise :class:`JournalDamagedError` unless the damage after the valid records that
        end at byte ``start`` of ``segments[i]`` (whose bytes are ``data``; ``seq``: the first
        record it lost) can be the torn last write of a crash: a valid record past the
        snapshot (``covered``) follows it, in that segment or a later one. A crash leaves none
        after its torn write, which is the last one; records after damage were acknowledged
        (a torn write whose later pages reached the disk before its earlier ones, as a power
        cut can leave, is refused too: refusing loses nothing)."""
        floor = covered + 1
        if _followed(data, start, seq, floor) or _holds_records(segments[i + 1 :], floor):
            raise _damaged(segments[i][1], start, seq)

    def _resume(self, segments: list[tuple[int, Path]], damaged: int, i: int, data: bytes,
                start: int, seq: int) -> list[tuple[int, Path]] | None:
        """Resume past damage that a snapshot covers: find the valid record ``seq`` (the first
        one the snapshot does not cover) in ``segments[i]`` (whose bytes are ``data``) from
        ``start`` on, or in a later segment; move the records from it into a segment of their
        own and set aside the segments before it. ``segments[damaged]`` is the segment with
        the damage: ``i`` itself (a damaged record), or the one before it (the chain breaks
        after it: a segment missing, or read back as zeros). Returns the segments from that
        new one on (None, nothing changed, if no record ``seq`` is there: nothing after the
        snapshot is left to keep, and the journal is cut at the damage as usual).

        Crash-safe at every step: the new segment is complete on disk before anything is
        removed, and the damaged segment is removed last, once the removal of every other old
        segment is durable. While it is there, a restart meets the same damage (or the same
        break after it; the records before it may be gone, which breaks the chain below
        ``seq`` just the same) and resumes the same way, finding ``seq`` past it, in a later
        segment or in the new one; once it is gone, the chain starts at the new segment.
        (Removed before a later old segment that holds ``seq`` too, it would leave that one to
        start a chain that the new segment, named ``seq``, no longer continues: set aside,
        with every record after it.)
        """
        found = self._resume_point(segments, i, data, start, seq)
        if found is None:
            return None
        j, blob, pos = found
        target = self.path / _segment_name(seq)
        if segments[j][1] != target:
            write_whole(target, memoryview(blob)[pos:])
        olds = [(k, old) for k, (_, old) in enumerate(segments[: j + 1]) if old != target]
        for k, old in sorted(olds, key=lambda kp: kp[0] == damaged):  # the damaged one last
            if k >= damaged:  # the damage, kept for inspection; earlier ones: intact, covered
                aside = data if k == i else old.read_bytes()
                self._set_aside(old, aside)
                self.repair.covered_bytes += len(aside)
            if k == damaged:
                fsync_directory(self.path)  # the others' removal first
            old.unlink()
        fsync_directory(self.path)
        self.repair.resumed_at = seq
        # a segment of that name left by an earlier try is the one just rewritten
        return [(seq, target), *(s for s in segments[j + 1 :] if s[1] != target)]

    @staticmethod
    def _resume_point(segments: list[tuple[int, Path]], i: int, data: bytes, start: int,
                      seq: int) -> tuple[int, bytes, int] | None:
        """Where the valid record ``seq`` is past damage: in ``segments[i]`` (whose bytes are
        ``data``) from ``start`` on, or in a later segment: ``(index, bytes, offset)``; None
        if there is none."""
        # A record is taken for ``seq`` if the chain of records from it ends where a segment
        # ends: its bytes end (or only zeros follow) and the next segment starts with the seq
        # after it. Bytes inside a payload that frame a valid record have a chain that stops
        # inside that payload. Failing such a one, the candidate whose chain goes furthest
        # (the journal may be damaged after ``seq`` as well), the first one of those.
        found: tuple[int, bytes, int] | None = None
        furthest: tuple[tuple[int, int, int], tuple[int, bytes, int]] | None = None
        for j in range(i, len(segments)):
            base, p = segments[j]
            if base > seq:
                break
            blob = data if j == i else p.read_bytes()
            next_base = segments[j + 1][0] if j + 1 < len(segments) else None
            for pos in _find_records(blob, seq, start if j == i else 0):
                good_end, reached, tail, _ = _scan(blob[pos:], seq)
                if tail == "end" and next_base in (None, reached):
                    found = (j, blob, pos)
                    break
                reach = (reached, j, pos + good_end)
                if furthest is None or reach > furthest[0]:
                    furthest = (reach, (j, blob, pos))
            if found is not None:
                break
        if found is None and furthest is not None:
            found = furthest[1]
        return found

    def _set_aside_segments(self, segments: list[tuple[int, Path]]) -> None:
        """Set whole segments aside (they no longer continue the chain) and delete them."""
        for _, orphan in segments:
            self._set_aside(orphan, orphan.read_bytes())
            orphan.unlink()
            self.repair.orphaned_segments.append(orphan.name)

    def _set_aside(self, segment: Path, data: bytes, offset: int = 0) -> None:
        """Copy ``data`` (cut from ``segment`` at ``offset``) to a new file beside it, durable
        with its directory entry before the caller cuts anything (else a power cut could keep
        the cut and lose the copy); a later cut at the same offset gets the next free name,
        never overwriting an earlier copy."""
        for aside in aside_names(segment, f".{offset}"):
            try:
                with open(aside, "xb") as f:
                    f.write(data)
                    f.flush()
                    os.fsync(f.fileno())
            except FileExistsError:
                continue
            fsync_directory(self.path)
            return

    # -- state -----------------------------------------------------------------------------------

    @property
    def last_seq(self) -> int:
        """Seq of the newest record appended (committed or not); 0 for an empty journal."""
        return self._last_seq

    @property
    def durable_seq(self) -> int:
        """Seq of the newest record a returned :meth:`commit` made durable."""
        return self._durable_seq

    @property
    def first_seq(self) -> int:
        """Seq of the oldest record still stored (``durable_seq + 1`` when none is)."""
        return self._segments[0][0] if self._segments else self._durable_seq + 1

    @property
    def max_record_bytes(self) -> int:
        """The largest payload :meth:`append` takes (bytes)."""
        return MAX_RECORD_BYTES if self._max_record_bytes is None else self._max_record_bytes

    @property
    def pending(self) -> int:
        """Records appended since the last commit."""
        return self._last_seq - self._durable_seq

    @property
    def segments(self) -> list[Path]:
        return [p for _, p in self._segments]

    def disk_bytes(self) -> int:
        """Bytes of the stored records (the durable log, without pending records or the
        active segment's zeros)."""
        return sum(p.stat().st_size for _, p in self._segments[:-1] if p.exists()) + self._size

    def _check_writable(self) -> None:
        if self._closed:
            raise JournalError("journal is closed")
        if self.readonly:
            raise JournalError("journal is open read-only")
        if self._failed is not None:
            raise JournalError("journal is poisoned by an earlier I/O error; recover from disk") \
                from self._failed

    # -- writing ---------------------------------------------------------------------------------

    def append(self, payload: bytes, continued: bool = False) -> int:
        """Buffer one record and return its seq. Not durable until :meth:`commit` returns.

        ``continued=True``: the next record belongs to the same commit, and a reader keeps
        them together or not at all. ValueError for a payload over ``max_record_bytes``.
        """
        if self._fd < 0 or self._failed is not None:
            self._check_writable()
        seq = self._last_seq + 1
        n = len(payload)
        if n > self.max_record_bytes:
            raise ValueError(f"record of {n} bytes exceeds {self.max_record_bytes}")
        field = seq | CONTINUED if continued else seq
        buf = self._buf
        buf += _pack_header(n, _crc32(payload, _crc32(_pack_seq(field))), field)
        buf += payload
        self._last_seq = seq
        self._continued = continued
        return seq

    def commit(self) -> int:
        """Write and flush every pending record (one write, one fdatasync); return durable_seq.

        A no-op when nothing is pending. On an I/O error the journal is poisoned and raises
        :class:`JournalError` from then on: nothing pending may be acknowledged. ValueError
        (nothing written) when the last record appended said its commit continues.
        """
        self._check_writable()
        if self._continued:
            raise ValueError("the last record appended leaves its commit unfinished")
        if not self._buf:
            return self._durable_seq
        data = self._buf
        self._buf = bytearray()
        end = self._size + len(data)
        try:
            if end > self._zeroed:  # the records reach past the zeros' end: zero further ahead
                zeroed = max(end, min(end + self.zeroed_ahead_bytes, self.segment_bytes))
                # before the records, over their overhang too (appending has none to put
                # first): a full disk then refuses zeros, a clean end, and never tears a
                # record whose cut at the next start needs space for its copy
                for at in range(self._zeroed if self.zeroed_ahead_bytes else end, zeroed,
                                len(_ZEROS)):
                    _write_at(self._fd, _ZEROS[:zeroed - at], at)
                self._zeroed = zeroed
            _write_at(self._fd, data, self._size)
            if self.fsync:
                _fdatasync(self._fd)
        except BaseException as exc:
            self._failed = exc
            raise JournalError(f"journal commit failed: {exc}") from exc
        self._size = end
        self._durable_seq = self._last_seq
        if self._size >= self.segment_bytes:
            self._roll()
        return self._durable_seq

    def _roll(self) -> None:
        """Start a new empty segment after the last durable record (nothing may be pending)."""
        assert not self._buf
        base = self._durable_seq + 1
        if self._segments[-1][0] == base and self._size == 0:
            return
        try:
            os.ftruncate(self._fd, self._size)  # its zeros: a reader stops at its end
            fd = self._new_segment(base, "roll")  # (poisons the journal itself on a failure)
            left, self._fd = self._fd, fd  # never keep a number the close below releases
            os.close(left)
        except OSError as exc:
            self._failed = exc
            raise JournalError(f"journal roll failed: {exc}") from exc

    def _new_segment(self, base: int, what: str) -> int:
        """Create the empty segment whose first record is ``base``, durable in the directory,
        as the active one; its fd. A failure poisons the journal."""
        path = self.path / _segment_name(base)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                fsync_directory(self.path)
            except BaseException:
                os.close(fd)  # not the active segment: nothing else would close it
                raise
        except BaseException as exc:
            self._failed = exc
            raise JournalError(f"journal {what} failed: {exc}") from exc
        self._size = self._zeroed = 0
        self._segments.append((base, path))
        return fd

    def truncate_before(self, seq: int) -> int:
        """Delete stored records with a seq below ``seq`` that whole segments allow; return count.

        Call it after a snapshot covering everything before ``seq`` is durable. Commits pending
        records first; when even the active segment holds only records below ``seq`` it is
        rolled so it can go too. A segment is deleted only when every record in it is below
        ``seq``, so the journal may keep a few older records, never lose a newer one.
        """
        self._check_writable()
        self.commit()
        if self._size > 0 and self._durable_seq < seq:
            self._roll()
        removed = 0
        while len(self._segments) > 1 and self._segments[1][0] <= seq:
            _, p = self._segments.pop(0)
            p.unlink(missing_ok=True)
            removed += 1
        if removed:
            fsync_directory(self.path)
        return removed

    def advance_to(self, seq: int) -> None:
        """Make the next record get seq ``seq + 1`` (after restoring a snapshot at ``seq``).

        Only allowed forward and with nothing pending; the records in between are considered
        covered by that snapshot. Used when the journal is behind a snapshot (it was removed or
        lost its tail), so new records never reuse a seq the snapshot already contains.
        """
        self._check_writable()
        if self._buf:
            raise JournalError("advance_to with records pending")
        if seq < self._durable_seq:
            raise JournalError(f"cannot move the journal back from {self._durable_seq} to {seq}")
        if seq == self._durable_seq:
            return
        # Old segments end before the jump and can never be replayed past it: delete them first,
        # so a crash midway leaves either the old chain or an empty directory, never a gap.
        os.close(self._fd)
        self._fd = -1
        for _, p in self._segments:
            p.unlink(missing_ok=True)
        self._segments = []
        self._fd = self._new_segment(seq + 1, "advance")
        self._durable_seq = seq
        self._last_seq = seq

    # -- reading ---------------------------------------------------------------------------------

    def replay(self, after_seq: int = 0) -> Iterator[tuple[int, bytes]]:
        """Yield ``(seq, payload)`` for every durable record with seq > ``after_seq``, in order.

        Raises :class:`JournalGapError` when records right after ``after_seq`` were already
        deleted. Pending (uncommitted) records are not replayed. Stops at the first invalid
        record (only possible for a read-only journal; a writer repaired it on open).
        """
        if after_seq + 1 < self.first_seq and after_seq < self._durable_seq:
            raise JournalGapError(
                f"records {after_seq + 1}..{self.first_seq - 1} are no longer in {self.path}"
            )
        end_seq = self._durable_seq
        segments = list(self._segments)
        for i, (base, p) in enumerate(segments):
            next_base = segments[i + 1][0] if i + 1 < len(segments) else end_seq + 1
            if next_base <= after_seq + 1 or base > end_seq:
                continue
            try:
                data = p.read_bytes()
            except FileNotFoundError:  # a reader raced the writer's truncate_before
                raise JournalGapError(f"segment {p.name} was deleted during replay") from None
            view = memoryview(data)[self._offsets.get(p, 0):]
            expected = base
            for seq, start, end in _records(view, base, end_seq):
                if seq > after_seq:
                    yield seq, view[start:end].tobytes()
                expected = seq + 1
            if expected <= min(end_seq, next_base - 1):
                return  # an invalid record (only a read-only journal can meet one)

    # -- lifetime --------------------------------------------------------------------------------

    def close(self) -> None:
        """Release the file and the lock. Pending records are dropped (never acknowledged);
        the active segment is cut to its records (its zeros are for appends to come)."""
        self._buf = bytearray()
        self._continued = False
        self._last_seq = getattr(self, "_durable_seq", 0)
        if self._fd >= 0:
            if self._failed is None and self._zeroed > self._size:
                with contextlib.suppress(OSError):  # zeros left are a clean end all the same
                    os.ftruncate(self._fd, self._size)
            os.close(self._fd)
            self._fd = -1
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
        self._closed = True

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Journal({str(self.path)!r}, first_seq={self.first_seq}, "
                f"durable_seq={self.durable_seq}, pending={self.pending})")
