"""Unit tests never start Ray: ``ray.init`` raises here, so a test that would need a cluster
fails loudly instead of quietly spending seconds starting one."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


class RayInUnitTestError(RuntimeError):
    """A unit test (tests/unit) called ray.init; it belongs in tests/integration."""


def _refuse(*args: object, **kwargs: object) -> None:
    raise RayInUnitTestError("ray.init called from a unit test; move it to tests/integration")


@pytest.fixture(autouse=True, scope="session")
def _no_ray() -> Iterator[None]:
    try:
        import ray
    except ImportError:  # pragma: no cover - ray is a runtime dependency
        yield
        return
    original = ray.init
    setattr(ray, "init", _refuse)  # noqa: B010 - replace the typed function wholesale
    try:
        yield
    finally:
        setattr(ray, "init", original)  # noqa: B010
