"""MachineHost's pickled form (what the Ray port calls) against its plain ``execute``, in this
process: the same answers, the same changes."""

from __future__ import annotations

import pickle

from cluster.actors.host import MachineHost
from cluster.actors.host import host_specs
from cluster.config import Settings
from cluster.durability.runner import Failed
from engine.ledger_machine import Balances
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import LockMargin
from engine.ledger_machine import Totals
from engine.ledger_machine import hash_api_key
from engine.messages import MarginLock
from engine.results import Code
from engine.results import Rejected

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
