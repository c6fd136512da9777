"""Atomic snapshots of an actor's state: numpy arrays plus JSON metadata, newest valid one wins.

A snapshot is one ``.npz`` file (uncompressed zip of ``.npy`` arrays, loadable with
``np.load(path, allow_pickle=False)``) named by the journal seq it covers
(``00000000000000000042.npz``: the state after applying every record up to seq 42). Next to the
caller's arrays it holds one extra entry, ``__meta__``: UTF-8 JSON with the format version, the
seq, the caller's ``meta`` dict, the dtype, shape and crc32 of every array, and a crc32 of
itself. A snapshot is accepted only if all of that checks out.

Writing is crash-atomic: the file is written under a temporary name, fsynced, renamed into
place, and the directory is fsynced, so a reader only ever sees a complete snapshot or none,
and the newest one that validates is the one :func:`load_latest_snapshot` returns.
"""

from __future__ import annotations

import json
import logging
import os
import zlib
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from cluster.durability.journal import create_directory, fsync_directory

SNAPSHOT_FORMAT = 1
SNAPSHOT_SUFFIX = ".npz"
TEMP_SUFFIX = ".tmp"
META_KEY = "__meta__"
DEFAULT_KEEP = 2

_log = logging.getLogger(__name__)


class SnapshotError(ValueError):
    """A snapshot file that is not a complete, self-consistent snapshot."""


class Snapshot(NamedTuple):
    """A loaded snapshot: ``seq`` (last journal seq it covers), ``arrays``, ``meta``."""

    seq: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


def snapshot_path(directory: str | os.PathLike[str], seq: int) -> Path:
    return Path(directory) / f"{seq:020d}{SNAPSHOT_SUFFIX}"


def snapshot_seq(path: Path) -> int | None:
    """The journal seq a snapshot file's name says it covers, or None for another name."""
    stem = path.name[: -len(SNAPSHOT_SUFFIX)]
    if not path.name.endswith(SNAPSHOT_SUFFIX) or len(stem) != 20 or not stem.isdigit():
        return None
    return int(stem)


def _array_crc32(array: np.ndarray) -> int:
    flat = np.ascontiguousarray(array).reshape(-1).view(np.uint8)
    return zlib.crc32(flat.data)


def _canonical(body: Mapping[str, Any]) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False).encode()


def _checked_body(header: bytes, name: str) -> Any:
    """The body of a ``__meta__`` header once its crc32 checks out; SnapshotError if not.

    The writer's header is ``{"body":<canonical body>,"crc32":N}`` (sorted keys), so the
    checksum is taken over those bytes as they are: encoding the parsed body again to check it
    cost as much as parsing it (a third of a second for a ledger of 50,000 accounts). A header
    of another shape is parsed whole and its body encoded again, as before."""
    head, tail = b'{"body":', b',"crc32":'
    cut = header.rfind(tail)
    digits = header[cut + len(tail):-1]
    if header.startswith(head) and header.endswith(b"}") and cut > 0 and digits.isdigit():
        canonical = header[len(head):cut]
        if zlib.crc32(canonical) != int(digits):
            raise SnapshotError(f"{name}: metadata checksum mismatch")
        return json.loads(canonical)
    parsed = json.loads(header.decode())
    if zlib.crc32(_canonical(parsed["body"])) != parsed["crc32"]:
        raise SnapshotError(f"{name}: metadata checksum mismatch")
    return parsed["body"]


def write_snapshot(directory: str | os.PathLike[str], seq: int,
                   arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> Path:
    """Durably write the snapshot covering journal records ``<= seq``; return its path.

    ``arrays``: name -> any non-object numpy array (names are zip entries: no ``/``, not
    ``__meta__``). ``meta``: a JSON-serialisable dict (ints of any size, no NaN). Returns only
    after the file and its directory entry are on disk.
    """
    if seq < 0:
        raise ValueError("seq must be >= 0")
    directory = create_directory(directory)
    described: dict[str, Any] = {}
    prepared: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        if name == META_KEY or not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid snapshot array name {name!r}")
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} has an object dtype (would need pickle)")
        prepared[name] = array
        described[name] = {"dtype": array.dtype.str, "shape": list(array.shape),
                           "crc32": _array_crc32(array)}
    body = {"format": SNAPSHOT_FORMAT, "seq": int(seq), "meta": dict(meta), "arrays": described}
    canonical = _canonical(body)
    header = json.dumps({"crc32": zlib.crc32(canonical), "body": body}, sort_keys=True,
                        separators=(",", ":")).encode()
    prepared[META_KEY] = np.frombuffer(header, dtype=np.uint8)

    final = snapshot_path(directory, seq)
    temp = directory / f".{final.name}.{os.getpid()}{TEMP_SUFFIX}"
    try:
        with open(temp, "wb") as f:
            np.savez(f, allow_pickle=False, **prepared)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    fsync_directory(directory)
    return final


