"""Shared fixtures for the whole suite (keep this file small and generic)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from hypothesis import settings

# Each example's time is not what a property tests: on a loaded machine Hypothesis's default
# deadline of 200 ms per example failed correct tests. Speed is measured by `make bench`.
settings.register_profile("suite", deadline=None)
settings.load_profile("suite")


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """The embedded Tansu broker on a free loopback port, once per session; yields the bootstrap
    string (``"127.0.0.1:PORT"``). Memory-only: a test that restarts it (``kafka_broker_process``)
    loses every topic, as in production."""
    from feed.broker import EmbeddedBroker
    from feed.broker import free_port

    # no trimmer thread (tests that trim start their own): its Kafka client draws from the
    # global ``random`` every second, which Hypothesis, generating examples in the same
    # process, takes for a strategy using it and fails that test
    broker = EmbeddedBroker("127.0.0.1", free_port(), trim={})
    broker.start()
    _BROKERS[broker.bootstrap] = broker
    try:
        yield broker.bootstrap
    finally:
        _BROKERS.pop(broker.bootstrap, None)
        broker.stop()


@pytest.fixture(scope="session")
def kafka_broker_process(kafka_broker: str) -> object:
    """The :class:`feed.broker.EmbeddedBroker` behind ``kafka_broker`` (to restart it)."""
    return _BROKERS[kafka_broker]


_BROKERS: dict[str, object] = {}


def _end_sessions_of_this_process() -> None:
    """SIGKILL the processes of every local Ray session this process started (Ray names a
    session ``session_<time>_<pid>`` after its driver)."""
    import os
    import tempfile
    from pathlib import Path

    from cluster.actors.launcher import _end_ray_processes

    for session in (Path(tempfile.gettempdir()) / "ray").glob(f"session_*_{os.getpid()}"):
        _end_ray_processes(str(session))


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """A fresh local Ray (2 CPUs, no dashboard, loopback only, the Ray settings the platform
    starts its own Ray with), started once per session and shared by the integration tests
    that need a running Ray; shut down at session end."""
    import ray
    from cluster.actors.deploy import RAY_SYSTEM_CONFIG
    from cluster.actors.deploy import shutdown_ray

    if ray.is_initialized():
        # a Ray an earlier test left connected: its settings are not the platform's (Ray's
        # defaults, when something called ray.init with none), which the tests here rely on
        address = ray.get_runtime_context().gcs_address
        pytest.fail(f"a Ray this fixture did not start is connected ({address})", pytrace=False)
    for attempt in range(2):
        try:
            # address="local": always a new local Ray, never attach to a cluster someone else
            # runs
            ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
                     _node_ip_address="127.0.0.1", _system_config=dict(RAY_SYSTEM_CONFIG))
            break
        except Exception as exc:
            # Ray gives its raylet a fixed 30 s to register; beside another test's Rays on two
            # busy cores it missed them once. The half-started Ray's processes (its session is
            # named after this process) are ended, and it starts once more
            if attempt or "timed out during startup" not in str(exc):
                raise
            _end_sessions_of_this_process()
    try:
        yield None
    finally:
        shutdown_ray()
