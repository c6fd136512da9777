"""``shardex bench durability``'s ledger phase over more closes than the ledger tracks locks
under way (it refuses a lock past 65,536): each open is noted, as the API notes it, so every
close is settled and the rebuilt ledger holds them all (it raises otherwise)."""

from __future__ import annotations

from bench.durability import answers_phase
from bench.durability import ledger_phase
from engine.ledger_machine import RECENT_LOCKS_MAX


def test_the_ledger_phase_fills_and_rebuilds_past_the_locks_under_way() -> None:
    closes = RECENT_LOCKS_MAX + 2_000
    figures = ledger_phase(accounts=10, closes=closes, opens=1)
    assert figures["closes"] == closes and figures["accounts"] == 10
    assert len(figures["rebuilds_s"]) == 1 and figures["rebuild_s"] > 0


def test_the_answers_phase_restores_a_ledger_that_answers_a_held_client_order_id() -> None:
    figures = answers_phase(answers=50, rounds=1, new=5)
    assert figures["answers"] == 50 and figures["new"] == 5 and figures["json_mb"] > 0
    assert figures["snapshot_s"] > 0 and figures["restore_s"] > 0
    assert figures["first_snapshot_s"] > 0
    # five answers' entries (two lines of about 70 and 110 bytes) and the meta
    assert 5 * 150 / 1e6 < figures["written_mb"] < figures["json_mb"] + 5 * 250 / 1e6
