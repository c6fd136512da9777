"""Position ids: one int64 encodes the book it lives in, its row there, and the row's reuse count.

Layout (bit 63 always 0, so ids are positive)::

    bits 34..62  generation (1 .. 2**29 - 1): bumped each time the row is reused
    bits  8..33  row in the book's columns (0 .. 2**26 - 1)
    bits  0..7   book_tag (0..255): which book (shard split) issued it

An id therefore finds its row without a dict, a stale id (closed position, reused row) is told
apart from the live one by comparing it with the book's id column, and ids from different books
never collide. A row whose generation is exhausted is retired, so an id is never issued twice.
"""

from __future__ import annotations

import numpy as np

TAG_BITS = 8
ROW_BITS = 26
GEN_BITS = 29
ROW_SHIFT = TAG_BITS
GEN_SHIFT = TAG_BITS + ROW_BITS
TAG_MASK = (1 << TAG_BITS) - 1
ROW_MASK = (1 << ROW_BITS) - 1
MAX_BOOK_TAG = TAG_MASK
MAX_ROWS = 1 << ROW_BITS
MAX_GENERATION = (1 << GEN_BITS) - 1


def make_position_id(generation: int, row: int, book_tag: int) -> int:
    """Encode an id; ValueError when a field is out of range."""
    if not (1 <= generation <= MAX_GENERATION and 0 <= row < MAX_ROWS
            and 0 <= book_tag <= MAX_BOOK_TAG):
        raise ValueError("position id field out of range")
    return (generation << GEN_SHIFT) | (row << ROW_SHIFT) | book_tag


PARTIAL_CLOSE_FLAG = 1 << 63
MAX_CLOSE_SEQ = (1 << (63 - TAG_BITS)) - 1


def partial_close_id(settlement_seq: int, book_tag: int) -> int:
    """The id of a partial close, settlement ``settlement_seq`` (1..MAX_CLOSE_SEQ) of the book
    ``book_tag``: bit 63 set (no position id has it), the seq above the tag. A whole close is
    named by its position's id instead. ValueError when a field is out of range."""
    if not (1 <= settlement_seq <= MAX_CLOSE_SEQ and 0 <= book_tag <= MAX_BOOK_TAG):
        raise ValueError("partial close id field out of range")
    return PARTIAL_CLOSE_FLAG | (settlement_seq << TAG_BITS) | book_tag


def book_tag_of(position_id: int) -> int:
    """The book_tag (0..255) of the book that issued ``position_id``."""
    return int(position_id) & TAG_MASK


def row_of(position_id: int) -> int:
    return (int(position_id) >> ROW_SHIFT) & ROW_MASK


def generation_of(position_id: int) -> int:
    return int(position_id) >> GEN_SHIFT


def rows_of(position_ids: np.ndarray) -> np.ndarray:
    """Rows (int64) of an int64 array of ids."""
    return (position_ids >> ROW_SHIFT) & ROW_MASK


def is_position_id(value: object) -> bool:
    """True for an int (not bool) that has the shape of a position id (positive, int64)."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool) \
        and 0 < int(value) < (1 << 63) and int(value) >> GEN_SHIFT >= 1


__all__ = [
    "MAX_BOOK_TAG",
    "MAX_CLOSE_SEQ",
    "MAX_GENERATION",
    "MAX_ROWS",
    "PARTIAL_CLOSE_FLAG",
    "book_tag_of",
    "generation_of",
    "is_position_id",
    "make_position_id",
    "partial_close_id",
    "row_of",
    "rows_of",
]
