"""The journal: round trips, group commit, torn and corrupt tails, rotation, locking, kill -9."""

from __future__ import annotations

import errno
import itertools
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cluster.durability import journal as journal_module
from cluster.durability.journal import HEADER_BYTES
from cluster.durability.journal import LOCK_NAME
from cluster.durability.journal import Journal
from cluster.durability.journal import JournalDamagedError
from cluster.durability.journal import JournalError
from cluster.durability.journal import JournalGapError
from cluster.durability.journal import JournalLockedError
from cluster.durability.journal import frame
from cluster.durability.journal import lock_holders
from tests.unit.durability.hosted import REPO


def payloads(n: int) -> list[bytes]:
    # varied sizes, including an empty payload
    return [bytes([i % 251]) * (i % 37) for i in range(n)]


def write(path: Path, items: list[bytes], **kwargs: object) -> None:
    with Journal(path, fsync=False, **kwargs) as j:  # type: ignore[arg-type]
        for p in items:
            j.append(p)
        j.commit()


def replayed(path: Path, after_seq: int = 0) -> list[tuple[int, bytes]]:
    with Journal(path, fsync=False) as j:
        return list(j.replay(after_seq))


def only_segment(path: Path) -> Path:
    (segment,) = sorted(path.glob("*.wal"))
    return segment


def test_round_trip_and_reopen(tmp_path: Path) -> None:
    items = payloads(200)
    with Journal(tmp_path / "j") as j:
        seqs = [j.append(p) for p in items]
        assert seqs == list(range(1, 201))
        assert j.durable_seq == 0 and j.pending == 200
        assert list(j.replay()) == []  # nothing is durable before commit
        assert j.commit() == 200
        assert list(j.replay()) == list(enumerate(items, start=1))
        assert list(j.replay(after_seq=150)) == list(enumerate(items, start=1))[150:]
    with Journal(tmp_path / "j") as j:
        assert (j.first_seq, j.durable_seq, j.last_seq) == (1, 200, 200)
        assert j.repair.clean
        assert list(j.replay()) == list(enumerate(items, start=1))
        assert j.append(b"next") == 201


def test_record_framing_is_exact(tmp_path: Path) -> None:
    write(tmp_path / "j", [b"abc", b""])
    data = only_segment(tmp_path / "j").read_bytes()
    assert data == frame(1, b"abc") + frame(2, b"")
    assert len(data) == 2 * HEADER_BYTES + 3


