"""Append-only snapshot arrays: kept in files of raw rows next to the snapshots, one per kept
snapshot, each snapshot appending only the rows past the ones the file it takes over holds (the
one of the snapshot it pushes out), and naming how many of them it covers (with their crc32);
a torn append is cut, a damaged row refuses only the snapshot whose file holds it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster.durability.snapshot import Rows
from cluster.durability.snapshot import SnapshotError
from cluster.durability.snapshot import list_snapshots
from cluster.durability.snapshot import read_snapshot
from cluster.durability.snapshot import snapshot_rows
from cluster.durability.snapshot import write_snapshot
from cluster.durability.store import SNAPSHOT_DIR
from cluster.durability.store import JournalStore

ROW = np.dtype([("id", "<i8"), ("owner", "<u4"), ("pnl_micros", "<i8"), ("side", "u1")])


def rows(count: int, dtype: np.dtype = ROW) -> np.ndarray:
    table = np.zeros(count, dtype=dtype)
    table["id"] = np.arange(count) + 1
    table["owner"] = np.arange(count) % 7
    return table


def open_store(directory: Path) -> JournalStore:
    store = JournalStore(directory, lambda snapshot: snapshot, fsync=False)
    store.recover(lambda state, items: None, decode=lambda payload: [payload])
    store.append_only = ("rows",)
    return store


def checkpoint(store: JournalStore, table: np.ndarray, tag: int = 0) -> int:
    store.append_encoded([b"event"])
    return store.checkpoint(lambda: ({"rows": table, "small": np.arange(3) + tag},
                                     {"count": len(table)}))


def two_kept(directory: Path, total: int) -> tuple[JournalStore, np.ndarray, int, int]:
    """A store holding two snapshots, of the first 1,000 and 1,100 of ``total`` rows (each
    with its own rows file): ``(store, table, older seq, newest seq)``."""
    store = open_store(directory)
    table = rows(total)
    older = checkpoint(store, table[:1_000], tag=1)
    newest = checkpoint(store, table[:1_100], tag=2)
    return store, table, older, newest


def sizes(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in (directory / SNAPSHOT_DIR).iterdir()}


def written(before: dict[str, int], after: dict[str, int]) -> int:
    """Bytes the files of ``after`` hold past what the same files held ``before`` (a file
    written again counts whole: a new snapshot)."""
    return sum(size - before.get(name, 0) if name.endswith(".rows") else size
               for name, size in after.items() if name not in before or name.endswith(".rows"))


def loaded(directory: Path) -> Any:
    store = JournalStore(directory, lambda snapshot: snapshot, fsync=False)
    try:
        return store.recover(lambda state, items: None, decode=lambda payload: [payload])
    finally:
        store.close()


def test_bytes_written_per_snapshot_follow_the_new_rows_not_the_total(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    table = rows(100_000)
    checkpoint(store, table[:50_000])  # the first two kept write their files whole
    checkpoint(store, table[:50_050])
    for count in range(50_100, 51_000, 100):
        before = sizes(tmp_path)
        checkpoint(store, table[:count])
        # the rows since the snapshot it pushes out, two back: 200 rows are 4,200 bytes; the
        # snapshot file itself is small
        assert written(before, sizes(tmp_path)) < 200 * ROW.itemsize + 4096
    store.close()
    recovered = loaded(tmp_path)
    assert recovered.state.meta == {"count": 50_900}
    assert np.array_equal(recovered.state.arrays["rows"], table[:50_900])
    assert recovered.state.arrays["rows"].dtype == ROW
    # one file per kept snapshot, each its own copy
    assert sorted(size for n, size in sizes(tmp_path).items() if n.endswith(".rows")) == [
        50_800 * ROW.itemsize, 50_900 * ROW.itemsize]


def test_a_torn_append_past_the_newest_snapshot_loads_and_is_cut_by_the_next_write(
        tmp_path: Path) -> None:
    store, table, _, _ = two_kept(tmp_path, 1_300)
    store.close()
    # the older snapshot's file, which the next snapshot takes over
    [rows_file] = [p for p in (tmp_path / SNAPSHOT_DIR).glob("*.rows")
                   if p.stat().st_size == 1_000 * ROW.itemsize]
    with open(rows_file, "ab") as f:  # a crash while the next snapshot appended its rows
        f.write(b"\xff" * (ROW.itemsize * 50 + 7))
    recovered = loaded(tmp_path)
    assert np.array_equal(recovered.state.arrays["rows"], table[:1_100])
    store = open_store(tmp_path)
    checkpoint(store, table[:1_200])
    assert rows_file.stat().st_size == 1_200 * ROW.itemsize
    store.close()
    assert np.array_equal(loaded(tmp_path).state.arrays["rows"], table[:1_200])


def _files_by_rows(directory: Path) -> dict[int, Path]:
    return {p.stat().st_size // ROW.itemsize: p for p in (directory / SNAPSHOT_DIR).glob("*.rows")}


@pytest.mark.parametrize("row", [10, 1_050])
def test_a_damaged_row_refuses_only_the_snapshot_whose_file_holds_it(tmp_path: Path,
                                                                      row: int) -> None:
    # a row both snapshots cover (10) as well: each kept snapshot has its own file, so the
    # older one is whole, as when each held its copy inside its .npz
    store, table, older, newest = two_kept(tmp_path, 1_200)
    store.close()
    with open(_files_by_rows(tmp_path)[1_100], "r+b") as f:
        f.seek(row * ROW.itemsize + 3)
        f.write(b"\x55")
    paths = dict(list_snapshots(tmp_path / SNAPSHOT_DIR))
    with pytest.raises(SnapshotError, match="rows"):
        read_snapshot(paths[newest])
    recovered = loaded(tmp_path)  # the older one, and the journal after it
    assert recovered.snapshot_seq == older and recovered.replayed == newest - older
    assert np.array_equal(recovered.state.arrays["rows"], table[:1_000])
    assert list(recovered.state.arrays["small"]) == [1, 2, 3]
    # the next snapshot writes the rows past the older one again, over the damaged ones
    store = open_store(tmp_path)
    checkpoint(store, table[:1_200])
    store.close()
    assert np.array_equal(loaded(tmp_path).state.arrays["rows"], table[:1_200])


def test_a_snapshot_set_aside_keeps_the_rows_file_only_it_names(tmp_path: Path) -> None:
    """A snapshot recovery skipped goes to ``*.corrupt`` with the rows file only it names,
    whole, damaged row included: later snapshots and their pruning leave both in place."""
    store, table, _, newest = two_kept(tmp_path, 1_300)
    store.close()
    damaged = _files_by_rows(tmp_path)[1_100]
    with open(damaged, "r+b") as f:
        f.seek(5 * ROW.itemsize + 3)
        f.write(b"\x55")
    held = damaged.read_bytes()
    store = open_store(tmp_path)  # recovers from the older snapshot and sets the newest aside
    for count in (1_200, 1_300):
        checkpoint(store, table[:count])
    store.close()
    directory = tmp_path / SNAPSHOT_DIR
    aside = directory / f"{damaged.name}.corrupt"
    assert aside.read_bytes() == held
    assert (directory / f"{newest:020d}.npz.corrupt").is_file()
    assert [r.file for r in snapshot_rows(directory / f"{newest:020d}.npz.corrupt").values()
            ] == [damaged.name]
    assert np.array_equal(loaded(tmp_path).state.arrays["rows"], table[:1_300])


def test_a_short_rows_file_or_another_dtype_refuses_the_snapshot(tmp_path: Path) -> None:
    store = open_store(tmp_path)
    seq = checkpoint(store, rows(500))
    store.close()
    [rows_file] = (tmp_path / SNAPSHOT_DIR).glob("*.rows")
    path = dict(list_snapshots(tmp_path / SNAPSHOT_DIR))[seq]
    os_size = rows_file.stat().st_size
    with open(rows_file, "r+b") as f:
        f.truncate(os_size - 1)
    with pytest.raises(SnapshotError, match="rows"):
        read_snapshot(path)
    rows_file.unlink()
    with pytest.raises(SnapshotError, match="rows"):
        read_snapshot(path)


def test_a_damaged_row_of_the_older_snapshots_file_leaves_the_newest_whole(
        tmp_path: Path) -> None:
    store = open_store(tmp_path)
    table = rows(1_100)
    checkpoint(store, table[:1_000])
    newest = checkpoint(store, table)
    store.close()
    with open(_files_by_rows(tmp_path)[1_000], "r+b") as f:
        f.seek(10 * ROW.itemsize)
        f.write(b"\x55")
    recovered = loaded(tmp_path)
    assert recovered.snapshot_seq == newest
    assert np.array_equal(recovered.state.arrays["rows"], table)


def test_a_dtype_change_starts_a_new_file_and_pruning_removes_the_unnamed_ones(
        tmp_path: Path) -> None:
    store = open_store(tmp_path)
    checkpoint(store, rows(300))
    wider = np.dtype([*((n, ROW[n]) for n in ROW.names), ("fee_micros", "<i8")])
    checkpoint(store, rows(400, wider))
    assert len(list((tmp_path / SNAPSHOT_DIR).glob("*.rows"))) == 2  # the older names one
    checkpoint(store, rows(500, wider))
    # the first one's file (the narrower rows) went with it; the two kept have one each
    assert sorted(p.stat().st_size for p in (tmp_path / SNAPSHOT_DIR).glob("*.rows")) == [
        400 * wider.itemsize, 500 * wider.itemsize]
    store.close()
    got = loaded(tmp_path).state.arrays["rows"]
    assert got.dtype == wider and np.array_equal(got, rows(500, wider))


def test_an_array_whose_first_rows_are_not_the_files_starts_a_new_file(tmp_path: Path) -> None:
    """A state may give an append-only array written anew (its answers table, once half of it
    expired): shorter, then past the rows the file of the snapshot it pushes out holds. Those
    rows are not its first ones, so that file is not extended."""
    store = open_store(tmp_path)
    checkpoint(store, rows(1_000))
    checkpoint(store, rows(1_100))
    anew = rows(1_300)
    anew["owner"] += 1  # same dtype, more rows, other first ones
    checkpoint(store, anew[:400])
    checkpoint(store, anew)  # pushes out the 1,100 rows' snapshot, whose file it would extend
    store.close()
    got = loaded(tmp_path).state.arrays["rows"]
    assert np.array_equal(got, anew)
    assert sorted(p.stat().st_size for p in (tmp_path / SNAPSHOT_DIR).glob("*.rows")) == [
        400 * ROW.itemsize, 1_300 * ROW.itemsize]


def test_snapshots_holding_the_array_inside_still_load_and_the_next_one_moves_it_out(
        tmp_path: Path) -> None:
    table = rows(2_000)
    write_snapshot(tmp_path / SNAPSHOT_DIR, 0, {"rows": table[:1_000], "small": np.arange(3)},
                   {"count": 1_000})
    recovered = loaded(tmp_path)
    assert np.array_equal(recovered.state.arrays["rows"], table[:1_000])
    store = open_store(tmp_path)
    checkpoint(store, table[:1_500])
    checkpoint(store, table)
    store.close()
    assert np.array_equal(loaded(tmp_path).state.arrays["rows"], table)
    assert not [n for n in sizes(tmp_path) if n.endswith(".npz")
                and n.startswith("0" * 20)]  # the old one was pruned


def test_a_damaged_row_is_not_carried_into_the_snapshots_that_follow(tmp_path: Path) -> None:
    # the next snapshot takes over the damaged file of the one it pushes out: extending it
    # would make it, and every other one after it, refuse itself, leaving one usable snapshot
    # of the two kept for good, with the journal trimmed to the older, unusable one
    store, table, _, _ = two_kept(tmp_path, 1_500)
    with open(_files_by_rows(tmp_path)[1_000], "r+b") as f:
        f.seek(10 * ROW.itemsize)
        f.write(b"\x55")
    for count in (1_200, 1_300, 1_400):
        checkpoint(store, table[:count])
        for _, path in list_snapshots(tmp_path / SNAPSHOT_DIR):
            assert np.array_equal(read_snapshot(path).arrays["rows"],
                                  table[:read_snapshot(path).meta["count"]])
    store.close()


@pytest.mark.parametrize("entry", [
    {"file": "../outside.rows", "row_count": 0, "crc32": 0},
    {"file": "00000000000000000001.npz", "row_count": 0, "crc32": 0},
    {"file": "rows.1.rows", "row_count": "5", "crc32": 0},
])
def test_an_entry_naming_another_file_or_no_count_is_not_extended(
        tmp_path: Path, entry: dict[str, Any]) -> None:
    # the entry of the snapshot pushed out is read unvalidated: the writer must neither write
    # outside the directory nor over a kept snapshot, nor fail at every snapshot after
    store = open_store(tmp_path)
    table = rows(300)
    newest = checkpoint(store, table[:100])
    store.close()
    (tmp_path / "outside.rows").write_bytes(b"")
    descr = np.lib.format.dtype_to_descr(ROW)
    write_snapshot(tmp_path / SNAPSHOT_DIR, 0, {"small": np.arange(3)}, {"count": 0},
                   {"rows": Rows(descr=descr, **entry)})
    store = open_store(tmp_path)
    assert store.recovered is not None and store.recovered.snapshot_seq == newest
    latest = checkpoint(store, table[:200])
    store.close()
    assert (tmp_path / "outside.rows").stat().st_size == 0
    for seq, path in list_snapshots(tmp_path / SNAPSHOT_DIR):
        if seq:
            assert np.array_equal(read_snapshot(path).arrays["rows"],
                                  table[:read_snapshot(path).meta["count"]])
    assert [s for s, _ in list_snapshots(tmp_path / SNAPSHOT_DIR)] == [latest, newest]


def test_a_snapshot_written_again_at_its_seq_leaves_the_kept_ones_a_file_each(
        tmp_path: Path) -> None:
    # a checkpoint with nothing journaled since replaces the newest snapshot under its name:
    # had it taken over the older one's file, the two kept would share it from then on, and a
    # damaged row both cover would refuse both
    store, table, _, _ = two_kept(tmp_path, 1_500)
    again = store.checkpoint(lambda: ({"rows": table[:1_100], "small": np.arange(3)},
                                      {"count": 1_100}))
    older = checkpoint(store, table[:1_200])
    newest = checkpoint(store, table[:1_300])
    store.close()
    assert [s for s, _ in list_snapshots(tmp_path / SNAPSHOT_DIR)] == [newest, older] \
        and older > again
    files = [r.file for _, path in list_snapshots(tmp_path / SNAPSHOT_DIR)
             for r in snapshot_rows(path).values()]
    assert len(set(files)) == 2
    with open(_files_by_rows(tmp_path)[1_300], "r+b") as f:
        f.seek(10 * ROW.itemsize + 3)
        f.write(b"\x55")
    recovered = loaded(tmp_path)
    assert recovered.snapshot_seq == older
    assert np.array_equal(recovered.state.arrays["rows"], table[:1_200])
