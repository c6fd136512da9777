"""The ``impl`` fixture: every test that takes it runs against the fast engine and the
Fraction reference."""

from __future__ import annotations

import pytest
from engine_impls import IMPLS, Impl


@pytest.fixture(params=IMPLS, ids=lambda i: i.name)
def impl(request: pytest.FixtureRequest) -> Impl:
    impl: Impl = request.param
    return impl
