"""What the benchmarks count: each figure's pure part, on made-up samples (no platform)."""

from __future__ import annotations

import asyncio
import types
from typing import Any

import pytest
from bench import http_load


class _Clock:
    """A perf_counter that only the operations move: a closed loop timed without time."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


def _timed_loop(monkeypatch: pytest.MonkeyPatch, op_s: float, warmup_s: float,
                duration_s: float, fail: frozenset[int] = frozenset()) -> http_load.LoadResult:
    """One worker running operations of ``op_s`` back to back on a fake clock (those whose
    number is in ``fail`` fail)."""
    clock = _Clock()
    monkeypatch.setattr(http_load, "time", types.SimpleNamespace(perf_counter=clock.perf_counter))
    done = 0

    async def op(_conn: Any, _i: int) -> bool:
        nonlocal done
        done += 1
        clock.now += op_s
        return done not in fail

    return asyncio.run(http_load.closed_loop("127.0.0.1", 9, op, 1, duration_s, warmup_s))


def test_the_closed_loop_counts_what_completes_within_the_window(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # ops end at 0.25, 0.5, 0.75, 1.0 (inside [0.125, 1.125]) and 1.25 (after it): four in a
    # second is the rate; counting only those that also started inside it made three
    result = _timed_loop(monkeypatch, 0.25, 0.125, 1.0)
    assert result.ops == 4 and result.ops_per_s == 4.0
    assert result.latencies_ms == (250.0,) * 4
    assert result.ops_done == 5  # the one finishing after the window was served too
    assert result.errors == 0


def test_a_failed_operation_counts_as_an_error_not_an_op(monkeypatch: pytest.MonkeyPatch) -> None:
    result = _timed_loop(monkeypatch, 0.25, 0.125, 1.0, fail={2})
    assert (result.ops, result.errors, result.ops_done) == (3, 1, 4)


def test_a_load_result_made_without_ops_done_has_them_all_in_its_window() -> None:
    result = http_load.LoadResult(64, 10, 0, 1.0, (1.0,) * 10)
    assert result.ops_done == 10


def test_wrk_ops_are_its_successful_requests() -> None:
    from bench.wrk import WrkResult

    result = WrkResult(64, 1000, 100, 10.0, 5.0, 9.0)
    # what a CPU or host-call reading is divided by: the failed requests are no ops
    assert (result.ops, result.ops_done) == (900, 900)
    assert result.ops_per_s == 90.0
    assert WrkResult(1, 3, 5, 1.0, 1.0, 1.0).ops == 0  # socket errors are added to the errors


def test_costs_per_op_divide_by_every_op_the_run_served() -> None:
    from bench.api import per_op_costs

    costs = per_op_costs((10, 1.0), (110, 2.0), 100)
    assert (costs.host_calls, costs.cpu_ms) == (1.0, 10.0)


def test_too_few_liquidation_levels_for_the_ticks_are_named() -> None:
    from bench.api import levels_short

    assert levels_short({"shard-SOL-0": 40, "shard-BTC-0": 12}, 30, 1) == {"shard-BTC-0": 12}
    assert levels_short({"shard-SOL-0": 30}, 30, 1) == {}


# ---------------------------------------------------------------------- bench latency
def _latency_run(settle_second: int) -> dict[str, Any]:
    """One liquidating SOL tick (seq 1) over two shards, both closing positions; the second
    shard's settlement reached the ledger at ``settle_second`` (0: never seen); and a Backpack
    frame (seq 2) the client never handed to the producer."""
    from bench.latency import Produced
    from bench.latency import Rings
    from bench.latency import analyse
    from cluster.actors.feed import CallTiming
    from cluster.durability.runner import ExecuteTiming

    produced = {1: Produced("SOL", 100, 1_000, True, frame_us=900, receive_us=950),
                2: Produced("SOL", 100, 0, False, frame_us=2_000)}
    tick = ((1_000, 1, 1_100),)
    calls = [CallTiming("s0", tick, 1_200, 1_600, 5, 1_700, 2_500),
             CallTiming("s1", tick, 1_200, 1_700, 5, 1_800, settle_second)]
    executes = {"s0": [ExecuteTiming(1_300, 1, 50, 50, 1_500)],
                "s1": [ExecuteTiming(1_300, 1, 50, 50, 1_600)],
                "ledger": [ExecuteTiming(1_750, 1, 100, 100, 2_400),
                           ExecuteTiming(2_500, 1, 100, 100, 2_900)]}
    return analyse(Rings.recorded(calls, executes), produced, 500, {"SOL": ["s0", "s1"]})


def test_a_liquidation_is_timed_at_its_slowest_shard() -> None:
    r = _latency_run(settle_second=3_000)
    assert r["settled"] == [2_900 - 1_000] and r["unsettled"] == 0


def test_a_liquidation_whose_settlement_was_not_followed_on_one_shard_is_not_timed() -> None:
    # taking the other shard's settlement alone would time the faster shard
    r = _latency_run(settle_second=0)
    assert r["settled"] == [] and r["unsettled"] == 1


def test_a_frame_never_produced_counts_as_not_applied() -> None:
    r = _latency_run(settle_second=3_000)
    assert r["unapplied"] == 1
    assert r["deliver"] == [1_600 - 1_000]  # the tick that went the whole way


def test_busy_cpu_leaves_out_steal_and_counts_guest_time_once() -> None:
    from bench.durability import busy_ticks

    # user nice system idle iowait irq softirq steal guest guest_nice
    assert busy_ticks("cpu  100 10 50 1000 7 1 2 300 40 4") == 100 + 10 + 50 + 1 + 2
    assert busy_ticks("cpu 1 2 3 4") == 1 + 2 + 3  # an old kernel's shorter line


# ---------------------------------------------------------------------- bench feed, footprint
def test_the_feed_bench_counts_the_ticks_it_lost_track_of() -> None:
    from bench.feed import unaccounted

    assert unaccounted(20_000, 1_500, 18_400, 30) == 70
    assert unaccounted(100, 90, 20, 0) == 0  # a warm-up tick delivered late


def test_an_ingest_burst_not_read_whole_misses_the_target() -> None:
    from bench.feed import ingest_verdict

    # a feed that read half the burst fast, then stalled: the rate of the half is no pass
    assert ingest_verdict(150_000, 300_000, 1.0) == (150_000.0, False)
    assert ingest_verdict(300_000, 300_000, 2.0) == (150_000.0, True)
    assert ingest_verdict(300_000, 300_000, 6.0) == (50_000.0, False)
    assert ingest_verdict(3_000, 3_000, 0.001) == (None, None)  # too short to time


def test_a_footprint_missing_a_pss_has_no_pss_total() -> None:
    from bench.footprint import Row
    from bench.footprint import total_pss_mib

    rows = [Row("a", 1, "?", 0.01, 100.0, 60.0), Row("b", 2, "?", 0.01, 100.0, None)]
    assert total_pss_mib(rows) is None
    assert total_pss_mib(rows[:1]) == 60.0


# ---------------------------------------------------------------------- bench chaos
def test_the_chaos_history_pages_by_close_id(monkeypatch: pytest.MonkeyPatch) -> None:
    from bench import chaos

    # 501 closes, newest first; the last of the first page is a partial close, whose close id
    # is its own (a whole close's is its position's id)
    closes = [{"positionId": str(1000 - n), "closeId": str(1000 - n)} for n in range(501)]
    closes[499]["closeId"] = "99999"
    asked: list[Any] = []

    def get(_self: Any, _path: str, _headers: dict[str, str], **params: Any) -> dict[str, Any]:
        asked.append(params.get("before"))
        start = 0
        if params.get("before") is not None:
            start = next(i for i, c in enumerate(closes) if c["closeId"] == params["before"]) + 1
        return {"positions": closes[start:start + params["limit"]]}

    monkeypatch.setattr(chaos.ChaosRun, "_get", get)
    run = chaos.ChaosRun.__new__(chaos.ChaosRun)
    assert run._history({}) == closes
    assert asked == [None, closes[499]["closeId"]]


def test_a_chaos_run_whose_histories_miss_a_close_the_ledger_counted_fails() -> None:
    from bench.chaos import passed

    report = {"lost": 0, "duplicated": 0, "balance_mismatches": 0, "audit_ok": True,
              "history_closes": 120, "ledger_closed_positions": 120}
    assert passed(report)
    assert not passed({**report, "ledger_closed_positions": 121})
    assert not passed({**report, "lost": 1})


# ---------------------------------------------------------------------- bench serve_paths
@pytest.mark.parametrize("mode", ["proxy", "direct", "direct_runtime_env", "own_server",
                                  "no_serve"])
def test_each_serve_path_starts_a_ray_of_its_own_on_loopback(mode: str) -> None:
    from bench.serve_paths import HOST
    from bench.serve_paths import ray_environment
    from bench.serve_paths import ray_init_options

    options = ray_init_options(mode, 8000)
    # a Ray found on the machine would be joined, and its Serve shut down at the mode's end
    assert options["address"] == "local"
    assert options["_node_ip_address"] == HOST == "127.0.0.1"
    # without it Ray advertises the host's first interface (read when Ray is imported)
    assert ray_environment(mode, 8000)["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] == "0"
    direct = "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT"
    assert (direct in ray_environment(mode, 8000)) == (mode == "direct")
    runtime_env = options["runtime_env"] or {}
    assert (direct in runtime_env.get("env_vars", {})) == (mode == "direct_runtime_env")