def read_snapshot(path: str | os.PathLike[str]) -> Snapshot:
    """Load and fully validate one snapshot file; raise :class:`SnapshotError` if it is bad."""
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            if META_KEY not in z.files:
                raise SnapshotError(f"{path.name}: no {META_KEY} entry")
            body = _checked_body(bytes(z[META_KEY]), path.name)
            if body["format"] != SNAPSHOT_FORMAT:
                raise SnapshotError(f"{path.name}: unknown format {body['format']!r}")
            described = body["arrays"]
            if set(described) != set(z.files) - {META_KEY}:
                raise SnapshotError(f"{path.name}: array set differs from its metadata")
            arrays: dict[str, np.ndarray] = {}
            for name, d in described.items():
                array = z[name]
                if (array.dtype.str != d["dtype"] or list(array.shape) != d["shape"]
                        or _array_crc32(array) != d["crc32"]):
                    raise SnapshotError(f"{path.name}: array {name!r} fails its checksum")
                arrays[name] = array
    except SnapshotError:
        raise
    except Exception as exc:  # a truncated/garbled zip raises many kinds of errors
        raise SnapshotError(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from exc
    seq = body["seq"]
    if snapshot_seq(path) not in (None, seq):
        raise SnapshotError(f"{path.name}: holds seq {seq}, not the one in its name")
    return Snapshot(int(seq), arrays, body["meta"])


def list_snapshots(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(seq, path)`` of every snapshot-named file in ``directory``, newest first (unvalidated;
    anything else under such a name, a directory say, is no snapshot and is left alone: pruning
    it would fail every time, and the journal would never be trimmed)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(((s, p) for p in directory.iterdir()
                   if (s := snapshot_seq(p)) is not None and p.is_file()), reverse=True)


def load_latest_snapshot(directory: str | os.PathLike[str],
                         accept: Callable[[Snapshot], object] = lambda _: None,
                         skipped: list[Path] | None = None) -> Snapshot | None:
    """The newest snapshot in ``directory`` that validates and that ``accept`` does not raise
    for (the state's own checks of its content), or None if there is none.

    Corrupt or partial files and refused ones are skipped (logged, and added to ``skipped``),
    so a crash while a newer snapshot was being written, or a damaged newest file, falls back
    to the previous one.
    """
    for _, path in list_snapshots(directory):
        try:
            snapshot = read_snapshot(path)
            try:
                accept(snapshot)
            except Exception as exc:  # its checksums hold, its content does not
                raise SnapshotError(f"the state refuses it ({type(exc).__name__}: {exc})"
                                    ) from exc
        except SnapshotError as exc:
            _log.warning("skipping snapshot %s: %s", path, exc)
            if skipped is not None:
                skipped.append(path)
            continue
        return snapshot
    return None


def prune_snapshots(directory: str | os.PathLike[str], keep: int = DEFAULT_KEEP) -> list[Path]:
    """Delete all but the ``keep`` newest snapshots and any leftover temporary files.

    Call it from the single writer right after :func:`write_snapshot` returned (so the newest
    snapshot is known good). Returns the deleted paths.
    """
    if keep < 1:
        raise ValueError("keep at least one snapshot")
    directory = Path(directory)
    removed: list[Path] = []
    for _, path in list_snapshots(directory)[keep:]:
        path.unlink(missing_ok=True)
        removed.append(path)
    removed += remove_temporaries(directory, flush=False)
    if removed:
        fsync_directory(directory)
    return removed


def remove_temporaries(directory: str | os.PathLike[str], flush: bool = True) -> list[Path]:
    """Delete the temporary files of snapshots never finished (a writer that ended while it
    wrote one); only the single writer may call it, when none of its own is being written.
    ``flush``: make the removal durable. Returns the deleted paths."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    removed = [path for path in directory.iterdir()
               if path.name.startswith(".") and path.name.endswith(TEMP_SUFFIX)]
    for path in removed:
        path.unlink(missing_ok=True)
    if removed and flush:
        fsync_directory(directory)
    return removed
