"""Schemathesis against the live loopback server, run through its own CLI as a user would run
it (``schemathesis run openapi.json --url http://...``, the document as the server gives it):
every phase (examples, coverage, fuzzing and the stateful phase that follows the document's
links, open -> close -> history) and every check (no 5xx, status codes, content types, headers
and bodies as documented, negative data refused, authentication enforced, unsupported methods
405). Bounded: a fixed seed, a few examples per operation, one worker."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
from cluster.config import Settings
from tests.e2e.api_client import signup
from tests.e2e.api_client import tick
from tests.e2e.http_platform import LocalHttpPlatform

SEED = 20_260_101
# Business rules that no schema states (a take-profit on the profit side of the entry, BTC's
# coarser price step, the balance) refuse some schema-valid requests, so the one check that
# wants every schema-valid request accepted does not apply.
CHECKS = ["--checks", "all", "--exclude-checks", "positive_data_acceptance"]
PRICES = (("SOL", "100.00", "100.01"), ("BTC", "60000.0", "60000.1"),
          ("ETH", "3000.00", "3000.01"))


@contextmanager
def serving(settings: Settings) -> Iterator[tuple[LocalHttpPlatform, dict[str, str]]]:
    """A platform whose prices stay fresh (a tick per asset every second: a stale price would
    rightly answer 503), and the Authorization header of an account on it."""
    p = LocalHttpPlatform(settings).start()
    stop = threading.Event()

    def ticker() -> None:
        while not stop.wait(1.0):
            for asset, bid, ask in PRICES:
                p.push_tick(asset, bid, ask)

    thread = threading.Thread(target=ticker, name="ticker", daemon=True)
    try:
        with httpx.Client(base_url=p.base_url, timeout=10) as http:
            auth = signup(http)
            for asset, bid, ask in PRICES:
                tick(p, http, asset, bid, ask)
        thread.start()
        yield p, auth
        stop.set()
        thread.join(10)
        assert p.audit() == []  # whatever was generated, the ledger still balances
    finally:
        stop.set()
        p.stop()


def schemathesis(base_url: str, auth: dict[str, str], cwd: Path, examples: int,
                 *options: str) -> subprocess.CompletedProcess[str]:
    # the document read from an address of its own, then given as a file: its read is not
    # one of the public reads the fuzzing's address may make
    transport = httpx.HTTPTransport(local_address="127.0.0.9")
    with httpx.Client(transport=transport, timeout=10) as http:
        document = http.get(f"{base_url}/openapi.json")
    document.raise_for_status()
    (cwd / "openapi.json").write_bytes(document.content)
    command = [sys.executable, "-m", "schemathesis.cli", "run", "openapi.json", "--url", base_url,
               "--header", f"Authorization: {auth['Authorization']}", *CHECKS,
               "--max-examples", str(examples), "--seed", str(SEED), "--workers", "1",
               "--request-timeout", "10", *options]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=240,
                          check=False)


def responses(base_url: str) -> dict[str, int]:
    """``shardex_http_responses_total`` by label set, from /metrics (asked from an address
    of its own: not within the fuzzer's budget of public reads)."""
    out = {}
    transport = httpx.HTTPTransport(local_address="127.0.0.9")
    with httpx.Client(transport=transport, timeout=10) as http:
        text = http.get(f"{base_url}/metrics").text
    for line in text.splitlines():
        if line.startswith("shardex_http_responses_total{"):
            labels, _, value = line[len("shardex_http_responses_total{"):].partition("} ")
            out[labels] = int(value)
    return out


def test_api_conforms_to_its_openapi_document(tmp_path: Path) -> None:
    with serving(Settings(api_key_rate_per_s=0, signups_per_min=0,
                          public_rate_per_s=0)) as (p, auth):
        run = schemathesis(p.base_url, auth, tmp_path, 10)
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        for phase in ("Examples", "Coverage", "Fuzzing", "Stateful"):
            assert f"✅  {phase}" in run.stdout, run.stdout[-3000:]
        counts = responses(p.base_url)
        # generated requests got past authentication and validation, not only into 4xx, and
        # the stateful phase closed positions it had opened
        for route in ('method="POST",path="/api/v1/positions/open",status="201"',
                      'method="POST",path="/api/v1/positions/close",status="200"',
                      'method="GET",path="/api/v1/state",status="200"',
                      'method="GET",path="/api/v1/state",status="401"'):
            assert counts.get(route, 0) > 0, (route, counts)
        assert not [k for k in counts if 'status="5' in k], counts


def test_rate_limited_answers_conform_too(tmp_path: Path) -> None:
    """Limits low enough that fuzzing hits them: every 429 has the documented shape and its
    Retry-After header."""
    limits = Settings(api_key_rate_per_s=1, api_key_burst=1, signups_per_min=1,
                      public_rate_per_s=1, public_burst=1)
    with serving(limits) as (p, auth):
        run = schemathesis(p.base_url, auth, tmp_path, 5, "--phases", "fuzzing")
        assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
        counts = responses(p.base_url)
        assert counts.get('method="GET",path="/api/v1/state",status="429"', 0) > 0, counts
        assert counts.get('method="POST",path="/api/v1/accounts",status="429"', 0) > 0, counts
        public = ("/api/v1/assets", "/api/v1/prices", "/api/v1/klines", "/healthz", "/metrics")
        assert sum(counts.get(f'method="GET",path="{path}",status="429"', 0)
                   for path in public) > 0, counts
