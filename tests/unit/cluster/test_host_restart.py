"""A host Ray starts again opens the journal its first start made, or refuses: on a node
that does not hold its directory it would otherwise begin empty. A host Ray may place on any
node refuses a DATA_DIR that is not the start's. No Ray runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from cluster.actors.deploy import marked
from cluster.actors.host import JournalMissing
from cluster.actors.host import host_specs
from cluster.config import Settings
from engine.ledger_machine import Balances
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import hash_api_key


def test_a_restarted_host_without_its_journal_refuses_and_creates_nothing(
        tmp_path: Path) -> None:
    ledger, shards = host_specs(Settings(), str(tmp_path), store_options={"fsync": False})
    for spec in (ledger, *shards.values()):
        with pytest.raises(JournalMissing, match=str(tmp_path / spec.name)):
            spec.runner(restarted=True)
    # nothing made: a second restart there must refuse as well
    assert list(tmp_path.iterdir()) == []


def test_a_restarted_host_recovers_the_journal_its_first_start_made(tmp_path: Path) -> None:
    settings = Settings()
    spec = host_specs(settings, str(tmp_path), store_options={"fsync": False})[0]
    first = spec.runner()
    [account] = first.execute([CreateAccount("acct-1", hash_api_key("key-1"))])
    first.close()
    again = spec.runner(restarted=True)
    assert again.execute([Balances(account.user)]) == [(settings.signup_balance_micros, 0)]
    again.close()


def test_a_host_no_node_pins_refuses_a_data_dir_other_than_the_starts(tmp_path: Path) -> None:
    ledger, shards = host_specs(Settings(), str(tmp_path), store_options={"fsync": False})
    # the start recorded layout.json in its DATA_DIR; this node's DATA_DIR is another disk
    for spec in (ledger, *shards.values()):
        started = marked(spec, set(), "layout.json")
        with pytest.raises(JournalMissing, match="not the platform's"):
            started.runner()
    assert list(tmp_path.iterdir()) == []
    (tmp_path / "layout.json").write_text("{}")  # the start's DATA_DIR: one filesystem
    marked(ledger, set(), "layout.json").runner().close()


def test_only_the_hosts_no_node_pins_look_for_the_starts_mark() -> None:
    ledger, shards = host_specs(Settings(), "/data")
    shard = next(iter(shards.values()))
    assert marked(shard, {shard.name}, "layout.json") == shard  # its node's own disk
    assert marked(shard, {"ledger"}, "layout.json").shared_mark == "layout.json"
    assert marked(ledger, set(), None) == ledger  # memory, or no start recorded a mark