def test_uncommitted_records_are_not_durable(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", fsync=False) as j:
        j.append(b"a")
        j.commit()
        j.append(b"lost")
    with Journal(tmp_path / "j", fsync=False) as j:
        assert list(j.replay()) == [(1, b"a")]
        assert j.append(b"b") == 2


def test_missing_and_empty_journal(tmp_path: Path) -> None:
    ro = Journal(tmp_path / "absent", readonly=True)
    assert (ro.durable_seq, ro.first_seq, list(ro.replay())) == (0, 1, [])
    with pytest.raises(JournalError):
        ro.append(b"x")
    assert not (tmp_path / "absent").exists()  # a reader creates nothing
    with Journal(tmp_path / "j") as j:
        assert j.commit() == 0  # committing nothing is a no-op
        assert list(j.replay()) == []
    with Journal(tmp_path / "j") as j:
        assert (j.durable_seq, j.append(b"x")) == (0, 1)


def test_group_commit_is_one_write_and_one_fsync(tmp_path: Path, syncs: list[int]) -> None:
    with Journal(tmp_path / "j") as j:
        for p in payloads(64):
            j.append(p)
        j.commit()
        assert len(syncs) == 1
        j.commit()
        assert len(syncs) == 1  # nothing pending: no flush
        j.append(b"x")
        j.commit()
        assert len(syncs) == 2
    with Journal(tmp_path / "j", fsync=False) as j:
        j.append(b"y")
        j.commit()
        assert len(syncs) == 2


def test_opening_flushes_the_records_it_finds(tmp_path: Path, syncs: list[int]) -> None:
    # a writer killed between its write and its flush leaves records that only the page cache
    # may hold; the next writer serves them, so they must reach the disk before it does
    write(tmp_path / "j", payloads(5))  # never flushed
    assert syncs == []
    with Journal(tmp_path / "j") as j:
        assert j.durable_seq == 5
        (flushed,) = syncs
        assert os.readlink(f"/proc/self/fd/{flushed}") == str(only_segment(tmp_path / "j"))
    with Journal(tmp_path / "empty"):
        assert len(syncs) == 1  # a journal with no records has nothing to flush


def test_records_a_failed_flush_left_are_written_again_before_they_are_flushed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failed fdatasync may leave the pages it failed to write marked clean (Linux), so the
    failed commit's record reads back from the page cache while the disk lacks it. The next
    writer serves it and appends after it; a flush alone wrote nothing, and a power cut then
    left a hole before acknowledged records (the journal refused to open)."""
    j = Journal(tmp_path / "j")
    j.append(b"acknowledged")
    j.commit()

    def dead_disk(fd: int) -> None:
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(journal_module, "_fdatasync", dead_disk)
    j.append(b"failed")
    with pytest.raises(JournalError):
        j.commit()
    monkeypatch.undo()
    j.close()
    segment = only_segment(tmp_path / "j")
    os.utime(segment, ns=(0, 0))  # when last written: long ago
    written_at: list[int] = []
    real = journal_module._fdatasync

    def flush(fd: int) -> None:
        written_at.append(os.fstat(fd).st_mtime_ns)
        real(fd)

    monkeypatch.setattr(journal_module, "_fdatasync", flush)
    with Journal(tmp_path / "j") as again:
        assert again.durable_seq == 2  # served from now on
        assert len(written_at) == 1 and written_at[0] > 0  # written again before the flush
    assert segment.read_bytes() == frame(1, b"acknowledged") + frame(2, b"failed")


@pytest.mark.parametrize("last_size", [0, 1, 40])
def test_torn_last_record_at_every_byte_offset(tmp_path: Path, last_size: int) -> None:
    items = [*payloads(5), b"L" * last_size]
    write(tmp_path / "orig", items)
    name = only_segment(tmp_path / "orig").name
    data = only_segment(tmp_path / "orig").read_bytes()
    last_len = HEADER_BYTES + last_size
    for cut in range(1, last_len):  # keep 1..last_len-1 bytes of the last record
        case = tmp_path / f"cut{cut}"
        case.mkdir()
        (case / name).write_bytes(data[: len(data) - last_len + cut])
        kept = data[len(data) - last_len : len(data) - last_len + cut]
        with Journal(case, fsync=False) as j:
            if kept == bytes(cut):  # zeros after the last record: the end of a zeroed segment
                assert j.repair.clean and not list(case.glob("*.corrupt"))
            else:
                assert j.repair.torn_bytes == cut and j.repair.corrupt_bytes == 0
                (aside,) = case.glob("*.corrupt")  # what was cut is kept, not destroyed
                assert aside.read_bytes() == kept
            assert list(j.replay()) == list(enumerate(items[:-1], start=1))
            assert j.append(b"after") == len(items)
            j.commit()
        assert replayed(case) == [*enumerate(items[:-1], start=1), (len(items), b"after")]


def test_a_torn_record_in_a_zeroed_segment_sets_aside_what_was_written_not_the_zeros(
        tmp_path: Path) -> None:
    """A kill mid-write leaves a torn record followed by the segment's zeros (up to 1 MiB):
    the copy set aside, and the torn bytes reported, end at the record's announced end."""
    path = tmp_path / "j"
    with Journal(path, fsync=False) as j:
        for _ in range(3):
            j.append(b"x" * 100)
            j.commit()
        shutil.copytree(path, tmp_path / "crashed")  # what a kill leaves: zeros after them
    segment = only_segment(tmp_path / "crashed")
    data = bytearray(segment.read_bytes())
    end = 3 * (HEADER_BYTES + 100)
    assert len(data) == HEADER_BYTES + 100 + journal_module.ZEROED_AHEAD_BYTES  # the first commit
    for name, torn, want in [
            ("short", frame(4, b"y" * 100)[:HEADER_BYTES + 40], HEADER_BYTES + 100),
            ("header", frame(4, b"y" * 100)[:10], HEADER_BYTES + 100)]:
        case = tmp_path / name
        shutil.copytree(tmp_path / "crashed", case)
        damaged = bytearray(data)
        damaged[end : end + len(torn)] = torn
        only_segment(case).write_bytes(bytes(damaged))
        with Journal(case, fsync=False) as j:
            assert (j.repair.torn_bytes, j.durable_seq) == (want, 3)
        (aside,) = case.glob("*.corrupt")
        assert aside.read_bytes() == bytes(damaged[end : end + want])


def test_flipped_byte_in_last_record_drops_exactly_it(tmp_path: Path) -> None:
    items = [*payloads(5), b"last-record"]
    write(tmp_path / "orig", items)
    name = only_segment(tmp_path / "orig").name
    data = only_segment(tmp_path / "orig").read_bytes()
    start = len(data) - HEADER_BYTES - len(items[-1])
    for offset in range(start, len(data)):
        for mask in (0x01, 0x80):
            case = tmp_path / f"flip{offset}_{mask}"
            case.mkdir()
            damaged = bytearray(data)
            damaged[offset] ^= mask
            (case / name).write_bytes(bytes(damaged))
            with Journal(case, fsync=False) as j:
                assert not j.repair.clean
                assert j.durable_seq == len(items) - 1
                assert list(j.replay()) == list(enumerate(items[:-1], start=1))
                assert j.append(b"after") == len(items)
                j.commit()
            assert replayed(case)[-1] == (len(items), b"after")
            assert len(replayed(case)) == len(items)


@pytest.mark.parametrize("damage", ["torn", "flipped", "garbage after", "orphan"])
def test_a_reader_says_what_a_writer_opening_it_would_cut_and_changes_nothing(
        tmp_path: Path, damage: str) -> None:
    """``audit --offline`` opens the journals read-only: its repair is what the next start's
    writer cuts off and sets aside (a torn or damaged last record, later segments that no
    longer continue the chain), so the audit can say so; it was all zeros, and the audit said
    OK of a journal the start then cut. Nothing is written by the reader."""
    path = tmp_path / "j"
    write(path, [b"one", b"two", b"three" * 10])
    segment = only_segment(path)
    data = segment.read_bytes()
    if damage == "torn":
        segment.write_bytes(data[:-7])
    elif damage == "flipped":
        segment.write_bytes(data[:-1] + bytes([data[-1] ^ 0xFF]))
    elif damage == "garbage after":
        segment.write_bytes(data + bytes(range(7, 250)))
    else:
        (path / f"{10:020d}.wal").write_bytes(bytes(64))
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    with Journal(path, readonly=True, lock_shared=True) as reader:
        seen = reader.repair
        assert not seen.clean, seen
        assert list(reader.replay())[:2] == [(1, b"one"), (2, b"two")]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files
    with Journal(path, fsync=False) as writer:
        assert writer.repair == seen


def test_a_commit_of_several_records_is_kept_whole_or_not_at_all(tmp_path: Path) -> None:
    """Records appended with ``continued=True`` count only with the record ending their commit:
    the file cut anywhere in the commit, or its last record damaged, drops all of it. A record
    of it damaged with the rest of the commit whole after it is not a torn write: refused."""
    path = tmp_path / "orig"
    before = [b"one", b"two"]
    group = [b"a" * 10, b"b" * 20, b"c" * 5]
    write(path, before)
    with Journal(path, fsync=False) as j:
        for i, p in enumerate(group):
            j.append(p, continued=i < len(group) - 1)
        assert j.commit() == 5
    name = only_segment(path).name
    data = only_segment(path).read_bytes()
    start = sum(HEADER_BYTES + len(p) for p in before)
    assert data[start:] == b"".join(frame(3 + i, p, continued=i < 2)
                                    for i, p in enumerate(group))
    assert replayed(path) == list(enumerate([*before, *group], start=1))
    for cut in range(start + 1, len(data)):
        case = tmp_path / f"cut{cut}"
        case.mkdir()
        (case / name).write_bytes(data[:cut] + bytes(100))  # the rest still the zeros
        reader = Journal(case, readonly=True)
        assert list(reader.replay()) == list(enumerate(before, start=1)), cut
        with Journal(case, fsync=False) as j:
            torn = j.repair.torn_bytes  # what was written of the commit, not the zeros after
            assert cut - start <= torn <= len(data) - start and j.repair.corrupt_bytes == 0
            assert list(j.replay()) == list(enumerate(before, start=1))
            assert j.append(b"after") == 3
            j.commit()
        (aside,) = case.glob("*.corrupt")
        assert aside.read_bytes() == (data[:cut] + bytes(100))[start : start + torn]
    for at in (len(data) - 1, start + HEADER_BYTES + 2):  # the last record's, the first's
        damaged = bytearray(data)
        damaged[at] ^= 0xFF  # a payload byte
        (tmp_path / f"flip{at}").mkdir()
        (tmp_path / f"flip{at}" / name).write_bytes(bytes(damaged))
    with Journal(tmp_path / f"flip{len(data) - 1}", fsync=False) as j:
        assert j.repair.torn_bytes == len(data) - start
        assert list(j.replay()) == list(enumerate(before, start=1))
    # before, it was cut too, with the records of the commit after it, which was acknowledged
    _refused_unchanged(tmp_path / f"flip{start + HEADER_BYTES + 2}",
                       rf"{name} is damaged at byte {start} \(record 3\)")


def test_records_over_the_writers_bound_are_refused(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", fsync=False, max_record_bytes=10) as j:
        assert j.append(b"x" * 10) == 1
        with pytest.raises(ValueError, match="exceeds 10"):
            j.append(b"x" * 11)
        j.append(b"y", continued=True)
        with pytest.raises(ValueError, match="unfinished"):  # nothing is written
            j.commit()
        assert j.durable_seq == 0
    with pytest.raises(ValueError, match="max_record_bytes"):
        Journal(tmp_path / "k", max_record_bytes=journal_module.MAX_RECORD_BYTES + 1)


@pytest.mark.parametrize("at, mask", [(HEADER_BYTES + 2, 0xFF), (0, 0x04), (3, 0x80)])
@pytest.mark.parametrize("covered", [0, 3])
def test_a_damaged_record_mid_segment_is_refused_not_cut(
        tmp_path: Path, at: int, mask: int, covered: int) -> None:
    """A record whole but wrong (a payload byte flipped, or a length field that now ends it
    inside the next record or is over the bound) with valid records after it, past the
    snapshot (``covered``): they were acknowledged and a crash does not leave them after
    damage. Before, the journal was cut there (the bytes set aside, a warning logged) and
    the records after it were lost, their seqs given out again; now reader and writer refuse
    it, naming the segment and the byte, and change nothing."""
    items = payloads(10)
    items[4] = b"fifth record"
    segment = _kill_left(tmp_path / "j", items)
    data = bytearray(segment.read_bytes())
    fifth = sum(HEADER_BYTES + len(p) for p in items[:4])
    data[fifth + at] ^= mask
    segment.write_bytes(bytes(data))
    _refused_unchanged(tmp_path / "j", rf"{segment.name} is damaged at byte {fifth} \(record 5\)",
                       covered_seq=lambda: covered)


def test_damage_a_snapshot_covers_resumes_after_it_and_keeps_every_later_record(
        tmp_path: Path) -> None:
    """``covered_seq``: a damaged record at or below the snapshot's seq is not needed, so the
    journal resumes at the record after the snapshot (in a segment of its own) and keeps the
    records after it; reopened, it is clean."""
    items = [b"r%02d" % i + b"." * 20 for i in range(12)]
    path = tmp_path / "orig"
    with Journal(path, fsync=False, segment_bytes=4 * (HEADER_BYTES + 23)) as j:
        for p in items:
            j.append(p)
            j.commit()
        assert len(j.segments) == 4  # records 1-4, 5-8, 9-12, then the empty active one
    records = list(enumerate(items, start=1))
    for covered, damaged_seq, kept in [(6, 3, 6), (6, 5, 6), (8, 2, 8), (12, 3, 12),
                                        (6, 7, 6)]:
        case = tmp_path / f"c{covered}-{damaged_seq}"
        shutil.copytree(path, case)
        segment = sorted(case.glob("*.wal"))[(damaged_seq - 1) // 4]
        data = bytearray(segment.read_bytes())
        data[((damaged_seq - 1) % 4) * (HEADER_BYTES + 23) + HEADER_BYTES + 1] ^= 0xFF
        segment.write_bytes(bytes(data))
        if damaged_seq > covered:  # past the snapshot, with records after it: refused
            _refused_unchanged(case, f"{segment.name} is damaged", covered_seq=lambda c=covered: c)
            continue
        with Journal(case, fsync=False, covered_seq=lambda c=covered: c) as j:
            if covered == len(items):  # nothing after the snapshot: nothing to resume at
                assert (j.repair.resumed_at, j.durable_seq) == (0, damaged_seq - 1)
                continue
            assert (j.repair.resumed_at, j.first_seq, j.durable_seq) == (kept + 1, kept + 1, 12)
            assert j.repair.covered_bytes > 0 and list(case.glob("*.corrupt"))
            assert list(j.replay(covered)) == records[covered:]
            assert j.append(b"next") == 13
            j.commit()
        with Journal(case, fsync=False, covered_seq=lambda c=covered: c) as j:
            assert j.repair.clean
            assert list(j.replay(covered)) == [*records[covered:], (13, b"next")]


def test_a_resume_cut_short_by_a_crash_resumes_the_same_way(tmp_path: Path) -> None:
    """The segment the journal resumes with is written whole before anything is removed: a
    crash after it (the damaged segment still there, the new one too) resumes again."""
    items = [b"x%02d" % i for i in range(10)]
    write(tmp_path / "j", items)
    segment = only_segment(tmp_path / "j")
    data = bytearray(segment.read_bytes())
    data[HEADER_BYTES + 1] ^= 0xFF  # record 1
    segment.write_bytes(bytes(data))
    resumed = tmp_path / "j" / "00000000000000000005.wal"
    resumed.write_bytes(bytes(data[4 * (HEADER_BYTES + 3):]))  # what the first try wrote
    with Journal(tmp_path / "j", fsync=False, covered_seq=lambda: 4) as j:
        assert (j.repair.resumed_at, j.first_seq, j.durable_seq) == (5, 5, 10)
        assert list(j.replay(4)) == list(enumerate(items, start=1))[4:]
    assert sorted(p.name for p in (tmp_path / "j").glob("*.wal")) == [resumed.name]


class _Killed(Exception):
    """Stands for the process dying at the point it is raised (nothing after it runs)."""


def _open_killed_after_unlinks(path: Path, n: int, **kwargs: object) -> bool:
    """Open the journal as a writer that dies right after its ``n``-th file removal (a
    ``kill -9`` there leaves the disk as it is); whether it died before finishing."""
    real = Path.unlink
    count = 0

    def unlink(self: Path, missing_ok: bool = False) -> None:
        nonlocal count
        real(self, missing_ok=missing_ok)
        count += 1
        if count == n:
            raise _Killed

    with pytest.MonkeyPatch.context() as m:
        m.setattr(Path, "unlink", unlink)
        try:
            Journal(path, fsync=False, **kwargs).close()  # type: ignore[arg-type]
        except _Killed:
            return True
    return False


SIXTEEN_SEGMENT_BYTES = 4 * (HEADER_BYTES + 23)  # four of _sixteen_records' records


def _sixteen_records(path: Path, damage_record_3: bool = False) -> list[tuple[int, bytes]]:
    """A journal at ``path`` of 16 records of 23 bytes, four per segment (1-4, 5-8, ...), with
    one byte of record 3's payload flipped if asked; its ``(seq, payload)`` pairs."""
    items = [b"r%02d" % i + b"." * 20 for i in range(16)]
    with Journal(path, fsync=False, segment_bytes=SIXTEEN_SEGMENT_BYTES) as j:
        for p in items:
            j.append(p)
            j.commit()
    if damage_record_3:
        first = sorted(path.glob("*.wal"))[0]
        data = bytearray(first.read_bytes())
        data[2 * (HEADER_BYTES + 23) + HEADER_BYTES + 1] ^= 0xFF
        first.write_bytes(bytes(data))
    return list(enumerate(items, start=1))


def _resume_killed_after_each_removal(tmp_path: Path, path: Path, covered: int,
                                      first_kill: int) -> None:
    """For every n from ``first_kill`` on (0: not killed), a copy of ``path`` (a
    _sixteen_records journal, damaged below ``covered``) opened and killed after its n-th file
    removal, then opened again: every record after ``covered`` is kept, nothing set aside, and
    the next seq is 17; until an opening removes fewer than n files."""
    records = [(seq, b"r%02d" % (seq - 1) + b"." * 20) for seq in range(1, 17)]
    seg_bytes = SIXTEEN_SEGMENT_BYTES
    for n in itertools.count(first_kill):
        case = tmp_path / f"killed-{n}"
        shutil.copytree(path, case)
        if n and not _open_killed_after_unlinks(case, n, segment_bytes=seg_bytes,
                                                covered_seq=lambda: covered):
            break
        with Journal(case, fsync=False, segment_bytes=seg_bytes,
                     covered_seq=lambda: covered) as j:
            assert not j.repair.orphaned_segments, n
            assert (j.first_seq, j.durable_seq) == (covered + 1, 16), n
            if n == 0:
                assert j.repair.resumed_at == covered + 1
            assert list(j.replay(covered)) == records[covered:], n
            assert j.append(b"next") == 17
            j.commit()
        with Journal(case, fsync=False, segment_bytes=seg_bytes,
                     covered_seq=lambda: covered) as j:
            assert j.repair.clean
            assert list(j.replay(covered)) == [*records[covered:], (17, b"next")]
    assert n > 2  # the removals were all reached


def test_a_resume_killed_after_any_removal_keeps_every_record_after_the_snapshot(
        tmp_path: Path) -> None:
    """The record after the snapshot lies in a later segment than the damage: resuming writes a
    segment named after it, then removes the old ones. Killed after any one removal, the
    restart must still reach that new segment: while the damaged segment is there it resumes
    the same way again, so it goes last. (Removed first, the restart's chain began at the
    later segment holding the record, ran into the new segment, which no longer continued it,
    and set it aside with every acknowledged record after the snapshot, whose seqs it then
    gave out again.)"""
    path = tmp_path / "orig"
    _sixteen_records(path, damage_record_3=True)  # record 7, after the snapshot, is in 5-8
    _resume_killed_after_each_removal(tmp_path, path, covered=6, first_kill=1)


@pytest.mark.parametrize("damage", ["zeroed", "missing"])
def test_covered_damage_that_breaks_the_chain_resumes_after_the_snapshot(
        tmp_path: Path, damage: str) -> None:
    """Damage a snapshot covers need not leave a damaged tail: a segment whose blocks read
    back as zeros scans as a clean end, and a missing segment leaves none at all; either way
    the next segment no longer continues the chain below the snapshot's seq. The records it
    covers are not needed, so the journal resumes at the record after the snapshot as for a
    damaged tail, instead of setting aside every later segment with the acknowledged records
    after the snapshot. Killed after any removal while it does, a restart resumes the same
    way."""
    path = tmp_path / "orig"
    _sixteen_records(path)
    first, second = sorted(path.glob("*.wal"))[:2]  # records 1-4, 5-8
    if damage == "zeroed":
        first.write_bytes(bytes(first.stat().st_size))
    else:
        second.unlink()
    _resume_killed_after_each_removal(tmp_path, path, covered=10, first_kill=0)


@pytest.mark.parametrize("segment_bytes", [journal_module.DEFAULT_SEGMENT_BYTES, 132])
def test_a_record_framed_inside_a_covered_payload_is_not_taken_for_the_resume_point(
        tmp_path: Path, segment_bytes: int) -> None:
    """A payload may hold client text (a clientOrderId), which may hold the bytes of a valid
    record framed with the seq after the snapshot. Resuming past covered damage must not take
    it for that record: its chain of records stops inside the payload it sits in, where the
    real record's goes on to the journal's end. (Taken, the journal resumed at the planted
    record, replayed it, and cut the acknowledged records after the snapshot.)"""
    covered = 6
    items = [b"ok%02d" % i for i in range(1, 11)]
    items[4] = b"payload-with-" + frame(covered + 1, b"") + b"-inside"  # record 5, covered
    records = list(enumerate(items, start=1))
    path = tmp_path / "j"
    with Journal(path, fsync=False, segment_bytes=segment_bytes) as j:
        for p in items:
            j.append(p)
            j.commit()
    # 132 bytes: records 1-5 in one segment, the record after the snapshot in the next
    segment = sorted(path.glob("*.wal"))[0]
    data = bytearray(segment.read_bytes())
    data[HEADER_BYTES + 1] ^= 0xFF  # record 1
    segment.write_bytes(bytes(data))
    with Journal(path, fsync=False, segment_bytes=segment_bytes,
                 covered_seq=lambda: covered) as j:
        assert (j.repair.resumed_at, j.durable_seq) == (covered + 1, 10)
        assert list(j.replay(covered)) == records[covered:]


@pytest.mark.parametrize("damage", ["zeroed", "missing"])
def test_a_break_in_the_chain_past_the_snapshot_is_refused_not_set_aside(
        tmp_path: Path, damage: str) -> None:
    """A segment read back as zeros, or missing, with acknowledged records in the segments
    after it that no snapshot holds: before, every later segment was set aside with a warning,
    and the records in them were gone."""
    path = tmp_path / "j"
    _sixteen_records(path)
    first, second = sorted(path.glob("*.wal"))[:2]  # records 1-4, 5-8
    if damage == "zeroed":
        first.write_bytes(bytes(first.stat().st_size))
        broken, seq = second, 1
    else:
        second.unlink()
        broken, seq = sorted(path.glob("*.wal"))[1], 5
    _refused_unchanged(path, rf"{broken.name} is damaged at byte 0 \(record {seq}\)",
                       covered_seq=lambda: 2)


def test_a_reader_reads_on_past_damage_a_snapshot_covers_without_writing(
        tmp_path: Path) -> None:
    """A reader (the offline audit) told what the snapshot covers finds the record after it
    past covered damage as a writer does and replays from there, changing nothing; without
    it, it stopped at the damage below the snapshot and replayed nothing after it."""
    path = tmp_path / "j"
    records = _sixteen_records(path, damage_record_3=True)
    second = sorted(path.glob("*.wal"))[1]
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    for covered in (6, 8):  # record 7 in the middle of segment 5-8; 9 at a segment's start
        with Journal(path, readonly=True, lock_shared=True, covered_seq=lambda c=covered: c
                     ) as j:
            assert (j.repair.resumed_at, j.first_seq, j.durable_seq) == (covered + 1,) * 2 + (16,)
            assert list(j.replay(covered)) == records[covered:]
    second.unlink()  # a covered segment missing: a break below the snapshot
    before.pop(second.name)
    with Journal(path, readonly=True, lock_shared=True, covered_seq=lambda: 10) as j:
        assert (j.repair.resumed_at, j.durable_seq) == (11, 16)
        assert list(j.replay(10)) == records[10:]
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_a_second_cut_at_the_same_offset_keeps_the_first_copy(tmp_path: Path) -> None:
    path = tmp_path / "j"
    write(path, [b"one", b"two"])
    segment = only_segment(path)
    end = segment.stat().st_size
    copies = []
    for n, garbage in enumerate((b"\xff" * 30, b"\xee" * 20)):
        with open(segment, "ab") as f:  # a damaged record after the last good one
            f.write(garbage)
        with Journal(path, fsync=False) as j:
            assert j.repair.corrupt_bytes + j.repair.torn_bytes == len(garbage)
            assert j.durable_seq == 2
        copies.append(sorted(p.read_bytes() for p in path.glob("*.corrupt")))
        assert segment.stat().st_size == end, n
    assert copies == [[b"\xff" * 30], sorted([b"\xff" * 30, b"\xee" * 20])]


def test_seq_chain_break_is_corruption(tmp_path: Path) -> None:
    """Record 3 missing and record 4 valid after it: damage, not a torn write, so the journal
    is refused rather than cut at 3 (which dropped the acknowledged record 4)."""
    seg = tmp_path / "j" / "00000000000000000001.wal"
    seg.parent.mkdir()
    data = frame(1, b"a") + frame(2, b"b") + frame(4, b"d")  # valid crcs, seq 3 missing
    seg.write_bytes(data)
    _refused_unchanged(tmp_path / "j", f"{seg.name} is damaged at byte 34 ")


def _kill_left(path: Path, items: list[bytes], **kwargs: object) -> Path:
    """A copy at ``path`` of a journal of ``items``, one commit each, taken as a kill leaves
    it (the active segment still ending in its zeros); its only segment."""
    with Journal(path.with_name("live"), fsync=False, **kwargs) as j:  # type: ignore[arg-type]
        for p in items:
            j.append(p)
            j.commit()
        shutil.copytree(path.with_name("live"), path)
    return only_segment(path)


def _refused_unchanged(path: Path, match: str, **kwargs: object) -> None:
    """Opening ``path`` for reading or writing is refused with ``match``, and nothing in it
    changes (but for a writer's lock file)."""
    files = {p.name: p.read_bytes() for p in path.iterdir()}
    for readonly in (True, False):
        with pytest.raises(JournalDamagedError, match=match):
            Journal(path, fsync=False, readonly=readonly, **kwargs)  # type: ignore[arg-type]
    files.setdefault(LOCK_NAME, b"")
    assert {p.name: p.read_bytes() for p in path.iterdir()} == files


@pytest.mark.parametrize("zeroed_ahead", [journal_module.ZEROED_AHEAD_BYTES, 0])
@pytest.mark.parametrize("byte, mask", [(2, 0x10), (2, 0x08), (1, 0x01)])
def test_a_damaged_length_field_mid_segment_is_not_taken_for_a_torn_tail(
        tmp_path: Path, zeroed_ahead: int, byte: int, mask: int) -> None:
    """A bit flipped in the length field of a record with acknowledged records after it makes
    it announce more bytes than the segment holds, or an end in its zeros: what a record torn
    by a crash looks like. Taken for one, it and the five acknowledged records after it were
    cut off with an INFO line. Valid records follow it, so it is damage: reader and writer
    refuse it with one line naming the segment and the byte, and nothing is cut off."""
    items = [b"record %d" % i for i in range(1, 11)]
    segment = _kill_left(tmp_path / "j", items, zeroed_ahead_bytes=zeroed_ahead)
    data = bytearray(segment.read_bytes())
    fifth = 4 * (HEADER_BYTES + 8)
    data[fifth + byte] ^= mask
    segment.write_bytes(bytes(data))
    _refused_unchanged(tmp_path / "j", rf"{segment.name} is damaged at byte {fifth} \(record 5\)")
    data[fifth + byte] ^= mask  # the segment restored: every record is there
    segment.write_bytes(bytes(data))
    assert replayed(tmp_path / "j") == list(enumerate(items, start=1))


def test_seq_stays_monotonic_across_reopens(tmp_path: Path) -> None:
    seen: list[int] = []
    for round_ in range(5):
        with Journal(tmp_path / "j", fsync=False) as j:
            for i in range(round_ + 1):
                seen.append(j.append(b"%d" % i))
            if round_ % 2 == 0:
                j.commit()
            else:
                seen = seen[: -(round_ + 1)]  # closed without commit: those seqs never existed
    assert seen == list(range(1, len(seen) + 1))
    assert [s for s, _ in replayed(tmp_path / "j")] == seen


def test_rotation_and_truncate_before(tmp_path: Path) -> None:
    path = tmp_path / "j"
    items = [b"%04d" % i + b"x" * 30 for i in range(100)]
    with Journal(path, fsync=False, segment_bytes=400) as j:
        for i, p in enumerate(items):
            j.append(p)
            if i % 3 == 2:
                j.commit()
        j.commit()
        assert len(j.segments) > 5
        bases = [int(p.name[:20]) for p in j.segments]
        assert bases == sorted(bases) and bases[0] == 1
        assert list(j.replay()) == list(enumerate(items, start=1))
        assert list(j.replay(after_seq=57)) == list(enumerate(items, start=1))[57:]

        removed = j.truncate_before(60)
        assert removed > 0
        assert 1 < j.first_seq <= 60
        assert list(j.replay(after_seq=59)) == list(enumerate(items, start=1))[59:]
        with pytest.raises(JournalGapError):
            list(j.replay(after_seq=0))
        first = j.first_seq
    with Journal(path, fsync=False, segment_bytes=400) as j:
        assert (j.first_seq, j.durable_seq) == (first, 100)
        assert list(j.replay(after_seq=first - 1)) == list(enumerate(items, start=1))[first - 1 :]
        # everything is covered by a snapshot: the active segment rolls and all go
        j.truncate_before(101)
        assert (j.first_seq, j.durable_seq, j.disk_bytes()) == (101, 100, 0)
        assert list(j.replay(after_seq=100)) == []
    with Journal(path, fsync=False) as j:
        assert (j.first_seq, j.durable_seq) == (101, 100)  # the seq survives an empty log
        assert j.append(b"z") == 101


def test_damage_at_the_end_of_an_old_segment_is_refused_not_cut(tmp_path: Path) -> None:
    """The last record of a segment rolled over damaged: it ends the file as a torn record
    would, but later segments hold acknowledged records (a segment is only left after its
    records were flushed). Before, it was cut off and every later segment set aside."""
    path = tmp_path / "j"
    items = [b"r%03d" % i + b"." * 40 for i in range(40)]
    with Journal(path, fsync=False, segment_bytes=300) as j:
        for p in items:
            j.append(p)
            j.commit()
    segments = sorted(path.glob("*.wal"))
    assert len(segments) >= 3
    first = bytearray(segments[0].read_bytes())
    first[-1] ^= 0x55  # last record of the first segment
    segments[0].write_bytes(bytes(first))
    last = int(segments[1].name[:20]) - 1
    at = len(first) - HEADER_BYTES - len(items[0])
    _refused_unchanged(path, rf"{segments[0].name} is damaged at byte {at} \(record {last}\)")


def test_the_active_segment_is_zeroed_ahead_and_a_crash_leaves_a_clean_end(
        tmp_path: Path, syncs: list[int]) -> None:
    path, crashed = tmp_path / "j", tmp_path / "crashed"
    ahead = journal_module.ZEROED_AHEAD_BYTES
    items = payloads(40)
    with Journal(path) as j:
        j.append(items[0])
        j.commit()
        segment = only_segment(path)
        records = HEADER_BYTES + len(items[0])
        # the first commit zeroes ahead: later ones overwrite zeros, never grow the file
        assert segment.stat().st_size == records + ahead
        assert segment.read_bytes() == frame(1, items[0]) + bytes(ahead)
        for p in items[1:]:
            assert j.append(p) == j.durable_seq + 1
            j.commit()
            records += HEADER_BYTES + len(p)
        assert segment.stat().st_size == HEADER_BYTES + len(items[0]) + ahead
        assert (j.disk_bytes(), len(syncs)) == (records, len(items))  # one flush per commit
        data = segment.read_bytes()
        assert data[records:] == bytes(len(data) - records)
        shutil.copytree(path, crashed)  # what a kill -9 leaves: the zeros after the records
    assert segment.stat().st_size == records  # a journal that closes is cut to its records

    reader = Journal(crashed, readonly=True)
    assert (reader.durable_seq, reader.disk_bytes()) == (len(items), records)
    assert list(reader.replay()) == list(enumerate(items, start=1))
    reader.close()
    with Journal(crashed) as j:
        assert j.repair.clean and not list(crashed.glob("*.corrupt"))
        assert list(j.replay()) == list(enumerate(items, start=1))
        assert j.append(b"after") == len(items) + 1
        j.commit()
        assert only_segment(crashed).stat().st_size == len(data)  # written over the zeros
        shutil.copytree(crashed, tmp_path / "again")
    assert replayed(tmp_path / "again") == [*enumerate(items, start=1), (41, b"after")]


@pytest.mark.parametrize("ahead", [0, 100, 3 * 1024 * 1024 + 5])
def test_how_far_a_segment_is_zeroed_ahead(tmp_path: Path, ahead: int) -> None:
    items = payloads(30)
    with Journal(tmp_path / "j", fsync=False, zeroed_ahead_bytes=ahead) as j:
        records = 0
        for p in items:
            j.append(p)
            j.commit()
            records += HEADER_BYTES + len(p)
            data = only_segment(tmp_path / "j").read_bytes()
            assert records <= len(data) <= records + ahead  # 0: each commit appends
            assert data[records:] == bytes(len(data) - records)
        if ahead > len(journal_module._ZEROS):  # written in chunks, all of it
            assert len(data) == HEADER_BYTES + len(items[0]) + ahead
        assert list(j.replay()) == list(enumerate(items, start=1))
    with pytest.raises(ValueError, match="zeroed_ahead_bytes"):
        Journal(tmp_path / "k", zeroed_ahead_bytes=-1)


def test_a_full_disk_leaves_no_torn_record_for_the_next_start_to_set_aside(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A commit past the zeros on a full disk: the records' write reached the blocks the
    file had, came back short, and the rest failed (ENOSPC), leaving a torn record. The next
    start, the disk still full, had to copy it to a ``.corrupt`` file before cutting it, so
    it failed too, every time Ray started it again. The zeros go first now: the disk refuses
    them before any byte of the records is written, and the segment ends clean."""
    path = tmp_path / "j"
    j = Journal(path, zeroed_ahead_bytes=64)
    j.append(b"acknowledged")
    j.commit()
    capacity = os.path.getsize(only_segment(path))  # no block free past what the file has
    real_pwrite = os.pwrite

    def full_disk(fd: int, data: bytes, offset: int) -> int:
        if offset >= capacity:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, memoryview(data)[: capacity - offset], offset)

    j.append(b"x" * 100)  # reaches past the zeros
    with monkeypatch.context() as patched:
        patched.setattr(os, "pwrite", full_disk)
        with pytest.raises(JournalError, match="No space left"):
            j.commit()
    j.close()
    with Journal(path) as again:
        assert again.repair.clean and not list(path.glob("*.corrupt"))
        assert list(again.replay()) == [(1, b"acknowledged")]


def test_a_rolled_segment_is_cut_to_its_records(tmp_path: Path) -> None:
    path = tmp_path / "j"
    with Journal(path, fsync=False, segment_bytes=4096) as j:
        for i in range(300):
            j.append(b"%03d" % i * 10)
            j.commit()
        first, *_, active = j.segments
        # zeroed no further than the segment's size; a rolled one holds its records only
        assert active.stat().st_size <= 4096
        assert first.read_bytes().rstrip(b"\0") == first.read_bytes()
        assert list(j.replay()) == [(i + 1, b"%03d" % i * 10) for i in range(300)]
        assert j.disk_bytes() == 300 * (HEADER_BYTES + 30)
        # a crash between the roll and the cut: an older segment that ends in zeros
        size = first.stat().st_size
        first.write_bytes(first.read_bytes() + bytes(1000))
        shutil.copytree(path, tmp_path / "crashed")
    with Journal(tmp_path / "crashed", fsync=False) as j:
        assert j.repair.clean
        assert list(j.replay()) == [(i + 1, b"%03d" % i * 10) for i in range(300)]
        assert (tmp_path / "crashed" / first.name).stat().st_size == size  # cut on opening


def test_advance_to_skips_seqs_a_snapshot_covers(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", fsync=False) as j:
        j.append(b"a")
        j.commit()
        with pytest.raises(JournalError):
            j.advance_to(0)
        j.advance_to(50)
        assert (j.first_seq, j.durable_seq) == (51, 50)
        assert j.append(b"b") == 51
        j.commit()
    assert replayed(tmp_path / "j", after_seq=50) == [(51, b"b")]


def test_single_writer_lock_and_concurrent_reader(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", fsync=False) as j:
        j.append(b"a")
        j.commit()
        with pytest.raises(JournalLockedError):
            Journal(tmp_path / "j")
        j.append(b"half")  # a reader never sees uncommitted records
        assert list(Journal(tmp_path / "j", readonly=True).replay()) == [(1, b"a")]
    with Journal(tmp_path / "j") as j:  # the lock goes with the writer
        assert j.durable_seq == 1


def test_a_locked_reader_excludes_writers_and_is_excluded_by_one(tmp_path: Path) -> None:
    """``lock_shared``: readers share the lock, a writer holds it alone; no LOCK is made."""
    path = tmp_path / "j"
    reader = Journal(path, readonly=True, lock_shared=True)  # no journal at all yet
    assert reader.durable_seq == 0 and not path.exists()
    reader.close()
    write(path, [b"a"])
    with Journal(path, readonly=True, lock_shared=True) as first, \
            Journal(path, readonly=True, lock_shared=True) as second:
        assert list(first.replay()) == list(second.replay()) == [(1, b"a")]
        with pytest.raises(JournalLockedError):
            Journal(path)
    with Journal(path, fsync=False) as writer:
        with pytest.raises(JournalLockedError):
            Journal(path, readonly=True, lock_shared=True)
        assert list(Journal(path, readonly=True).replay()) == [(1, b"a")]  # unlocked reader
        writer.append(b"b")
        writer.commit()
    with pytest.raises(ValueError):
        Journal(path, lock_shared=True)


def test_failed_commit_poisons_the_journal(tmp_path: Path) -> None:
    j = Journal(tmp_path / "j")
    j.append(b"a")
    os.close(j._fd)  # the disk goes away under the writer
    with pytest.raises(JournalError):
        j.commit()
    with pytest.raises(JournalError):
        j.append(b"b")
    with pytest.raises(JournalError):
        j.commit()
    j._fd = -1
    j.close()
    assert replayed(tmp_path / "j") == []


def test_a_failed_close_in_a_roll_over_poisons_the_journal(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Linux releases a descriptor even when its close fails. Before, a failed close of the
    segment a roll-over leaves escaped as an OSError and the journal kept that number as its
    active segment: the next commit wrote its record into whatever file took the number,
    flushed it and returned, acknowledged and in no journal."""
    path = tmp_path / "j"
    j = Journal(path, segment_bytes=HEADER_BYTES + 8)  # one 8-byte record fills a segment
    j.append(b"record 1")
    left, real_close = j._fd, os.close

    def failing_close(fd: int) -> None:
        real_close(fd)
        if fd == left:
            raise OSError(errno.EIO, "close of the segment left failed")

    with monkeypatch.context() as patched:
        patched.setattr(os, "close", failing_close)
        with pytest.raises(JournalError):
            j.commit()  # record 1 is on the disk; its answer is not given
    with open(tmp_path / "other", "wb") as other:  # takes the number released
        with pytest.raises(JournalError):
            j.append(b"record 2")
            j.commit()
        assert other.tell() == 0 and os.fstat(other.fileno()).st_size == 0
    j.close()
    assert replayed(path) == [(1, b"record 1")]


def test_a_new_segment_whose_entry_cannot_be_flushed_leaves_no_file_open(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A roll-over whose directory flush fails poisons the journal; the segment it had just
    opened stayed open, held by nothing, after the journal closed."""
    path = tmp_path / "j"
    before = set(os.listdir("/proc/self/fd"))
    j = Journal(path, segment_bytes=HEADER_BYTES + 8)  # one 8-byte record fills a segment
    j.append(b"record 1")

    def failing_flush(directory: str | os.PathLike[str]) -> None:
        raise OSError(errno.EIO, "flush of the journal's directory failed")

    with monkeypatch.context() as patched:
        patched.setattr(journal_module, "fsync_directory", failing_flush)
        with pytest.raises(JournalError):
            j.commit()
    j.close()
    assert set(os.listdir("/proc/self/fd")) == before
    assert replayed(path) == [(1, b"record 1")]


def test_rejects_oversized_records(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", fsync=False) as j, pytest.raises(ValueError):
        j.append(b"\0" * (journal_module.MAX_RECORD_BYTES + 1))


WRITER = textwrap.dedent(
    """
    import sys
    from cluster.durability.journal import Journal
    j = Journal(sys.argv[1], segment_bytes=4096)
    n = j.durable_seq
    while True:
        for _ in range(1 + n % 7):
            n += 1
            j.append(b"%d" % n * (n % 13))
        print(j.commit(), flush=True)  # acknowledged only once the commit returned
    """
)


def test_kill_9_loses_nothing_acknowledged(tmp_path: Path) -> None:
    for round_ in range(3):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(tmp_path / "j")],
                                stdout=subprocess.PIPE, cwd=REPO, text=True)
        assert proc.stdout is not None
        acked = 0
        for _ in range(200 + 150 * round_):
            acked = int(proc.stdout.readline())
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        with Journal(tmp_path / "j", fsync=False) as j:
            records = list(j.replay())
        assert j.durable_seq >= acked
        assert [s for s, _ in records] == list(range(1, j.durable_seq + 1))
        assert all(p == b"%d" % s * (s % 13) for s, p in records)


def test_a_reader_that_loses_a_segment_to_the_writer_gets_a_gap_error(tmp_path: Path) -> None:
    with Journal(tmp_path / "j", fsync=False, segment_bytes=64) as writer:
        for i in range(10):
            writer.append(b"%02d" % i * 20)
            writer.commit()
        reader = Journal(tmp_path / "j", readonly=True)
        assert reader.durable_seq == 10
        writer.truncate_before(8)
        with pytest.raises(JournalGapError):
            list(reader.replay())
        assert [s for s, _ in reader.replay(after_seq=7)] == [8, 9, 10]


def test_a_held_journal_names_the_process_that_holds_it(tmp_path: Path) -> None:
    """Refused because a writer or an offline reader (``shardex audit``) holds it: the error
    says which process, as /proc/locks lists it."""
    path = tmp_path / "j"
    me = f"pid {os.getpid()} ("  # then the command line
    # this process's command line as the kernel keeps it (pytest's, or a pytest-xdist worker's)
    command = " ".join(" ".join(sys.orig_argv).split())[:120]
    with Journal(path, fsync=False):
        [holder] = lock_holders(path / LOCK_NAME)
        assert holder == f"{me}{command})", holder
        with pytest.raises(JournalLockedError, match=re.escape(f"held by a writer: {me}")):
            Journal(path, readonly=True, lock_shared=True)
    assert lock_holders(path / LOCK_NAME) == []
    with Journal(path, readonly=True, lock_shared=True), \
            pytest.raises(JournalLockedError, match=re.escape(f"locked reader: {me}")):
        Journal(path)
    assert lock_holders(tmp_path / "nothing") == []
