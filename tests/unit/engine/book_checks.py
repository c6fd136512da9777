"""Checks shared by the tests that drive a fast book (positions or pending orders) in lockstep
with its reference: a record taken out of both, and a sweep against the naive full sweep."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

Swept = tuple[np.ndarray, np.ndarray]
"""What a sweep returns: the ids (int64) and, per id, its close reason or order outcome (int8)."""


def assert_same_but_id(got: Any, want: Any, id_field: str) -> None:
    """``got`` (from the fast book) and ``want`` (from the reference) are both records of the
    same type, equal in every field but ``id_field``: each book issues its own ids."""
    assert got is not None and want is not None
    assert got._replace(**{id_field: 0}) == want._replace(**{id_field: 0})


def checked_sweep(book: Any, naive: Callable[..., Swept], *tick: Any) -> Swept:
    """``book.sweep(*tick)``, checked: ids unique and ascending, the same answer as the naive
    full sweep ``naive(book, *tick)``, and again when asked twice (a sweep changes nothing)."""
    ids, codes = book.sweep(*tick)
    assert ids.dtype == np.int64 and codes.dtype == np.int8
    assert ids.tolist() == sorted(set(ids.tolist())), "ids must be unique and ascending"
    naive_ids, naive_codes = naive(book, *tick)
    assert np.array_equal(ids, naive_ids) and np.array_equal(codes, naive_codes)
    again_ids, again_codes = book.sweep(*tick)
    assert np.array_equal(ids, again_ids) and np.array_equal(codes, again_codes)
    return ids, codes
