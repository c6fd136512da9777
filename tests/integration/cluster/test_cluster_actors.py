"""The hosts in a real local Ray: the service over RayPorts, a shard's outbox delivered to the
ledger exactly once by the courier, a restarted shard's numbering, a dead shard."""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
import types
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from dataclasses import field
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import ray
from cluster.actors.deploy import ray_ports
from cluster.actors.deploy import service_from_names
from cluster.actors.deploy import start_hosts
from cluster.actors.host import host_class
from cluster.actors.host import host_specs
from cluster.actors.names import LEDGER
from cluster.actors.port import Port
from cluster.actors.port import RayPort
from cluster.actors.port import Unavailable
from cluster.config import Settings
from cluster.trading.courier import Courier
from cluster.trading.placement import shard_layout
from cluster.trading.service import TradingService
from engine.ledger import AuditDifference
from engine.ledger_machine import AppliedSeq
from engine.ledger_machine import ApplySettlements
from engine.ledger_machine import Balances
from engine.ledger_machine import Totals
from engine.market import Tick
from engine.messages import CloseOrder
from engine.messages import OpenOrder
from engine.messages import OpenPosition
from engine.messages import Principal
from engine.messages import SettlementItem
from engine.orders import CloseReason
from engine.orders import Side
from engine.results import Rejected
from engine.shard_machine import ApplyTick
from engine.shard_machine import Outbox

USD = 10**6
SIGNUP = 10_000 * USD
SETTINGS = Settings()
READY_S = 60.0
BTC = next(s.name for s in shard_layout(SETTINGS) if s.asset == "BTC")


