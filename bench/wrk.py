"""The closed loops of ``shardex bench api`` driven by ``wrk`` (the Debian package) instead of
the Python client, which shares the machine's cores with what it measures.

One wrk thread per connection (``-t N -c N``), so each thread's Lua state is one worker: it owns
one account's API key and, for the open/close loop, alternates ``POST /positions/open`` and
``POST /positions/close`` of the position it opened, like :func:`bench.api.drive`. wrk reports
throughput and latency percentiles, not every sample.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

_SCRIPT = """
local keys = {%(keys)s}
local loop = "%(loop)s"
local open_body = '%(open_body)s'
local counter = 0

function setup(thread)
  counter = counter + 1
  thread:set("index", counter)
end

function init(args)
  headers = {["Authorization"] = "Bearer " .. keys[index],
             ["Content-Type"] = "application/json"}
  pending = nil
end

function request()
  if loop == "state" then
    return wrk.format("GET", "/api/v1/state", headers)
  elseif pending then
    return wrk.format("POST", "/api/v1/positions/close", headers,
                      '{"positionId":"' .. pending .. '"}')
  end
  return wrk.format("POST", "/api/v1/positions/open", headers, open_body)
end

function response(status, headers, body)
  if loop == "state" then
    return
  elseif pending then
    if status == 200 or status == 404 then pending = nil end
  elseif status == 201 then
    pending = string.match(body, '"positionId":"([^"]+)"')
  end
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    'WRK {"requests":%%d,"duration_us":%%d,"errors":%%d,"p50_us":%%d,"p99_us":%%d}\\n',
    summary.requests, summary.duration,
    e.status + e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


@dataclass(frozen=True, slots=True)
class WrkResult:
    """One wrk run: ``requests`` answered in ``elapsed_s``, of which ``errors`` failed
    (non-2xx/3xx answers; socket errors and timeouts are added in too, so ``ops`` errs low),
    ``ops`` the successful ones (as :class:`bench.http_load.LoadResult` counts them); latency
    percentiles in ms, of every request (wrk cannot leave the failed ones out)."""

    concurrency: int
    requests: int
    errors: int
    elapsed_s: float
    p50_ms: float
    p99_ms: float

    @property
    def ops(self) -> int:
        """The successful requests (never below 0)."""
        return max(0, self.requests - self.errors)

    @property
    def ops_done(self) -> int:
        """Every successful request of the run (wrk has no warm-up: all of them)."""
        return self.ops

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def percentile_ms(self, q: float) -> float:
        """The 50th or 99th latency percentile (what wrk was asked for)."""
        return {50: self.p50_ms, 99: self.p99_ms}.get(int(q), float("nan"))


def wrk_path() -> str | None:
    """The wrk binary on PATH, if any."""
    return shutil.which("wrk")


def run(port: int, api_keys: list[str], duration_s: float, loop: str, open_body: dict[str, object],
        host: str = "127.0.0.1") -> WrkResult:
    """``loop`` ("open-close" or "state") with one connection per key for ``duration_s``."""
    binary = wrk_path()
    if binary is None:
        raise FileNotFoundError("wrk is not installed (Debian package wrk)")
    if loop not in ("open-close", "state"):
        raise ValueError(f"unknown loop {loop!r}")
    n = len(api_keys)
    script = _SCRIPT % {"keys": ",".join(json.dumps(k) for k in api_keys), "loop": loop,
                        "open_body": json.dumps(open_body, separators=(",", ":"))}
    with tempfile.TemporaryDirectory(prefix="shardex-wrk-") as tmp:
        path = Path(tmp) / "loop.lua"
        path.write_text(script)
        proc = subprocess.run(
            [binary, f"-t{n}", f"-c{n}", f"-d{max(1, round(duration_s))}s", "--timeout", "10s",
             "-s", str(path), f"http://{host}:{port}"],
            capture_output=True, text=True, timeout=duration_s + 60, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("WRK ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stderr[-500:]}")
    out = json.loads(line[4:])
    return WrkResult(n, int(out["requests"]), int(out["errors"]), out["duration_us"] / 1e6,
                     out["p50_us"] / 1000, out["p99_us"] / 1000)
