"""Fixtures for the cluster unit tests: the service over in-process ports (no Ray, no network)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest_asyncio
from tests.unit.cluster.local_platform import Make
from tests.unit.cluster.local_platform import Platform
from tests.unit.cluster.local_platform import build_platform


@pytest_asyncio.fixture
async def platform() -> AsyncIterator[Platform]:
    p = build_platform()
    yield p
    assert await p.audit() == []
    await p.service.aclose()
    p.hosts.close()


@pytest_asyncio.fixture
async def make() -> AsyncIterator[Make]:
    """build_platform(...) and more services, for tests that need their own; each is closed
    afterwards."""
    m = Make()
    yield m
    await m.close()
