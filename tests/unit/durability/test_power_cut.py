"""A power cut keeps only the directory entries that were flushed: whatever a killed process
created and never flushed must be flushed by the next one before it relies on it (records it
acknowledges, a snapshot the journal is trimmed after, a copy of the bytes it cuts off)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from cluster.durability.journal import Journal
from cluster.durability.journal import _segment_name
from cluster.durability.store import JOURNAL_DIR
from cluster.durability.store import SNAPSHOT_DIR
from engine.ledger_machine import CreateAccount
from tests.unit.durability.hosted import Clock
from tests.unit.durability.hosted import account
from tests.unit.durability.hosted import crash
from tests.unit.durability.hosted import one
from tests.unit.durability.hosted import open_ledger
from tests.unit.durability.power import PowerCut


def test_a_segment_a_killed_writer_created_is_flushed_before_records_go_in_it(
        tmp_path: Path, power: PowerCut) -> None:
    """A writer killed in its roll-over, after it created the next segment and before it
    flushed the directory, leaves an empty segment the disk may not keep. The next writer
    appends to it: before, it flushed the records and not the entry, and a power cut lost
    the acknowledged record 4 (the journal ended at 3, without a word)."""
    path = tmp_path / "j"
    with Journal(path) as first:
        for n in (1, 2, 3):
            first.append(b"record %d" % n)
            first.commit()
    os.close(os.open(path / _segment_name(4), os.O_WRONLY | os.O_CREAT, 0o644))  # the kill
    with Journal(path) as second:
        second.append(b"record 4")
        assert second.commit() == 4  # acknowledged
    power.cut()
    with Journal(path) as again:
        assert again.durable_seq == 4
        assert [p for _, p in again.replay()] == [b"record %d" % n for n in (1, 2, 3, 4)]


def test_a_journal_directory_a_killed_writer_created_is_flushed_in_its_parent(
        tmp_path: Path, power: PowerCut) -> None:
    """A writer killed at its first start, after it made its directories and before it
    flushed their parents: the next one found them and flushed nothing above the journal,
    and a power cut lost the whole journal with its acknowledged record."""
    path = tmp_path / "data" / "ledger" / JOURNAL_DIR
    path.mkdir(parents=True)  # the kill
    with Journal(path) as journal:
        journal.append(b"acknowledged")
        assert journal.commit() == 1
    power.cut()
    with Journal(path) as again:
        assert [p for _, p in again.replay()] == [b"acknowledged"]


def test_a_snapshot_directory_a_killed_writer_created_is_flushed_before_the_trim(
        tmp_path: Path, power: PowerCut) -> None:
    """A host killed as it made its ``snapshots`` directory, before it flushed the host's
    directory. The next one wrote its snapshot in it and trimmed the journal the snapshot
    covers: a power cut lost the snapshot with its directory and kept the trim, and no start
    was possible any more (the records before the journal's first were nowhere)."""
    led = open_ledger(tmp_path, Clock())
    one(led, CreateAccount(*account(1)))
    (tmp_path / SNAPSHOT_DIR).mkdir()  # the kill
    crash(led)
    led = open_ledger(tmp_path, Clock())
    for n in (2, 3):
        one(led, CreateAccount(*account(n)))
    assert led.checkpoint() == 3  # the journal before seq 4 is deleted
    one(led, CreateAccount(*account(4)))
    live = led.machine.fingerprint()
    crash(led)
    power.cut()
    again = open_ledger(tmp_path, Clock())
    assert again.machine.fingerprint() == live
    again.close()


class Cut(BaseException):
    """The power fails here."""


def test_bytes_a_repair_cuts_off_are_kept_through_a_power_cut(
        tmp_path: Path, power: PowerCut, monkeypatch: pytest.MonkeyPatch) -> None:
    """Opening a journal whose last record is damaged copies it aside and cuts it off. The
    cut was flushed before the copy's directory entry: a power cut right after the cut left
    neither the record nor its copy (which may hold an acknowledged record)."""
    path = tmp_path / "j"
    with Journal(path) as journal:
        for n in (1, 2):
            journal.append(b"record %d" % n)
            journal.commit()
    [segment] = sorted(path.glob("*.wal"))
    data = bytearray(segment.read_bytes())
    data[-1] ^= 0xFF  # the last record's last payload byte
    segment.write_bytes(bytes(data))
    flush = os.fsync

    def cut_once_cut(fd: int) -> None:
        flush(fd)
        if os.readlink(f"/proc/self/fd/{fd}") == str(segment.resolve()):
            raise Cut  # the segment's cut is on the disk, and nothing after it

    monkeypatch.setattr(os, "fsync", cut_once_cut)
    with pytest.raises(Cut):
        Journal(path)
    power.cut()
    [aside] = path.glob("*.corrupt")
    assert aside.read_bytes().endswith(b"record " + bytes([ord("2") ^ 0xFF]))
