"""``shardex audit --offline`` reads DATA_DIR and changes nothing in it.

The state is made by the durable in-process platform (the machines, runners, journals and
snapshots a ``shardex up`` runs, minus Ray) and left the way a crash leaves it: no final
snapshot, a settlement still in a shard's outbox, a margin lock whose open never went out and a
torn record at the end of the ledger's journal. The audit, run as the CLI runs it, must leave
every file of DATA_DIR as it was (names, sizes, bytes; nothing created) and report what the
next start serves: the same state a writable start recovers and reconciles.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from cluster.actors.launcher import check_layout
from cluster.actors.launcher import record_hosts_made
from cluster.actors.local import LocalHosts
from cluster.actors.names import LEDGER
from cluster.config import Settings
from cluster.durability.journal import HEADER
from cluster.trading.reconciler import BooksDisagree
from engine.ledger import AuditDifference
from engine.ledger_machine import LockMargin
from engine.ledger_machine import ReleaseMargin
from engine.ledger_machine import Totals
from engine.market import Tick
from engine.messages import ClosedPosition
from engine.messages import CloseOrder
from engine.messages import IdemKey
from engine.messages import MarginLock
from engine.messages import OpenPosition
from engine.shard_machine import ApplyTick
from tests.unit.cluster.local_platform import USD
from tests.unit.cluster.local_platform import build_platform
from tests.unit.cluster.local_platform import signup
from tests.unit.cluster.local_platform import sol_long

ROOT = Path(__file__).resolve().parents[3]
CUT_LOCK_USD = 30  # the margin of the lock a crash cut off before its open went out
STOPPED_USD = 20  # the margin of the position whose close the ledger has not seen


def _files(root: Path) -> dict[str, tuple[int, str] | None]:
    """Every path under ``root``: a file's (size, sha256), None for a directory."""
    found: dict[str, tuple[int, str] | None] = {}
    for path in sorted(root.rglob("*")):
        name = str(path.relative_to(root))
        if path.is_dir():
            found[name + "/"] = None
        else:
            data = path.read_bytes()
            found[name] = (len(data), hashlib.sha256(data).hexdigest())
    return found


def _settings(root: Path) -> Settings:
    return dataclasses.replace(Settings(), data_dir=root)


async def _kill(p: Any) -> None:
    """End ``p`` (a build_platform) the way a kill -9 does: no final snapshot."""
    await p.service.aclose()
    for port in [p.ledger, *p.shards.values()]:
        store = port.runner.store
        assert store is not None
        store.wait_snapshot()
        store.journal.close()
        port.shutdown()


