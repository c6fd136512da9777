"""A host Ray starts again opens the journal its first start made, or refuses: on a node
that does not hold its directory it would otherwise begin empty. So does a host a later start
makes, once DATA_DIR's layout record says the hosts made their journals. A host Ray may place
on any node refuses a DATA_DIR that is not the start's. No Ray runs."""

from __future__ import annotations

import dataclasses
import shutil
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


def test_a_start_after_the_hosts_made_their_journals_refuses_one_gone_and_creates_nothing(
        tmp_path: Path) -> None:
    """A shard directory deleted, or a backup restored without it: the start made that host
    empty, and its reconciliation released the margin of every position the ledger held on it
    (``audit`` found nothing wrong). Once the hosts have made their journals, each is refused
    without its own; the others open theirs."""
    ledger, shards = host_specs(Settings(), str(tmp_path), store_options={"fsync": False})
    for spec in (ledger, *shards.values()):
        spec.runner().close()  # the first start: each makes its journal
    gone = next(iter(shards.values()))
    shutil.rmtree(tmp_path / gone.name)
    with pytest.raises(JournalMissing, match=f"{gone.name} has no journal .*an earlier start"):
        dataclasses.replace(gone, made=True).runner()
    assert not (tmp_path / gone.name).exists()  # nothing made: the next start refuses too
    dataclasses.replace(ledger, made=True).runner().close()
    gone.runner().close()  # a first start (made=False) makes it, as before


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
