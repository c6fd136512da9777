"""Fixtures of the market-data integration tests: a local Ray for the feed actor tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray (2 CPUs, no dashboard), started once per session and shared."""
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield None
    if started:
        ray.shutdown()
