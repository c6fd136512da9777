"""A real local Ray for the actor shells (started once per session unless one is running)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import ray


@pytest.fixture(scope="session")
def ray_session() -> Iterator[None]:
    started = False
    if not ray.is_initialized():
        # address="local": always a fresh local Ray, never a cluster someone else started
        ray.init(address="local", num_cpus=2, include_dashboard=False, ignore_reinit_error=True,
                 log_to_driver=False, _node_ip_address="127.0.0.1")
        started = True
    try:
        yield
    finally:
        if started:
            ray.shutdown()
