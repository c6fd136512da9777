"""bench.cpu_split: py-spy's raw stacks charged to the innermost known layer."""

from __future__ import annotations

from bench.cpu_split import RATE_HZ
from bench.cpu_split import per_request_ms
from bench.cpu_split import split

LINES = [
    # innermost frame last; the journal's write wins over the service and Ray frames outside
    "run (ray/_private/worker.py:1);execute (cluster/durability/runner.py:9);"
    "commit (cluster/durability/journal.py:373) 30",
    "handle (starlette/routing.py:1);open (cluster/trading/service.py:5);"
    "validate (pydantic/main.py:2) 10",
    "handle (starlette/routing.py:1);open (cluster/trading/service.py:5) 20",
    "serve (uvicorn/server.py:1);send (uvicorn/protocols/http/httptools_impl.py:524) 40",
    "main (default_worker.py:1);f (some/lib.py:3) 5",
    "wait (threading.py:327) 500",  # idle
    "garbage without a count",
]


def test_every_sample_goes_to_its_innermost_known_layer() -> None:
    assert split(LINES) == {"journal": 30, "validation": 10, "service": 20, "http": 40,
                            "other": 5}


def test_per_request_ms_divides_sample_time_by_the_requests() -> None:
    got = per_request_ms({"http": 2 * RATE_HZ, "journal": RATE_HZ}, 1000)
    assert got == {"http": 2.0, "journal": 1.0}
    assert list(got) == ["http", "journal"]  # most first
    assert per_request_ms({"http": 1}, 0) == {}
