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

An array whose rows are only ever appended to (a history since the start) is not in the
``.npz``: :func:`append_rows` keeps it in a file of raw rows next to the snapshots
(``<name>.<n>.rows``), writing only the rows past the ones the file holds, and the snapshot
names, in its ``__rows__`` entry, that file with the dtype, the count and the crc32 of the rows
it covers (``__rows__`` is checksummed by ``__meta__``). Each kept snapshot names a file of its
own, which the snapshot pushing it out extends (cluster.durability.store): a snapshot costs
its new rows, not all of them. Those rows are on disk (fsynced) before the snapshot that names
them is renamed into place; bytes past the rows a file's snapshot covers (a crash mid-append)
are cut by the next append.
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

from cluster.durability.journal import (
    create_directory,
    file_number,
    fsync_directory,
    numbered_files,
)

SNAPSHOT_FORMAT = 1
SNAPSHOT_SUFFIX = ".npz"
TEMP_SUFFIX = ".tmp"
META_KEY = "__meta__"
ROWS_KEY = "__rows__"
ROWS_SUFFIX = ".rows"
DEFAULT_KEEP = 2

_log = logging.getLogger(__name__)


class SnapshotError(ValueError):
    """A snapshot file that is not a complete, self-consistent snapshot."""


class Snapshot(NamedTuple):
    """A loaded snapshot: ``seq`` (last journal seq it covers), ``arrays``, ``meta``."""

    seq: int
    arrays: dict[str, np.ndarray]
    meta: dict[str, Any]


class Rows(NamedTuple):
    """The rows of an append-only array a snapshot covers: the first ``row_count`` rows of
    ``file`` (a name in the snapshot directory), of dtype ``descr``
    (``numpy.lib.format.dtype_to_descr``, as JSON gives it back), whose bytes have ``crc32``."""

    file: str
    descr: Any
    row_count: int
    crc32: int


def _descr(dtype: np.dtype) -> Any:
    """``dtype`` as JSON stores it (tuples become lists), to compare with a stored one."""
    return json.loads(json.dumps(np.lib.format.dtype_to_descr(dtype)))


def append_rows(directory: str | os.PathLike[str], name: str, array: np.ndarray,
                base: Rows | None) -> Rows:
    """Make the rows of ``array`` (1-d, any non-object dtype) durable in a rows file of
    ``directory``; the :class:`Rows` a snapshot names them by.

    ``base``: what the newest snapshot known good holds of this array (None: none). When
    ``array`` extends it (its dtype, at least its rows, its first rows theirs: their crc32)
    and the file holds those rows (their crc32: a file with a damaged one is not extended),
    the file is cut back to ``base.row_count`` rows (anything past them is a torn append, or
    rows of a snapshot never published) and only ``array[base.row_count:]`` is appended, its
    crc32 extending ``base.crc32``; else a new file is started (``<name>.<n>.rows``, ``n``
    past every one there). Returns once the rows are fsynced (and a new file's directory
    entry too).
    """
    directory = create_directory(directory)
    array = np.asarray(array)
    if array.ndim != 1 or array.dtype.hasobject:
        raise ValueError(f"append-only array {name!r} must be 1-d and without objects")
    descr = _descr(array.dtype)
    itemsize = array.dtype.itemsize
    # ``base`` comes from a snapshot's entry read unvalidated: a file elsewhere, counts that
    # are no counts or rows that fail their crc32 (a damaged row, which extending the file
    # would carry into this snapshot and every one extending it after) start a new file
    if base is not None and not (_rows_file_of(name, base.file) and all(
            type(v) is int and v >= 0 for v in (base.row_count, base.crc32))):
        base = None
    path = None if base is None else directory / base.file
    if (base is None or base.descr != descr or len(array) < base.row_count
            or _array_crc32(array[:base.row_count]) != base.crc32  # (another array's rows)
            or path is None or not path.is_file()
            or path.stat().st_size < base.row_count * itemsize
            or _file_crc32(path, base.row_count * itemsize) != base.crc32):
        taken = [int(p.name[len(name) + 1:-len(ROWS_SUFFIX)]) for p in directory.iterdir()
                 if _rows_file_of(name, p.name)]
        base = Rows(f"{name}.{max(taken, default=0) + 1}{ROWS_SUFFIX}", descr, 0, 0)
        path = directory / base.file
    new = np.ascontiguousarray(array[base.row_count:]).view(np.uint8).reshape(-1)
    created = not path.exists()
    with open(path, "r+b" if not created else "wb") as f:
        f.truncate(base.row_count * itemsize)
        f.seek(base.row_count * itemsize)
        f.write(new.data)
        f.flush()
        os.fsync(f.fileno())
    if created:
        fsync_directory(directory)
    return Rows(base.file, descr, len(array), zlib.crc32(new.data, base.crc32))


