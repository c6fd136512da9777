"""LocalHosts (every machine in this process, durable under a data directory): a clean stop."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cluster.actors.local import LocalHosts
from cluster.config import Settings
from engine.ledger_machine import Authenticate
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import CreatedAccount
from engine.ledger_machine import hash_api_key

NOW_US = 1_800_000_000_000_000


def test_close_lets_a_call_under_way_finish_before_it_stops_the_journals(
        tmp_path: Path) -> None:
    held = threading.Event()  # the next batch to read the clock waits at it
    reached, go = threading.Event(), threading.Event()

    def clock_us() -> int:
        if held.is_set():
            held.clear()
            reached.set()
            go.wait(5.0)
        return NOW_US

    settings = Settings()
    hosts = LocalHosts(settings, str(tmp_path), clock_us=clock_us, fsync=False)
    key_hash = hash_api_key("key-1")
    held.set()
    with ThreadPoolExecutor(2) as pool:
        call = pool.submit(hosts.ledger.execute_blocking, [CreateAccount("acct-1", key_hash)])
        assert reached.wait(5.0)  # the batch is under way on the ledger's worker thread
        closing = pool.submit(hosts.close)
        time.sleep(0.2)  # the stop begins while the batch is under way
        go.set()
        [created] = call.result(5.0)  # answered, not refused by a journal closed under it
        closing.result(5.0)
    assert isinstance(created, CreatedAccount)
    reopened = LocalHosts(settings, str(tmp_path), readonly=True)
    try:
        [principal] = reopened.ledger.execute_blocking([Authenticate(key_hash)])
        assert principal is not None and principal.user == created.user
    finally:
        reopened.close()
