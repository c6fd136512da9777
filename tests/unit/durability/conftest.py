"""Fixtures for the durability tests."""

from __future__ import annotations

import cluster.durability.journal as journal_module
import pytest


@pytest.fixture
def syncs(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The file descriptors the journal flushes to disk (``_fdatasync``), in order; each
    flush still happens."""
    flushed: list[int] = []
    real = journal_module._fdatasync

    def counted(fd: int) -> None:
        flushed.append(fd)
        real(fd)

    monkeypatch.setattr(journal_module, "_fdatasync", counted)
    return flushed