async def _leave_crashed_state(root: Path) -> tuple[int, dict[str, Any]]:
    """Trade on a durable platform in ``root``, then end it the way a kill -9 does; returns
    the user whose lock the crash cut off and the ledger's totals just before."""
    settings = _settings(root)
    check_layout(settings, record=True)  # what a first durable start writes
    p = build_platform(settings, data_dir=str(root))
    svc = p.service
    alice, bob, carol = await signup(svc), await signup(svc), await signup(svc)
    await p.push_tick("SOL", "100.00", "100.01")
    kept = await svc.open_position(alice, sol_long(100, 10))
    assert isinstance(kept, OpenPosition)
    assert isinstance(await svc.open_position(bob, sol_long(50, 50)), OpenPosition)
    assert isinstance(await svc.close_position(
        alice, CloseOrder(kept.position_id, qty_steps=kept.qty_steps // 2)), ClosedPosition)
    # recovery from a snapshot plus the journal after it
    for port in [p.ledger, *p.shards.values()]:
        port.runner.checkpoint()
    sol = p.settings.assets["SOL"]
    stopped = await svc.open_position(carol, sol_long(STOPPED_USD, 5,
                                                      sl_ticks=sol.price_to_ticks("96.50")))
    assert isinstance(stopped, OpenPosition)
    assert await p.push_tick("SOL", "97.00", "97.01") == 1  # bob's 50x long, settled
    # carol's stop-loss closes on a tick whose settlement never reaches the ledger
    p.seq += 1
    assert await p.shard_of("SOL").call(ApplyTick(Tick(
        "SOL", sol.price_to_ticks("96.00"), sol.price_to_ticks("96.01"), p.clock.now_us,
        p.seq, "test"))) == 1
    # a lock (with its clientOrderId pending) whose open never went out
    assert p.ledger.execute_blocking([LockMargin(MarginLock(
        alice.user, CUT_LOCK_USD * USD, IdemKey(alice.user, "open", "cut-off"), 4242))]) == [None]
    [totals] = p.ledger.execute_blocking([Totals()])
    await _kill(p)
    # a write the kill cut in the middle: a record's header announcing more than is there
    wal = sorted((root / LEDGER / "journal").glob("*.wal"))[-1]
    with open(wal, "ab") as f:
        f.write(HEADER.pack(64, 0, 10**6) + b"torn")
    return alice.user, dict(totals)


def _cli(root: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """``shardex *args`` with DATA_DIR=``root``, in a process of its own."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_DIR": str(root)}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def _audit_offline(root: Path) -> tuple[int, dict[str, Any]]:
    done = _cli(root, "audit", "--offline", "--json")
    return done.returncode, json.loads(done.stdout.strip().splitlines()[-1])


async def _start_and_audit(root: Path
                           ) -> tuple[dict[int, int], list[AuditDifference], dict[str, Any]]:
    """What a start does with ``root`` (recover, resume, the start's reconciliation), then the
    audit of that state."""
    hosts = LocalHosts(_settings(root), str(root))
    try:
        svc = hosts.service()
        released = await svc.reconciler.start_round()  # a crash's state is not refused
        problems, totals = await svc.audit(attempts=1)
        await svc.aclose()
    finally:
        hosts.close()
    return released, problems, totals


def test_offline_audit_leaves_data_dir_unchanged_and_audits_what_a_start_serves(
        tmp_path: Path) -> None:
    root = tmp_path / "data"
    cut_off, at_crash = asyncio.run(_leave_crashed_state(root))
    before = _files(root)
    assert any(name.endswith(".npz") for name in before)
    code, report = _audit_offline(root)
    assert _files(root) == before
    code_again, again = _audit_offline(root)  # and nothing it left changes a second one
    assert _files(root) == before and (code_again, again) == (code, report)
    text = _cli(root, "audit", "--offline")
    assert _files(root) == before and text.returncode == 0
    assert f"audit (offline, {root}): OK" in text.stdout
    # the torn write the kill left, which the start cuts off: said, though not a difference
    assert re.search(rf"journal {re.escape(str(root / LEDGER / 'journal'))} \(recovered to "
                     r"seq \d+\): a start will cut off \d+ bytes from a torn or damaged last "
                     r"record on and set aside 0 later segment\(s\) \[\]", text.stderr), \
        text.stderr
    assert f"{{{cut_off}: {CUT_LOCK_USD * USD}}}" in text.stdout  # what a start releases
    released, problems, totals = asyncio.run(_start_and_audit(root))
    assert problems == [] and released == {cut_off: CUT_LOCK_USD * USD}
    assert (code, report["ok"], report["differences"]) == (0, True, [])
    assert report["source"] == str(root)
    assert report["totals"] == json.loads(json.dumps(totals, default=str))
    assert report["released_at_start"] == {str(u): m for u, m in released.items()}
    assert totals["sum_micros"] == 0 and totals["users"] == 3
    # the start delivered carol's close and released the cut-off lock's margin
    assert totals["closed_positions"] == at_crash["closed_positions"] + 1
    assert totals["users_margin_micros"] == \
        at_crash["users_margin_micros"] - (CUT_LOCK_USD + STOPPED_USD) * USD


async def _leave_margin_deficit(root: Path) -> tuple[int, int]:
    """A platform stopped cleanly whose ledger holds less margin than its open position
    (released behind the service's back): a difference no start repairs. Returns the user
    and the position's margin (micros)."""
    check_layout(_settings(root), record=True)
    p = build_platform(_settings(root), data_dir=str(root))
    who = await signup(p.service)
    await p.push_tick("SOL", "100.00", "100.01")
    opened = await p.service.open_position(who, sol_long(100, 10))
    assert isinstance(opened, OpenPosition)
    assert p.ledger.execute_blocking([ReleaseMargin(who.user, 5 * USD, counted=False)]) == \
        [None]
    await p.service.aclose()
    p.hosts.close()
    return who.user, opened.margin_micros


def test_offline_audit_reports_a_difference_a_start_keeps(tmp_path: Path) -> None:
    root = tmp_path / "data"
    user, margin_micros = asyncio.run(_leave_margin_deficit(root))
    before = _files(root)
    account = f"user:{user}:margin"
    difference = f"{account} is {margin_micros - 5 * USD}, open margins sum to {margin_micros}"
    code, report = _audit_offline(root)
    assert (code, report["ok"], report["differences"]) == (1, False, [difference])
    assert report["released_at_start"] == {}
    text = _cli(root, "audit", "--offline")
    assert text.returncode == 1
    assert f"DIFFERENCE: {difference}\n" in text.stdout
    assert f"audit (offline, {root}): 1 difference(s)" in text.stdout
    assert _files(root) == before


async def _ledger_from_an_earlier_moment(root: Path) -> tuple[int, int]:
    """A platform whose ledger directory was copied while it ran (a backup made one directory
    at a time), traded on after the copy, then killed; the copy then replaces the ledger's
    directory. Returns the user whose account came after the copy, and the user whose
    position did."""
    check_layout(_settings(root), record=True)
    p = build_platform(_settings(root), data_dir=str(root))
    alice = await signup(p.service)
    await p.push_tick("SOL", "100.00", "100.01")
    assert isinstance(await p.service.open_position(alice, sol_long(100, 10)), OpenPosition)
    store = p.ledger.runner.store
    assert store is not None
    p.ledger.runner.checkpoint()
    store.wait_snapshot()
    shutil.copytree(root / LEDGER, root.parent / "ledger-copy")
    bob = await signup(p.service)
    assert isinstance(await p.service.open_position(bob, sol_long(50, 5)), OpenPosition)
    assert isinstance(await p.service.open_position(alice, sol_long(30, 3)), OpenPosition)
    await _kill(p)
    shutil.rmtree(root / LEDGER)
    shutil.copytree(root.parent / "ledger-copy", root / LEDGER)
    return bob.user, alice.user


async def _start_round(root: Path) -> dict[int, int]:
    """A start's round over ``root``'s hosts (what `up` runs before its API serves)."""
    hosts = LocalHosts(_settings(root), str(root))
    try:
        svc = hosts.service()
        try:
            return await svc.reconciler.start_round()
        finally:
            await svc.aclose()
    finally:
        hosts.close()


def test_a_start_refuses_books_its_round_leaves_differing(tmp_path: Path) -> None:
    """A ledger journal that lacks what the shards' hold (restored from an earlier moment than
    theirs, or margin released behind the service's back): the start served it, with audit
    differences (a position of an account the ledger does not know, margin the ledger does
    not hold) that every later settlement of those positions would meet. No crash leaves
    this (the crashed state above starts); the start now refuses, naming them."""
    earlier = tmp_path / "earlier"
    later_user, traded_on = asyncio.run(_ledger_from_an_earlier_moment(earlier))
    with pytest.raises(BooksDisagree) as refused:
        asyncio.run(_start_round(earlier))
    texts = [p.text for p in refused.value.problems]
    assert f"user {later_user} has open positions but no account" in texts, texts
    assert any(t.startswith(f"user:{traded_on}:margin is 100000000, open margins sum to "
                            "130000000") for t in texts), texts
    assert "restore DATA_DIR whole from one backup" in str(refused.value)
    assert texts[0] in str(refused.value)

    released = tmp_path / "released"
    user, margin_micros = asyncio.run(_leave_margin_deficit(released))
    with pytest.raises(BooksDisagree) as refused:
        asyncio.run(_start_round(released))
    assert [p.text for p in refused.value.problems] == [
        f"user:{user}:margin is {margin_micros - 5 * USD}, open margins sum to {margin_micros}"]


def test_offline_audit_refuses_a_data_dir_whose_hosts_made_a_journal_now_gone(
        tmp_path: Path) -> None:
    """Once the hosts made their journals (the start notes it in layout.json), a shard whose
    directory is gone is what a start refuses; the audit read that shard as empty and said OK
    (the start's reconciliation released the margin of its positions, counted as released)."""
    root = tmp_path / "data"
    asyncio.run(_leave_crashed_state(root))
    record_hosts_made(_settings(root))
    shutil.rmtree(root / "shard-SOL-0")
    before = _files(root)
    done = _cli(root, "audit", "--offline")
    assert done.returncode == 2 and done.stdout == "", done
    assert f"cannot recover {root}: shard-SOL-0 has no journal" in done.stderr, done.stderr
    assert _files(root) == before


def test_offline_audit_is_refused_while_a_platform_holds_the_journals(tmp_path: Path) -> None:
    root = tmp_path / "data"
    asyncio.run(_leave_crashed_state(root))
    running = LocalHosts(_settings(root), str(root))  # holds every journal's writer lock
    try:
        before = _files(root)
        done = _cli(root, "audit", "--offline")
        assert done.returncode == 2 and done.stdout == "", done
        assert f"cannot recover {root}" in done.stderr and "held by" in done.stderr, done.stderr
        assert _files(root) == before
    finally:
        running.close()


def test_offline_audit_of_a_data_dir_without_state_names_the_variable_and_the_directory(
        tmp_path: Path) -> None:
    """A missing or empty DATA_DIR: the line says which directory was read and how to point
    at another. It named the path as given ("data", relative to nothing it said), not
    DATA_DIR."""
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "empty", tmp_path / "missing"):
        done = _cli(root, "audit", "--offline")
        assert done.returncode == 2 and done.stdout == "", done
        assert done.stderr.count("\n") == 1, done.stderr
        assert f"no recorded state in DATA_DIR={root.resolve()} " in done.stderr, done.stderr
        assert "set DATA_DIR" in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # nothing made
