"""Which Ray Serve path reaches a public port fastest (``python -m bench.serve_paths``).

A tiny FastAPI handler that calls two sync actors, served five ways, each in a fresh Ray in
its own child process, measured with a closed loop at concurrency 1 and 64 (loopback):

- ``proxy``: Serve's proxy on the port, ``max_ongoing_requests=1000`` (the classic setup).
- ``direct``: ``RAY_SERVE_THROUGHPUT_OPTIMIZED=1`` + the direct-ingress range ``[port, port+1)``
  exported before ``ray.init`` (the replica itself listens on the port).
- ``direct_runtime_env``: the same variables given only as the job's ``runtime_env`` (what
  joining an existing cluster relies on).
- ``own_server``: proxy disabled; the replica starts its own uvicorn on the port.
- ``no_serve``: the same app under plain uvicorn in a driver process (Ray actors, no Serve).

Prints a table, then one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.options import duration, nonneg_int

MODES = ("proxy", "direct", "direct_runtime_env", "own_server", "no_serve")
HOST = "127.0.0.1"


def _direct_env(port: int) -> dict[str, str]:
    return {"RAY_SERVE_THROUGHPUT_OPTIMIZED": "1",
            "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT": str(port),
            "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT": str(port + 1)}


def ray_environment(mode: str, port: int) -> dict[str, str]:
    """What the child exports before it imports Ray: a Ray on the loopback address alone (as
    the platform's launcher starts it; without it Ray advertises the host's first interface),
    and for ``direct`` the direct-ingress variables."""
    return {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            **(_direct_env(port) if mode == "direct" else {})}


def ray_init_options(mode: str, port: int) -> dict[str, Any]:
    """``ray.init``'s arguments for ``mode``: always a new Ray of its own (``address="local"``:
    never one found on the machine, whose Serve the mode's ``serve.shutdown()`` would end) on
    127.0.0.1 only."""
    runtime_env = {"env_vars": _direct_env(port)} if mode == "direct_runtime_env" else None
    return {"address": "local", "_node_ip_address": HOST, "include_dashboard": False,
            "num_cpus": 2, "namespace": "serve-paths", "runtime_env": runtime_env,
            "log_to_driver": False, "logging_level": logging.WARNING}


def _run_mode(mode: str, port: int, duration_s: float) -> list[dict[str, Any]]:
    """Child process: start Ray and the app the ``mode`` way, measure, return the rows."""
    os.environ.update(ray_environment(mode, port))  # read when Ray is imported
    import ray
    from fastapi import FastAPI
    from ray import serve

    from bench.http_load import Connection, closed_loop
    from feed.broker import free_port

    ray.init(**ray_init_options(mode, port))

    @ray.remote(num_cpus=0)
    class Counter:
        def __init__(self) -> None:
            self.n = 0

        def bump(self, x: int) -> int:
            self.n += 1
            return x + 1

    a = Counter.options(name="a").remote()  # type: ignore[attr-defined]
    b = Counter.options(name="b").remote()  # type: ignore[attr-defined]
    ray.get([a.bump.remote(0), b.bump.remote(0)])

    def build_app(first: Any, second: Any) -> FastAPI:
        app = FastAPI()

        @app.get("/op")
        async def op() -> dict[str, int]:
            x = await first.bump.remote(1)
            return {"v": await second.bump.remote(x)}

        return app

    server_task = None
    if mode == "no_serve":
        import uvicorn

        config = uvicorn.Config(build_app(a, b), host=HOST, port=port, log_level="warning",
                                access_log=False, lifespan="off")
        server = uvicorn.Server(config)

        async def serve_forever() -> None:
            await server.serve()
    else:
        logging_config = {"enable_access_log": False, "log_level": "WARNING"}

        @serve.deployment(max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
                          logging_config=logging_config)
        @serve.ingress()
        class Api:
            def __init__(self) -> None:
                self.a, self.b = ray.get_actor("a"), ray.get_actor("b")
                if mode == "own_server":
                    import uvicorn

                    cfg = uvicorn.Config(build_app(self.a, self.b), host=HOST, port=port,
                                         log_level="warning", access_log=False, lifespan="off")
                    self.server = uvicorn.Server(cfg)
                    self.task = asyncio.get_event_loop().create_task(self.server.serve())

            async def __serve_build_asgi_app__(self) -> FastAPI:
                return build_app(self.a, self.b)

        if mode == "proxy":
            serve.start(http_options={"host": HOST, "port": port}, logging_config=logging_config)
        else:
            serve.start(http_options={"host": HOST, "port": free_port(HOST)},
                        proxy_location="Disabled" if mode == "own_server" else "HeadOnly",
                        logging_config=logging_config)
        deployment: Any = Api
        serve.run(deployment.bind(), name="paths", route_prefix="/")

    async def op(conn: Connection, _i: int) -> bool:
        return (await conn.request("GET", "/op")).status == 200

    async def measure() -> list[dict[str, Any]]:
        task = asyncio.create_task(serve_forever()) if mode == "no_serve" else None
        deadline = time.monotonic() + 60
        while True:
            conn = Connection(HOST, port)
            try:
                if (await conn.request("GET", "/op")).status == 200:
                    break
            except OSError:
                pass
            finally:
                await conn.close()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{mode}: nothing answers on {port}")
            await asyncio.sleep(0.2)
        rows = []
        for conc in (1, 64):
            r = await closed_loop(HOST, port, op, conc, duration_s)
            rows.append({"mode": mode, "concurrency": conc, "req_per_s": round(r.ops_per_s),
                         "p50_ms": round(r.percentile_ms(50), 2),
                         "p99_ms": round(r.percentile_ms(99), 2), "errors": r.errors})
        if task is not None:
            server.should_exit = True
            await task
        return rows

    try:
        return asyncio.run(measure())
    finally:
        del server_task
        if mode != "no_serve":
            serve.shutdown()
        ray.shutdown()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.serve_paths", description=__doc__)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--duration-s", type=duration, default=6.0)
    parser.add_argument("--child", default="", help=argparse.SUPPRESS)
    parser.add_argument("--port", type=nonneg_int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print("ROWS " + json.dumps(_run_mode(args.child, args.port, args.duration_s)),
              flush=True)
        return 0
    from feed.broker import free_port

    rows: list[dict[str, Any]] = []
    for mode in [m.strip() for m in args.modes.split(",") if m.strip()]:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.serve_paths", "--child", mode,
             "--port", str(free_port(HOST)), "--duration-s", str(args.duration_s)],
            cwd=str(Path(__file__).resolve().parents[1]), capture_output=True, text=True,
            timeout=300)
        found = [line for line in proc.stdout.splitlines() if line.startswith("ROWS ")]
        if proc.returncode != 0 or not found:
            print(f"{mode}: failed\n{proc.stderr[-2000:]}", file=sys.stderr)
            continue
        rows.extend(json.loads(found[-1][5:]))
    print(f"{'mode':<20}{'conc':>6}{'req/s':>9}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for r in rows:
        print(f"{r['mode']:<20}{r['concurrency']:>6}{r['req_per_s']:>9}{r['p50_ms']:>10.2f}"
              f"{r['p99_ms']:>10.2f}{r['errors']:>8}")
    by = {(r["mode"], r["concurrency"]): r["req_per_s"] for r in rows}
    out: dict[str, Any] = {"bench": "serve_paths"}
    for (mode, conc), rps in by.items():
        out[f"{mode}_c{conc}_req_per_s"] = rps
    if by.get(("proxy", 64)) and by.get(("direct", 64)):
        out["direct_vs_proxy_c64"] = round(by[("direct", 64)] / by[("proxy", 64)], 2)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
