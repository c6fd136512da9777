"""Unit tests never start Ray: ``ray.init`` raises here, so a test that would need a cluster
fails loudly instead of quietly spending seconds starting one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


class RayInUnitTestError(RuntimeError):
    """A unit test (tests/unit) called ray.init; it belongs in tests/integration."""


def _refuse(*args: object, **kwargs: object) -> None:
    raise RayInUnitTestError("ray.init called from a unit test; move it to tests/integration")


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    # Per test, not per session: integration tests collected in the same run still start Ray.
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a runtime dependency
        yield
        return
    monkeypatch.setattr(ray, "init", _refuse)
    yield
