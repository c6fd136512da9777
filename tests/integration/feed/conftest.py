"""Fixtures of the market-data integration tests: a local Ray for the feed actor tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A local Ray (2 CPUs, no dashboard), started once per session and shared."""
    import ray
    from ray._private.worker import init as ray_init

    started = not ray.is_initialized()
    if started:
        # The real ray.init even if a unit-test guard replaced ``ray.init`` for the session.
        ray_init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                 _node_ip_address="127.0.0.1")
    yield None
    if started:
        ray.shutdown()
