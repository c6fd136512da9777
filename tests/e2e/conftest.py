"""e2e fixtures: the platform behind a real loopback HTTP socket, and an HTTP client."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from cluster.config import Settings
from tests.e2e.http_platform import HttpPlatform
from tests.e2e.http_platform import LocalHttpPlatform

# the trading scenarios sign up many accounts from one address; the limits have their own tests
# (test_api_limits.py)
TRADING = Settings(api_key_rate_per_s=0, signups_per_min=0)


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
