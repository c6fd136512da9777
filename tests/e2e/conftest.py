"""e2e fixtures: the platform behind a real loopback HTTP socket, and an HTTP client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from tests.e2e.http_platform import TRADING
from tests.e2e.http_platform import HttpPlatform
from tests.e2e.http_platform import LocalHttpPlatform


@pytest.fixture(scope="session")
def platform() -> Iterator[HttpPlatform]:
    with LocalHttpPlatform(TRADING) as p:
        yield p


@pytest.fixture
def http(platform: HttpPlatform) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=platform.base_url, timeout=10) as client:
        yield client
    # the ledger invariant after every scenario
    assert platform.audit() == []