def _rows_file_of(name: str, file: str) -> bool:
    """Whether ``file`` is a name :func:`append_rows` gives a rows file of ``name``
    (``<name>.<n>.rows``), not a path elsewhere or another file of the directory."""
    if not isinstance(file, str):
        return False
    number = file[len(name) + 1:-len(ROWS_SUFFIX)]
    return (file.startswith(f"{name}.") and file.endswith(ROWS_SUFFIX) and number.isdigit()
            and "/" not in name and not name.startswith("."))


def _file_crc32(path: Path, size_bytes: int, chunk_bytes: int = 1 << 24) -> int:
    """The crc32 of the first ``size_bytes`` of ``path`` (-1 if it holds fewer)."""
    crc = 0
    with open(path, "rb") as f:
        while size_bytes > 0:
            chunk = f.read(min(chunk_bytes, size_bytes))
            if not chunk:
                return -1
            crc = zlib.crc32(chunk, crc)
            size_bytes -= len(chunk)
    return crc


def _read_rows(directory: Path, name: str, rows: Rows, snapshot: str) -> np.ndarray:
    """The ``rows.row_count`` rows a snapshot names; SnapshotError unless they are all there, of
    their dtype, with their crc32."""
    try:
        dtype = np.dtype(np.lib.format.descr_to_dtype(rows.descr))
    except Exception as exc:
        raise SnapshotError(f"{snapshot}: rows of {name!r} of an unknown dtype") from exc
    if not _rows_file_of(name, rows.file):
        raise SnapshotError(f"{snapshot}: rows of {name!r} in a file named {rows.file!r}")
    try:
        with open(directory / rows.file, "rb") as f:
            array = np.fromfile(f, dtype=dtype, count=rows.row_count)
    except (OSError, ValueError) as exc:
        raise SnapshotError(f"{snapshot}: rows of {name!r} unreadable ({exc})") from exc
    if len(array) != rows.row_count:
        raise SnapshotError(f"{snapshot}: rows file {rows.file} holds {len(array)} rows of "
                            f"{name!r}, not {rows.row_count}")
    if zlib.crc32(array.view(np.uint8).data) != rows.crc32:
        raise SnapshotError(f"{snapshot}: rows of {name!r} fail their checksum")
    return array


def snapshot_path(directory: str | os.PathLike[str], seq: int) -> Path:
    return Path(directory) / f"{seq:020d}{SNAPSHOT_SUFFIX}"


