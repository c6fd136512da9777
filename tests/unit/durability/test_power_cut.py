"""A power cut keeps only the directory entries that were flushed: whatever a killed process
created and never flushed must be flushed by the next one before it relies on it (records it
acknowledges, a snapshot the journal is trimmed after, a copy of the bytes it cuts off)."""

from __future__ import annotations

import os
from pathlib import Path

from cluster.durability.journal import Journal
from cluster.durability.journal import _segment_name
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
