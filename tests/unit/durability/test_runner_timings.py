"""Runner timings: one ExecuteTiming per batch (wall clock, its size, step and commit time), a
ring of the newest read with a cursor, and what the host notes after the runner answered."""

from __future__ import annotations

import time
from pathlib import Path

import cluster.durability.runner as runner_module
import pytest
from cluster.durability.runner import ExecuteTiming
from cluster.durability.runner import Runner
from engine.ledger_machine import Balances
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import LedgerMachine
from tests.unit.durability.hosted import SIGNUP
from tests.unit.durability.hosted import account
from tests.unit.durability.hosted import crash
from tests.unit.durability.hosted import open_ledger


def test_each_execute_leaves_its_timing_in_wall_clock_microseconds(tmp_path: Path) -> None:
    led = open_ledger(tmp_path)
    before_us = time.time_ns() // 1000
    led.execute([CreateAccount(*account(1)), CreateAccount(*account(2))])
    led.execute([Balances(1)])
    after_us = time.time_ns() // 1000
    count, [journaled, read] = led.timings_since(0)
    assert count == 2
    assert (journaled.commands, read.commands) == (2, 1)
    for t in (journaled, read):
        assert before_us <= t.start_us <= t.end_us <= after_us
        assert t.step_us >= 0 and t.commit_us >= 0 and t.after_us == 0
        # the parts are the whole, up to rounding to microseconds
        assert abs(t.end_us - t.start_us - t.step_us - t.commit_us) <= 2
    assert journaled.end_us <= read.start_us
    crash(led)


def test_in_memory_nothing_is_committed() -> None:
    led = Runner(LedgerMachine(SIGNUP))
    led.execute([CreateAccount(*account(1))])
    _, [t] = led.timings_since()
    assert t.commands == 1 and t.commit_us == 0


def test_a_cursor_returns_only_newer_timings_and_the_ring_keeps_the_newest(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runner_module, "TIMINGS_KEPT", 3)
    led = Runner(LedgerMachine(SIGNUP))
    assert led.timings_since(0) == (0, [])
    led.execute([Balances(1)])
    count, first = led.timings_since(0)
    assert count == 1 and len(first) == 1
    for n in range(2, 7):  # batches of 2..6 commands
        led.execute([Balances(1)] * n)
    count, newer = led.timings_since(count)
    assert count == 6
    assert [t.commands for t in newer] == [4, 5, 6]  # 2 and 3 fell out of the ring
    assert led.timings_since(count) == (6, [])
    assert [t.commands for t in led.timings_since(4)[1]] == [5, 6]


def test_the_host_notes_what_it_did_after_the_runner_answered() -> None:
    led = Runner(LedgerMachine(SIGNUP))
    led.note_after_us(5)  # nothing timed yet: nothing to note
    led.execute([Balances(1)])
    led.execute([Balances(1)])
    led.note_after_us(17)
    _, timings = led.timings_since()
    assert [t.after_us for t in timings] == [0, 17]
    assert all(isinstance(t, ExecuteTiming) for t in timings)


def test_a_failing_decide_is_still_timed(monkeypatch: pytest.MonkeyPatch) -> None:
    led = Runner(LedgerMachine(SIGNUP))

    def broken(command: object, now_us: int) -> None:
        raise ValueError("bug")

    monkeypatch.setattr(led.machine, "decide", broken)
    [answer] = led.execute([Balances(1)])
    assert isinstance(answer, runner_module.Failed)
    assert led.timings_since()[0] == 1
