"""Fixtures for the durability tests."""

from __future__ import annotations

from pathlib import Path

import cluster.durability.journal as journal_module
import pytest
from tests.unit.durability.power import PowerCut


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


@pytest.fixture
def power(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> PowerCut:
    """A power cut of ``tmp_path``: :meth:`PowerCut.cut` drops the entries never flushed."""
    return PowerCut(tmp_path, monkeypatch)