def snapshot_seq(path: Path) -> int | None:
    """The journal seq a snapshot file's name says it covers, or None for another name."""
    return file_number(path, SNAPSHOT_SUFFIX)


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
                   arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any],
                   rows: Mapping[str, Rows] | None = None) -> Path:
    """Durably write the snapshot covering journal records ``<= seq``; return its path.

    ``arrays``: name -> any non-object numpy array (names are zip entries: no ``/``, not
    ``__meta__`` or ``__rows__``). ``meta``: a JSON-serialisable dict (ints of any size, no
    NaN). ``rows``: name -> the rows :func:`append_rows` made durable for each append-only
    array (read back among ``arrays``). Returns only after the file and its directory entry
    are on disk.
    """
    if seq < 0:
        raise ValueError("seq must be >= 0")
    directory = create_directory(directory)
    described: dict[str, Any] = {}
    prepared: dict[str, np.ndarray] = {}
    for name, value in arrays.items():
        array = np.asarray(value)
        if name in (META_KEY, ROWS_KEY) or not name or "/" in name or name.startswith(".") \
                or name in (rows or {}):
            raise ValueError(f"invalid snapshot array name {name!r}")
        if array.dtype.hasobject:
            raise ValueError(f"array {name!r} has an object dtype (would need pickle)")
        prepared[name] = array
        described[name] = {"dtype": array.dtype.str, "shape": list(array.shape),
                           "crc32": _array_crc32(array)}
    body = {"format": SNAPSHOT_FORMAT, "seq": int(seq), "meta": dict(meta), "arrays": described}
    if rows:
        # apart from __meta__ (checksummed by it), so that pruning and the next append read
        # only this entry, not a meta that can take a third of a second to parse
        named = _canonical({name: r._asdict() for name, r in rows.items()})
        prepared[ROWS_KEY] = np.frombuffer(named, dtype=np.uint8)
        body["rows_crc32"] = zlib.crc32(named)
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
            if set(described) != set(z.files) - {META_KEY, ROWS_KEY}:
                raise SnapshotError(f"{path.name}: array set differs from its metadata")
            rows: dict[str, Rows] = {}
            if "rows_crc32" in body or ROWS_KEY in z.files:
                named = bytes(z[ROWS_KEY]) if ROWS_KEY in z.files else b""
                if zlib.crc32(named) != body.get("rows_crc32"):
                    raise SnapshotError(f"{path.name}: {ROWS_KEY} fails its checksum")
                rows = {name: Rows(**r) for name, r in json.loads(named).items()}
            arrays: dict[str, np.ndarray] = {}
            for name, d in described.items():
                array = z[name]
                if (array.dtype.str != d["dtype"] or list(array.shape) != d["shape"]
                        or _array_crc32(array) != d["crc32"]):
                    raise SnapshotError(f"{path.name}: array {name!r} fails its checksum")
                arrays[name] = array
            for name, r in rows.items():
                arrays[name] = _read_rows(path.parent, name, r, path.name)
    except SnapshotError:
        raise
    except Exception as exc:  # a truncated/garbled zip raises many kinds of errors
        raise SnapshotError(f"{path.name}: unreadable ({type(exc).__name__}: {exc})") from exc
    seq = body["seq"]
    if snapshot_seq(path) not in (None, seq):
        raise SnapshotError(f"{path.name}: holds seq {seq}, not the one in its name")
    return Snapshot(int(seq), arrays, body["meta"])


def snapshot_rows(path: str | os.PathLike[str]) -> dict[str, Rows]:
    """The rows files a snapshot names, read from its ``__rows__`` entry alone (unvalidated:
    :func:`read_snapshot` checks them); SnapshotError if that cannot be read."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if ROWS_KEY not in z.files:
                return {}
            return {name: Rows(**r) for name, r in json.loads(bytes(z[ROWS_KEY])).items()}
    except Exception as exc:
        raise SnapshotError(f"{Path(path).name}: {ROWS_KEY} unreadable ({exc})") from exc


def rows_files_of_only(path: Path, others: list[Path]) -> list[Path]:
    """The rows files snapshot ``path`` names that exist and none of the snapshots ``others``
    names (none when an entry cannot be read: a file another may need is left in place)."""
    try:
        named = {r.file for other in others for r in snapshot_rows(other).values()}
        own = snapshot_rows(path)
    except SnapshotError:
        return []
    return [path.parent / r.file for name, r in own.items()
            if _rows_file_of(name, r.file) and r.file not in named
            and (path.parent / r.file).is_file()]


def list_snapshots(directory: str | os.PathLike[str]) -> list[tuple[int, Path]]:
    """``(seq, path)`` of every snapshot-named file in ``directory``, newest first (unvalidated;
    anything else under such a name, a directory say, is no snapshot and is left alone: pruning
    it would fail every time, and the journal would never be trimmed)."""
    return numbered_files(directory, SNAPSHOT_SUFFIX)[::-1]


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
    """Delete all but the ``keep`` newest snapshots, the rows files none of them names (none,
    if one of them cannot be read) and any leftover temporary files.

    Call it from the single writer right after :func:`write_snapshot` returned (so the newest
    snapshot is known good). Returns the deleted paths.
    """
    if keep < 1:
        raise ValueError("keep at least one snapshot")
    directory = Path(directory)
    removed: list[Path] = []
    listed = list_snapshots(directory)
    for _, path in listed[keep:]:
        path.unlink(missing_ok=True)
        removed.append(path)
    try:
        named = {r.file for _, path in listed[:keep] for r in snapshot_rows(path).values()}
        unnamed = [path for path in (directory.iterdir() if directory.is_dir() else ())
                   if path.name.endswith(ROWS_SUFFIX) and path.name not in named
                   and path.is_file()]
        for path in unnamed:
            path.unlink(missing_ok=True)
        removed += unnamed
    except SnapshotError as exc:  # a kept one may need any of them: keep them all
        _log.warning("keeping every rows file of %s: %s", directory, exc)
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
