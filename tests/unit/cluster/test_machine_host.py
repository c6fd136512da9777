"""MachineHost's pickled form (what the Ray port calls) against its plain ``execute``, in this
process: the same answers, the same changes."""

from __future__ import annotations

import pickle
import time
from pathlib import Path

import pytest
from cluster.actors.host import HostClosed
from cluster.actors.host import MachineHost
from cluster.actors.host import host_specs
from cluster.config import Settings
from cluster.durability.runner import Failed
from cluster.durability.snapshot import Snapshot
from engine.ledger_machine import Balances
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Totals
from engine.ledger_machine import hash_api_key
from engine.machine import run
from engine.market import Tick
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.messages import ShardOpen
from engine.orders import Side
from engine.results import Code
from engine.results import Rejected
from engine.shard_machine import ApplyTick
from engine.shard_machine import LastTick
from engine.shard_machine import Open

USD = 10**6


def pickled(host: MachineHost, commands: list[object]) -> list[object]:
    answers: list[object] = pickle.loads(host.execute_pickled(pickle.dumps(commands)))
    return answers


def test_a_pickled_batch_answers_and_changes_what_execute_does() -> None:
    settings = Settings()
    host = MachineHost(host_specs(settings)[0])
    [account] = host.execute([CreateAccount("acct-1", hash_api_key("key-1"))])
    user = account.user
    signup = settings.signup_balance_micros
    reads = [Balances(user), Totals(), LockMargin(MarginLock(user, signup + 1)),
             "not a command"]
    through_bytes = pickled(host, reads)
    assert through_bytes == host.execute(reads)
    assert through_bytes[0] == (signup, 0)
    assert isinstance(through_bytes[2], Rejected)
    assert through_bytes[2].code is Code.INSUFFICIENT_BALANCE
    assert isinstance(through_bytes[3], Failed)

    assert pickled(host, [LockMargin(MarginLock(user, 5 * USD, request_id=7))]) == [None]
    assert host.execute([Balances(user)]) == [(signup - 5 * USD, 5 * USD)]
    assert host.runner.commands == 1 + 4 + 4 + 1 + 1


def test_a_shard_takes_the_configured_clock_skew_for_its_price() -> None:
    """MAX_CLOCK_SKEW_S bounds how far ahead of a shard's clock its last price may be stamped
    (the clock stepped back), as it bounds the feed's ticks; a spec without it left every
    shard at the default 5 s."""
    ts_us = 1_800_000_000_000_000
    answers = {}
    for skew_s in (1.0, 60.0):
        shards = host_specs(Settings(max_clock_skew_s=skew_s))[1]
        spec = next(s for s in shards.values() if s.args[2].name == "SOL")
        built = [spec.build(None)]
        built.append(spec.build(Snapshot(0, *built[0].snapshot())))
        for shard in built:
            assert run(shard, ApplyTick(Tick("SOL", 10_000, 10_001, ts_us, 1, "t")), ts_us) == 0
            answers[skew_s, len(answers)] = run(
                shard, Open(ShardOpen(1, 1, Side.LONG, 100 * USD, 10, None, None, None, 100)),
                ts_us - 30_000_000)
    assert [type(a) for a in answers.values()] == [Rejected, Rejected, OpenPosition,
                                                  OpenPosition]


def test_a_closed_host_keeps_its_last_price_and_refuses_what_comes_after(tmp_path: Path) -> None:
    """A clean stop closes each host once the feed and the API have stopped: the close
    journals the price-only ticks still in memory (with the final snapshot), and a command
    that comes after it anyway is refused as such (a late tick was answered from memory, never
    journaled, and a later commit met the released journal, which ended the process); a second
    close does nothing."""
    settings = Settings()
    _, shards = host_specs(settings, str(tmp_path))
    spec = shards["shard-SOL-0"]
    host = MachineHost(spec)
    tick = Tick("SOL", 10_000, 10_001, time.time_ns() // 1000, 1, "test")
    assert host.execute([ApplyTick(tick)]) == [0]
    host.close()
    host.close()
    assert host.ping() != True  # noqa: E712 - the answer is True or a reason
    with pytest.raises(HostClosed):
        host.execute([LastTick()])
    with pytest.raises(HostClosed):
        host.checkpoint()
    again = MachineHost(spec)  # the journal was released, and holds the last price
    try:
        assert again.execute([LastTick()]) == [tick]
    finally:
        again.close()
