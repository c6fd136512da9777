"""Schemathesis against the live loopback server: no 5xx, and every response conforms to the
OpenAPI document (status code documented, content type, body schema), for data that fits the
schema and for data that does not. Bounded (examples per operation) to run in seconds."""

from __future__ import annotations

import httpx
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.core.result import Err, Ok
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.e2e.api_client import signup, tick
from tests.e2e.http_platform import HttpPlatform

EXAMPLES_PER_OPERATION = 30
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance]


def _responses(base_url: str) -> dict[str, int]:
    """``shardex_http_responses_total`` by label set, from /metrics."""
    out = {}
    for line in httpx.get(f"{base_url}/metrics", timeout=10).text.splitlines():
        if line.startswith("shardex_http_responses_total{"):
            labels, _, value = line[len("shardex_http_responses_total{"):].partition("} ")
            out[labels] = int(value)
    return out


def test_api_conforms_to_its_openapi_document(platform: HttpPlatform) -> None:
    with httpx.Client(base_url=platform.base_url, timeout=10) as http:
        auth = signup(http)  # a real key, so authenticated routes get past 401
        for asset, bid, ask in (("SOL", "100.00", "100.01"), ("BTC", "60000.0", "60000.1"),
                                ("ETH", "3000.00", "3000.01")):
            tick(platform, http, asset, bid, ask)
    schema = schemathesis.openapi.from_url(f"{platform.base_url}/openapi.json")
    before = _responses(platform.base_url)
    results = list(schema.get_all_operations())
    errors = [r.err() for r in results if isinstance(r, Err)]
    assert errors == []
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) >= 9
    tested = 0
    for operation in operations:
        # negative data needs something to break: a body or a query parameter
        negatable = bool(len(operation.body) or len(operation.query))
        modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if negatable else [])
        for mode in modes:

            @given(case=operation.as_strategy(generation_mode=mode, headers=auth))
            @settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def check(case: schemathesis.Case) -> None:
                response = case.call(base_url=platform.base_url, timeout=10)
                assert response.status_code < 500, (case.method, case.path, case.body,
                                                    response.status_code, response.text[:300])
                case.validate_response(response, checks=CHECKS)

            check()
            tested += 1
    assert tested >= len(operations) + 4  # open, close, history, accounts also negative
    # the generated requests got past authentication and validation, not only into 4xx
    after = _responses(platform.base_url)
    for route in ('method="POST",path="/api/v1/positions/open",status="201"',
                  'method="GET",path="/api/v1/state",status="200"'):
        assert after.get(route, 0) > before.get(route, 0), route