@dataclass
class RayPlatform:
    namespace: str
    ledger: Any
    shards: dict[str, Any]
    settings: Settings = SETTINGS
    seq: int = 0
    services: list[TradingService] = field(default_factory=list)

    def ports(self) -> tuple[Port, dict[str, Port]]:
        return ray_ports(self.ledger, self.shards)

    def service(self) -> TradingService:
        ledger, shards = self.ports()
        self.services.append(TradingService(ledger, shards, self.settings))
        return self.services[-1]

    async def trader(self) -> tuple[TradingService, Principal]:
        """A new service over the hosts, and a new account on it."""
        svc = self.service()
        return svc, await signup(svc)

    async def tick(self, asset: str, bid: str, ask: str) -> int:
        """A tick to every shard of ``asset``, as the feed actor sends it: the settlements go
        to the ledger (through the courier) after a tick that closed something. Returns
        closes."""
        a = self.settings.assets[asset]
        self.seq += 1
        tick = Tick(asset, a.price_to_ticks(bid), a.price_to_ticks(ask),
                    time.time_ns() // 1000, self.seq, "test")
        ledger, shards = self.ports()
        courier = Courier(ledger, shards)
        closed = 0
        for spec in shard_layout(self.settings):
            if spec.asset == asset:
                [count] = await shards[spec.name].call_many([ApplyTick(tick)])
                closed += count
                if count:
                    await courier.deliver(spec.name)
        return closed

    async def flush(self) -> None:
        """Deliver every shard's outbox; each is empty afterwards."""
        ledger, shards = self.ports()
        courier = Courier(ledger, shards)
        for name, port in shards.items():
            await courier.deliver(name)
            assert (await port.call(Outbox())).items == []


@pytest_asyncio.fixture
async def start(ray_local: None, tmp_path: Path) -> AsyncIterator[Any]:
    """``start(durable=False, settings=SETTINGS)``: the ledger and shard hosts in a fresh
    namespace (journaled under a temporary DATA_DIR, and restarted by Ray, when durable). The
    services made on them are closed after the test."""
    started: list[RayPlatform] = []

    def start(durable: bool = False, settings: Settings = SETTINGS) -> RayPlatform:
        namespace = f"test-{uuid.uuid4().hex[:8]}"
        data_dir = str(tmp_path / namespace) if durable else None
        ledger, shards = start_hosts(settings, namespace, data_dir, READY_S)
        started.append(RayPlatform(namespace, ledger, shards, settings))
        return started[-1]

    yield start
    for p in started:
        for svc in p.services:
            await svc.aclose()
        for handle in [p.ledger, *p.shards.values()]:
            ray.kill(handle)


async def signup(svc: TradingService) -> Principal:
    account = await svc.create_account()
    who = await svc.authenticate(account.api_key)
    assert who is not None
    return who


async def audit(service: TradingService) -> list[AuditDifference]:
    problems, totals = await service.audit()
    assert totals["sum_micros"] == 0
    return problems


async def btc_longs(svc: TradingService, who: Principal,
                    tps: list[int | None]) -> list[OpenPosition]:
    """A 10x BTC long of 100 USD for each take-profit (in ticks) of ``tps``."""
    opened = []
    for tp in tps:
        r = await svc.open_position(who, OpenOrder("BTC", Side.LONG, 100 * USD, 10,
                                                   tp_ticks=tp))
        assert isinstance(r, OpenPosition)
        opened.append(r)
    return opened


@pytest.mark.asyncio
async def test_open_state_close_history_through_the_ray_ports(start: Any) -> None:
    rp = start()
    svc, who = await rp.trader()
    await rp.tick("SOL", "100.00", "100.01")
    before = svc.batch_stats()["ledger"]
    results = await asyncio.gather(*(svc.open_position(who, OpenOrder(
        "SOL", Side.LONG, 10 * USD, 10)) for _ in range(8)))
    assert all(isinstance(r, OpenPosition) for r in results)
    batches, items = svc.batch_stats()["ledger"]
    # 8 locks, then 8 notes of the opened positions (account events): they shared actor calls
    assert items - before[1] == 16 and batches - before[0] < 16
    state = await svc.state(who)
    assert len(state.positions) == 8 and state.margin_micros == 80 * USD
    assert state.unavailable == ()
    assert await audit(svc) == []
    first = results[0]
    assert isinstance(first, OpenPosition)
    closed = await svc.close_position(who, CloseOrder(first.position_id))
    assert not isinstance(closed, Rejected) and closed.reason == CloseReason.MANUAL
    history = await svc.history(who)
    assert isinstance(history, list) and [h.position_id for h in history] == [first.position_id]
    state = await svc.state(who)
    assert len(state.positions) == 7 and state.free_micros == SIGNUP - 80 * USD + \
        closed.payout_micros
    prices = await svc.prices()
    assert prices["SOL"].bid_ticks == 10000
    health = await svc.health()
    assert health.ok, health
    assert await audit(svc) == []
    # a service built from the host names finds the same state
    named = service_from_names(SETTINGS, namespace=rp.namespace)
    rp.services.append(named)
    assert (await named.state(who)) == state


@pytest.mark.asyncio
async def test_tick_closes_reach_the_ledger_exactly_once(start: Any) -> None:
    rp = start()
    svc, who = await rp.trader()
    await rp.tick("BTC", "60000.0", "60000.1")
    await btc_longs(svc, who, [610000] * 5)
    assert await rp.tick("BTC", "61000.0", "61000.1") == 5
    await rp.flush()
    assert await svc.ledger.call(AppliedSeq(BTC)) == 5
    totals = await svc.ledger.call(Totals())
    assert totals["closed_positions"] == 5
    state = await svc.state(who)
    assert state.positions == [] and state.margin_micros == 0
    # a lost acknowledgement: the shard resends everything; nothing changes
    history = await svc.history(who)
    assert isinstance(history, list) and len(history) == 5
    resend = tuple(SettlementItem(i + 1, c) for i, c in enumerate(reversed(history)))
    assert await svc.ledger.call(ApplySettlements(BTC, resend)) == 5
    assert await svc.state(who) == state
    assert (await svc.ledger.call(Totals()))["closed_positions"] == 5
    assert await audit(svc) == []


@pytest.mark.asyncio
async def test_a_shard_restarted_empty_continues_the_numbering_the_ledger_knows(
        start: Any) -> None:
    rp = start()
    svc, who = await rp.trader()
    await rp.tick("BTC", "60000.0", "60000.1")
    await btc_longs(svc, who, [610000] * 5)
    assert await rp.tick("BTC", "61000.0", "61000.1") == 5
    assert await svc.ledger.call(AppliedSeq(BTC)) == 5
    # the shard's host is replaced by an empty one (its state lived in memory)
    ray.kill(rp.shards[BTC])
    spec = host_specs(SETTINGS)[1][BTC]
    rp.shards[BTC] = host_class().options(namespace=rp.namespace).remote(spec)
    assert ray.get(rp.shards[BTC].ping.remote(), timeout=READY_S)
    svc = rp.service()
    await svc.courier.resume(BTC)  # what a host that starts does before it serves
    await rp.tick("BTC", "60000.0", "60000.1")
    r = await svc.open_position(who, OpenOrder("BTC", Side.SHORT, 100 * USD, 10))
    assert isinstance(r, OpenPosition)
    closed = await svc.close_position(who, CloseOrder(r.position_id))
    assert not isinstance(closed, Rejected)
    assert await svc.ledger.call(AppliedSeq(BTC)) == 6
    await rp.flush()
    assert await audit(svc) == []


@pytest.mark.asyncio
async def test_a_shard_restarted_by_ray_recovers_its_positions_and_numbering(
        start: Any) -> None:
    rp = start(durable=True)
    svc, who = await rp.trader()
    await rp.tick("BTC", "60000.0", "60000.1")
    kept = await btc_longs(svc, who, [610000, 610000, None])
    assert await rp.tick("BTC", "61000.0", "61000.1") == 2
    assert await svc.ledger.call(AppliedSeq(BTC)) == 2
    pid = ray.get(rp.shards[BTC].info.remote(), timeout=READY_S)["pid"]
    await _killed_and_restarted(rp.shards[BTC], pid)
    state = await svc.state(who)  # the same handle, the same port: the recovered book
    assert [p.position_id for p in state.positions] == [kept[2].position_id]
    closed = await svc.close_position(who, CloseOrder(kept[2].position_id))
    assert not isinstance(closed, Rejected)
    assert await svc.ledger.call(AppliedSeq(BTC)) == 3
    state = await svc.state(who)
    assert state.positions == [] and state.margin_micros == 0
    history = await svc.history(who)
    assert isinstance(history, list) and len(history) == 3
    await rp.flush()
    assert await audit(svc) == []


async def _killed_and_restarted(host: Any, pid: int) -> int:
    """Kill the process ``pid`` of ``host`` and wait until Ray runs it again; the new pid."""
    ray.kill(host, no_restart=False)  # the process dies; Ray starts it again
    deadline = time.monotonic() + READY_S
    while True:
        try:
            restarted: int = (await asyncio.wait_for(host.info.remote(), 5))["pid"]
            if restarted != pid:
                return restarted
        except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
                TimeoutError):
            pass
        assert time.monotonic() < deadline, "the host was not restarted"
        await asyncio.sleep(0.2)


