"""The ``impl`` fixture: every test that takes it runs against the fast engine and the
Fraction reference."""

from __future__ import annotations

import pytest
from engine_impls import IMPLS
from engine_impls import Impl

# the helper modules assert on the tests' behalf: rewritten like a test module, a failure there
# shows the values compared (this must run before they are imported)
pytest.register_assert_rewrite("tests.unit.engine.book_checks",
                               "tests.unit.engine.recorded_ledger")


@pytest.fixture(params=IMPLS, ids=lambda i: i.name)
def impl(request: pytest.FixtureRequest) -> Impl:
    impl: Impl = request.param
    return impl
