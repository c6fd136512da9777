"""Snapshots: round trip, atomic publication, newest valid wins, pruning."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from cluster.durability.snapshot import META_KEY
from cluster.durability.snapshot import SnapshotError
from cluster.durability.snapshot import list_snapshots
from cluster.durability.snapshot import load_latest_snapshot
from cluster.durability.snapshot import prune_snapshots
from cluster.durability.snapshot import read_snapshot
from cluster.durability.snapshot import snapshot_path
from cluster.durability.snapshot import write_snapshot


def arrays(k: int) -> dict[str, np.ndarray]:
    return {
        "position_id": np.arange(k, k + 50, dtype=np.int64),
        "side": (np.arange(50) % 2).astype(np.int8),
        "grid": np.arange(12, dtype=np.int32).reshape(3, 4)[:, ::2],  # not contiguous
        "flags": np.array([True, False]),
        "empty": np.zeros(0, dtype=np.int64),
        "scalar": np.array(7, dtype=np.uint64),
    }


def same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and np.array_equal(a[k], b[k]) for k in a)


def test_round_trip(tmp_path: Path) -> None:
    meta = {"accounts": {"house": -(2**70)}, "name": "SOL-0", "list": [1, "x", None]}
    path = write_snapshot(tmp_path / "s", 42, arrays(1), meta)
    assert path == snapshot_path(tmp_path / "s", 42)
    snap = load_latest_snapshot(tmp_path / "s")
    assert snap is not None
    seq, got, got_meta = snap
    assert seq == 42 and got_meta == meta and same(got, arrays(1))
    # a plain numpy reader needs no pickle to open it
    with np.load(path, allow_pickle=False) as z:
        assert set(z.files) == {*arrays(1), META_KEY}
    assert not list((tmp_path / "s").glob(".*"))  # no temporary file left behind


def test_missing_or_empty_directory(tmp_path: Path) -> None:
    assert load_latest_snapshot(tmp_path / "nothing") is None
    (tmp_path / "empty").mkdir()
    assert load_latest_snapshot(tmp_path / "empty") is None
    assert prune_snapshots(tmp_path / "nothing") == []


def test_newest_valid_wins_and_partial_or_corrupt_files_are_skipped(tmp_path: Path) -> None:
    d = tmp_path / "s"
    write_snapshot(d, 10, arrays(10), {"n": 10})
    newest = write_snapshot(d, 20, arrays(20), {"n": 20})
    good = newest.read_bytes()
    # a crash mid-write leaves only a temporary file, which is never a candidate
    (d / f".{snapshot_path(d, 30).name}.999.tmp").write_bytes(good[: len(good) // 2])
    assert load_latest_snapshot(d).seq == 20  # type: ignore[union-attr]

    damages = {
        "truncated": good[: len(good) - 7],
        "half": good[: len(good) // 2],
        "empty": b"",
        "garbage": os.urandom(len(good)),
    }
    # flip one byte inside the array data (past the first local zip header)
    flipped = bytearray(good)
    flipped[200] ^= 0x01
    damages["flipped"] = bytes(flipped)
    for name, data in damages.items():
        newest.write_bytes(data)
        snap = load_latest_snapshot(d)
        assert snap is not None, name
        assert snap.seq == 10 and snap.meta == {"n": 10} and same(snap.arrays, arrays(10)), name
        with pytest.raises(SnapshotError):
            read_snapshot(newest)


def test_every_single_byte_flip_is_detected_or_harmless(tmp_path: Path) -> None:
    d = tmp_path / "s"
    small: dict[str, np.ndarray] = {"a": np.arange(6, dtype=np.int64),
                                    "b": np.array([1, 2], dtype=np.int8)}
    path = write_snapshot(d, 1, small, {"k": "v"})
    good = path.read_bytes()
    for offset in range(len(good)):
        damaged = bytearray(good)
        damaged[offset] ^= 0x10
        path.write_bytes(bytes(damaged))
        try:
            snap = read_snapshot(path)
        except SnapshotError:
            continue
        # zip metadata that does not change what is read (e.g. a timestamp) may survive
        assert snap.seq == 1 and snap.meta == {"k": "v"} and same(snap.arrays, small), offset


@pytest.mark.parametrize("as_written", [True, False])
def test_metadata_is_checksummed(tmp_path: Path, as_written: bool) -> None:
    """An edited body fails its checksum, in the writer's own layout (whose checksum is taken
    over the bytes as they are) and in any other."""
    d = tmp_path / "s"
    path = write_snapshot(d, 5, {"a": np.arange(3)}, {"balance": 100})
    with np.load(path, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    header = json.loads(bytes(entries[META_KEY]).decode())
    header["body"]["meta"]["balance"] = 1_000_000  # edited, checksum left alone
    text = json.dumps(header, sort_keys=True, separators=(",", ":")) if as_written \
        else json.dumps(header)
    entries[META_KEY] = np.frombuffer(text.encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **entries)
    with pytest.raises(SnapshotError, match="checksum"):
        read_snapshot(path)
    assert load_latest_snapshot(d) is None


def test_metadata_in_another_layout_is_read_when_its_checksum_holds(tmp_path: Path) -> None:
    d = tmp_path / "s"
    path = write_snapshot(d, 5, {"a": np.arange(3)}, {"balance": 100})
    with np.load(path, allow_pickle=False) as z:
        entries = {k: z[k] for k in z.files}
    header = json.loads(bytes(entries[META_KEY]).decode())
    entries[META_KEY] = np.frombuffer(json.dumps(header, indent=1).encode(), dtype=np.uint8)
    with open(path, "wb") as f:
        np.savez(f, **entries)
    assert read_snapshot(path).meta == {"balance": 100}


def test_a_file_renamed_to_another_seq_is_rejected(tmp_path: Path) -> None:
    d = tmp_path / "s"
    write_snapshot(d, 3, {"a": np.arange(3)}, {})
    snapshot_path(d, 3).rename(snapshot_path(d, 9))
    with pytest.raises(SnapshotError):
        read_snapshot(snapshot_path(d, 9))


def test_rejects_what_would_need_pickle_or_clash(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        write_snapshot(tmp_path, 1, {"o": np.array([object()])}, {})
    with pytest.raises(ValueError):
        write_snapshot(tmp_path, 1, {META_KEY: np.arange(2)}, {})
    with pytest.raises(TypeError):
        write_snapshot(tmp_path, 1, {}, {"not json": object()})
    assert list_snapshots(tmp_path) == []
    assert not list(tmp_path.iterdir())


def test_prune_keeps_the_newest_two_and_removes_temporaries(tmp_path: Path) -> None:
    d = tmp_path / "s"
    for seq in (5, 1, 30, 12):
        write_snapshot(d, seq, {"a": np.arange(seq)}, {"seq": seq})
    (d / ".00000000000000000040.npz.123.tmp").write_bytes(b"partial")
    removed = prune_snapshots(d)
    assert len(removed) == 3
    assert [s for s, _ in list_snapshots(d)] == [30, 12]
    assert sorted(p.name for p in d.iterdir()) == [snapshot_path(d, 12).name,
                                                   snapshot_path(d, 30).name]
    assert load_latest_snapshot(d).meta == {"seq": 30}  # type: ignore[union-attr]


def test_a_directory_named_like_a_snapshot_is_left_alone_and_pruning_goes_on(
        tmp_path: Path) -> None:
    """Before, it was listed as a snapshot: every prune raised on unlinking it, and the journal
    trim that follows a prune never ran, so the journal grew for good."""
    d = tmp_path / "s"
    stray = snapshot_path(d, 1)
    stray.mkdir(parents=True)
    for seq in (5, 12, 30):
        write_snapshot(d, seq, {"a": np.arange(seq)}, {"seq": seq})
    assert [p.name for p in prune_snapshots(d)] == [snapshot_path(d, 5).name]
    assert [s for s, _ in list_snapshots(d)] == [30, 12]
    assert stray.is_dir()