@pytest.mark.asyncio
async def test_a_hosts_log_files_are_headed_with_its_name_also_after_a_restart(
        start: Any) -> None:
    """Ray heads an actor's worker-*.err with its class name, the same for every host; a
    host's own name now follows it, in the file of each of its processes. Their start also
    printed Ray's own deprecation warning (Ray's restart check reads its deprecated
    actor_id), which read as the host's."""
    rp = start(durable=True)
    pids = {name: ray.get(handle.info.remote(), timeout=READY_S)["pid"]
            for name, handle in {LEDGER: rp.ledger, **rp.shards}.items()}
    restarted = await _killed_and_restarted(rp.shards[BTC], pids[BTC])
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    names = {pid: name for name, pid in pids.items()} | {restarted: BTC}
    for pid, name in names.items():
        [err] = logs.glob(f"worker-*-{pid}.err")
        deadline = time.monotonic() + 10  # Ray writes the header once the host is made
        while f":actor_name:MachineHost({name})\n" not in err.read_text():
            assert time.monotonic() < deadline, (name, err.read_text()[:2000])
            time.sleep(0.1)
        assert "DeprecationWarning" not in err.read_text(), err.read_text()[:2000]


def _alive(pid: int) -> bool:
    """Whether process ``pid`` of this machine runs (a zombie, killed but not yet reaped by
    its parent, does not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.mark.asyncio
async def test_a_shard_ray_restarts_without_its_journal_refuses_to_start_empty(
        start: Any, tmp_path: Path) -> None:
    rp = start(durable=True)
    svc, who = await rp.trader()
    await rp.tick("BTC", "60000.0", "60000.1")
    await btc_longs(svc, who, [None])
    # the node Ray starts the shard on again does not hold its directory
    directory = tmp_path / rp.namespace / BTC
    directory.rename(directory.with_name("on-another-node"))
    ray.kill(rp.shards[BTC], no_restart=False)  # the process dies; Ray starts it again
    deadline = time.monotonic() + READY_S
    while True:
        try:
            await asyncio.wait_for(rp.shards[BTC].info.remote(), 5)
        except ray.exceptions.ActorDiedError as exc:
            if "without its journal" in str(exc):
                break  # refused for good: Ray starts it no more
        except (ray.exceptions.RayActorError, TimeoutError):
            pass
        assert time.monotonic() < deadline, "the shard was not refused (started empty?)"
        await asyncio.sleep(0.2)
    assert not directory.exists()  # nothing made that a later restart would open empty
    health = await svc.health()
    assert not health.ok and health.components[BTC] == "unavailable"


@pytest.mark.asyncio
async def test_calls_to_a_host_ray_is_restarting_fail_at_once_not_held(start: Any) -> None:
    """With the platform's Ray settings (cluster.actors.deploy.RAY_SYSTEM_CONFIG) a call made
    while a host restarts fails at once (Unavailable), so a caller that tries again reaches
    the new process as soon as it is up. Ray's default holds each such call at least a second
    (until its caller's once-a-second timer releases it)."""
    rp = start(durable=True)
    port = RayPort(BTC, rp.shards[BTC])
    pid = (await port.info())["pid"]
    ray.kill(rp.shards[BTC], no_restart=False)  # the process dies; Ray starts it again
    deadline = time.monotonic() + READY_S
    # ray.kill returns before the process is gone: a call sent meanwhile reaches the old
    # process and fails only when its death is known, which may take as long as the restart
    while _alive(pid):
        assert time.monotonic() < deadline, "the shard's process was not killed"
        await asyncio.sleep(0.01)
    failed_s: list[float] = []
    while True:
        sent = time.monotonic()
        try:
            if (await port.info())["pid"] != pid:
                break
        except Unavailable:
            failed_s.append(time.monotonic() - sent)
        assert time.monotonic() < deadline, "the shard was not restarted"
        await asyncio.sleep(0.01)
    failed_s.sort()
    median_s = failed_s[len(failed_s) // 2] if failed_s else 0.0
    print(f"\n{len(failed_s)} calls failed during the restart, median {median_s * 1000:.0f} ms "
          f"each, slowest {failed_s[-1] * 1000 if failed_s else 0:.0f} ms")
    assert len(failed_s) >= 3, failed_s  # the restart takes far longer than three tries
    assert median_s < 0.5, failed_s


@pytest.mark.asyncio
async def test_a_dead_shard_is_unavailable_and_the_lock_stays_in_doubt(start: Any) -> None:
    rp = start()
    svc, who = await rp.trader()
    await rp.tick("ETH", "3000.00", "3000.01")
    await rp.tick("SOL", "100.00", "100.01")
    sol = await svc.open_position(who, OpenOrder("SOL", Side.LONG, 20 * USD, 2))
    assert isinstance(sol, OpenPosition)
    dead = rp.shards["shard-ETH-0"]
    ray.kill(dead)
    for _ in range(200):  # ray.kill returns before the process is gone: a call may still land
        try:
            ray.get(dead.ping.remote(), timeout=READY_S)
        except ray.exceptions.RayActorError:
            break
        await asyncio.sleep(0.05)
    else:
        pytest.fail("the killed shard host still answers")
    with pytest.raises(Unavailable) as refused:
        await svc.open_position(who, OpenOrder("ETH", Side.LONG, 10 * USD, 2))
    assert refused.value.component == "shard-ETH-0"
    # its outcome is unknown, so the margin stays locked until the shard can say; reads still
    # answer, naming the shard whose positions are missing
    state = await svc.state(who)
    assert state.unavailable == ("shard-ETH-0",)
    assert state.margin_micros == 30 * USD
    assert [p.position_id for p in state.positions] == [sol.position_id]
    assert await svc.ledger.call(Balances(who.user)) == (SIGNUP - 30 * USD, 30 * USD)
    assert await svc.reconciler.run_once() == 1
    health = await svc.health()
    assert not health.ok and health.components["shard-ETH-0"] != "ok"
    assert health.components["ledger"] == "ok"
    prices = await svc.prices()
    assert "ETH" not in prices and "SOL" in prices


@pytest.mark.asyncio
async def test_hosts_on_a_nearly_full_disk_say_so_in_health(start: Any, tmp_path: Path) -> None:
    """Each host actor reports its journal's disk below MIN_FREE_DISK_MB through its ping,
    which the service's health names per host."""
    fs = os.statvfs(tmp_path)
    floor = (fs.f_bavail * fs.f_frsize >> 20) + 1024  # more than the disk has free
    rp = start(durable=True, settings=Settings(min_free_disk_mb=floor))
    health = await rp.service().health()
    assert not health.ok and set(health.components) == {"ledger", *rp.shards}
    for name, text in health.components.items():
        assert text.startswith("unhealthy: ") and name in text, text
        assert f"below MIN_FREE_DISK_MB ({floor})" in text, text


@pytest.mark.asyncio
async def test_opens_of_a_split_asset_pass_over_a_split_that_is_gone(start: Any) -> None:
    """BTC split in two, one split gone for good (as a host whose node is gone waits for it):
    the open sent to it answers Unavailable, and every later open of the asset goes to the
    split that answers. Before, every second open went to the gone split, 503 each."""
    rp = start(settings=dataclasses.replace(SETTINGS, shards={"BTC": 2}))
    svc, who = await rp.trader()
    await rp.tick("BTC", "50000.0", "50000.1")
    gone = next(s.name for s in shard_layout(rp.settings) if s.asset == "BTC" and s.split == 1)
    ray.kill(rp.shards[gone], no_restart=True)
    splits: list[int | str] = []
    for _ in range(8):
        try:
            pos = await svc.open_position(who, OpenOrder("BTC", Side.LONG, 100 * USD, 10))
        except Unavailable:
            splits.append("503")
            continue
        assert isinstance(pos, OpenPosition), pos
        spec = svc.layout.of_position(pos.position_id)
        assert spec is not None
        splits.append(spec.split)
    assert splits.count("503") <= 1 and splits.count(0) >= 7, splits


@pytest.mark.asyncio
async def test_an_api_whose_feed_actor_is_gone_reports_it_unavailable(ray_local: None) -> None:
    """The feed actor's counters asked where it is not (its platform was killed, leaving the
    API on the cluster): Unavailable, which /healthz reports as "unavailable" like the ledger
    and the shards; it was get_actor's ValueError, reported as "error: ValueError"."""
    from cluster.actors.serve_app import ApiIngress

    replica = types.SimpleNamespace(namespace=f"gone-{uuid.uuid4().hex[:8]}")  # what it reads
    with pytest.raises(Unavailable):
        await ApiIngress.func_or_class._feed_stats(replica)
