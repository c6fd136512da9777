"""``shardex bench durability``: what journaling costs, and how fast a big shard comes back.

1. API throughput, journaling off versus on, in the same run: two platforms run side by side,
   each in a process of its own with its own local Ray, embedded broker, sim prices and Serve
   on a free port, one with in-memory hosts (cluster.actors.launcher.Platform(durable=False))
   and one with journaled ones (``durable=True``: every batch a host executes is one journal
   record, fdatasync'ed under DATA_DIR before the answers). The same closed loop of HTTP opens
   and closes (bench.api.drive: each worker alternates open and close on its own account)
   drives one platform at a time, in ``--slices`` slices of ``--slice-s`` seconds per mode,
   alternating, the other mode first in every other slice, while the idle platform waits. One
   op = one acknowledged HTTP request. The API's rate limits are off (bench.api.unthrottled).
   On a shared 2-core machine a minute's throughput moves by 20-30% from one run to the next,
   more than most changes this is meant to judge; slices a few seconds apart see the same
   machine, so each mode's figure is its acknowledged ops over its measured time in all its
   slices, and their ratio is the ratio of the two (the spread of the slices' own ratios is
   printed beside it).
2. Journal bytes per op: the bytes the durable run's journals grew by (ledger and shards,
   including the tick records of the sim feed) divided by the operations they acknowledged
   (accounts, opens, closes, as counted by the ledger and the shards).
3. Recovery of a shard holding 1,000,000 positions after kill -9 (``--positions 0`` skips
   it): a journaled shard host (cluster.actors.host.MachineHost) is filled inside its process
   (``__ray_call__``) through its own ``Runner.execute`` with batches of ``Open`` commands (one
   journal record and one fdatasync per batch, snapshots on their normal cadence), its
   process is SIGKILLed, and Ray restarts it. Reported: the time from the kill until the host
   answers ``Stats`` again with all positions, and the part of it spent rebuilding the state
   (newest snapshot + journal tail) inside the new process, and that process's peak resident
   memory and minor page faults (the rebuild's fresh memory: on a virtual machine each first
   touch of a page can cost more than the rebuild's own work).
4. Rebuild of a ledger holding ``--ledger-accounts`` accounts and ``--ledger-closes`` closes in
   their history (``--ledger-closes 0`` skips it): a journaled ledger runner in this process
   is filled through its own ``Runner.execute`` (accounts, margin locks, and settlements
   from one shard in batches of 1,000), snapshotted and closed, then opened again
   ``--ledger-opens`` times, each time in a new process (as a restarted ledger host);
   reported: each opening's rebuild (reading and restoring the newest snapshot, then the
   journal tail; the snapshot's file read is counted too), the median first. No
   Ray: how long Ray takes to restart a process is the shard's figure above.
5. A ledger holding ``--ledger-answers`` clientOrderId answers (``0`` skips it), 100 accounts'
   opens, each answered with its position, built in this process through the machine's own
   commands, then snapshotted once; then three times 1,000 more answers (a minute of 16 a
   second) and a snapshot: its ``snapshot()`` (the part on the ledger's thread), the snapshot
   meta's JSON (the writer's part), the bytes it writes for them (that JSON and the answers
   table's new bytes) and a restore (``from_snapshot``, as a restart reads it), each the
   median of the three.
6. One journal commit (``--commits 0`` skips it): a journal in a temporary directory commits
   one 300-byte record at a time (write + fdatasync), ``--commits`` times, zeroed ahead as the
   hosts run it and appending (``zeroed_ahead_bytes=0``: every flush also commits the file's
   new size), in alternating rounds; reported per commit: the median round's time and the
   machine's busy CPU time (all cores, the kernel's flush work included: /proc/stat).

Prints a table, then one JSON line last.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import multiprocessing
import os
import resource
import shutil
import signal
import statistics
import tempfile
import threading
import time
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from bench.api import HOST, _wait_prices, drive, unthrottled
from bench.http_load import LoadResult
from bench.options import duration, nonneg_int, positive_int
from cluster.actors.launcher import Platform
from cluster.config import Settings

ONE_MILLION = 1_000_000
START_TIMEOUT_S = 180.0  # a platform's start, or its figures once told to stop
STOP_TIMEOUT_S = 120.0  # a platform process's stop before it is killed


def _free_port() -> int:
    from feed.broker import free_port

    return free_port(HOST)


def _journal_bytes(data_dir: Path) -> int:
    """Bytes of the records of every journal under ``data_dir`` (not the zeros after them)."""
    from cluster.durability.journal import Journal

    total = 0
    for path in data_dir.glob("*/journal"):
        with Journal(path, readonly=True) as journal:
            total += journal.disk_bytes()
    return total


# ---------------------------------------------------------------------- 1 + 2: the API
def _serve_platform(durable: bool, port: int, pipe: Connection) -> None:
    """A child process: one platform (journaled or not) serving on ``port`` until the parent
    sends on ``pipe``; sends "ready" once it serves, then its figures when told to stop."""
    import ray

    from engine.ledger_machine import Totals
    from engine.shard_machine import Stats

    data_dir = Path(tempfile.mkdtemp(prefix="shardex-bench-durability-"))
    settings = dataclasses.replace(unthrottled(Settings.from_env()), port=port,
                                   feed_source="sim", data_dir=data_dir, kafka_brokers=None,
                                   ray_address=None)
    # as `shardex up` runs it: the platform starts and stops its own broker, on a free port
    platform = Platform(settings, with_feed=True, broker_port=_free_port(),
                        ray_init={"num_cpus": 2}, durable=durable)
    try:
        platform.start()
        pipe.send("ready")
        try:
            pipe.recv()
        except EOFError:  # the parent gave up (or is gone): stop, no figures
            return
        stats = [answers[0] for answers in ray.get(
            [h.execute.remote([Stats()]) for h in platform.shards.values()], timeout=60)]
        [totals] = ray.get(platform.ledger.execute.remote([Totals()]), timeout=60)
        pipe.send({"ops_total": int(totals["users"])
                   + sum(s.opens + s.closes_manual for s in stats),
                   "journal_bytes": _journal_bytes(data_dir) if durable else 0})
    finally:
        platform.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def api_phase(concurrency: int, slices: int, slice_s: float) -> dict[bool, dict[str, Any]]:
    """Both platforms started (one after the other), driven in alternating slices, stopped;
    returns each mode's figures (key: durable)."""
    spawn = multiprocessing.get_context("spawn")
    ports = {durable: _free_port() for durable in (False, True)}
    pipes: dict[bool, Connection] = {}
    children: list[Any] = []  # spawned processes
    try:
        for durable in (False, True):  # one start at a time: each takes both cores a while
            pipes[durable], theirs = spawn.Pipe()
            child = spawn.Process(target=_serve_platform, args=(durable, ports[durable], theirs))
            child.start()
            children.append(child)
            if not pipes[durable].poll(START_TIMEOUT_S) or pipes[durable].recv() != "ready":
                raise RuntimeError(f"the {'journaled' if durable else 'in-memory'} platform did "
                                   f"not start within {START_TIMEOUT_S} s")
        assets = [a.name for a in Settings.from_env().assets.assets]
        runs = asyncio.run(_alternate(ports, assets, concurrency, slices, slice_s))
        figures = {}
        for durable, pipe in pipes.items():
            pipe.send("stop")
            if not pipe.poll(START_TIMEOUT_S):
                raise RuntimeError("a platform did not report its figures")
            figures[durable] = {**pipe.recv(), **_mode_figures(runs[durable])}
        return figures
    finally:
        for pipe in pipes.values():  # a child still waiting for "stop" reads EOF and stops
            pipe.close()
        for child in children:
            child.join(STOP_TIMEOUT_S)
            if child.is_alive():  # hung in its stop: killed by its pid
                child.kill()
                child.join()


async def _alternate(ports: dict[bool, int], assets: list[str], concurrency: int, slices: int,
                     slice_s: float) -> dict[bool, list[LoadResult]]:
    """The closed loop on one platform at a time: ``slices`` slices per mode, the in-memory
    one first in even slices and the journaled one in odd ones."""
    for port in ports.values():
        await _wait_prices(port, assets)
        await drive(port, 4, 1.0)  # warm up routes, batchers and actor connections
    runs: dict[bool, list[LoadResult]] = {False: [], True: []}
    for n in range(slices):
        for durable in ((False, True) if n % 2 == 0 else (True, False)):
            runs[durable].append(await drive(ports[durable], concurrency, slice_s))
    return runs


def _mode_figures(runs: list[LoadResult]) -> dict[str, Any]:
    """One mode's slices as one run: ops over measured time, latency percentiles of all."""
    whole = LoadResult(runs[0].concurrency, sum(r.ops for r in runs),
                       sum(r.errors for r in runs), sum(r.elapsed_s for r in runs),
                       tuple(ms for r in runs for ms in r.latencies_ms),
                       sum(r.ops_done for r in runs))
    return {"ops_per_s": whole.ops_per_s, "p50_ms": whole.percentile_ms(50),
            "p99_ms": whole.percentile_ms(99), "errors": whole.errors,
            "ops_per_s_by_slice": [r.ops_per_s for r in runs]}


# ---------------------------------------------------------------------- 5: one commit
def busy_ticks(cpu_line: str) -> int:
    """The busy clock ticks of /proc/stat's ``cpu`` line: user, nice, system, irq and softirq.
    Not idle or iowait; not steal either (time the hypervisor gave another machine while this
    one waited, no work of its own), nor guest and guest_nice, which user and nice already
    hold (summing every field counted them twice)."""
    fields = [int(v) for v in cpu_line.split()[1:]]
    user, nice, system, _idle, _iowait, irq, softirq = (fields + [0] * 7)[:7]
    return user + nice + system + irq + softirq


def _busy_cpu_s() -> float:
    """CPU time this machine spent busy so far (every core; :func:`busy_ticks`)."""
    with open("/proc/stat") as f:
        return busy_ticks(f.readline()) / os.sysconf("SC_CLK_TCK")


COMMIT_ROUNDS = 5  # of each mode, alternating
COMMIT_RECORD_BYTES = 300


def commit_phase(commits: int, rounds: int = COMMIT_ROUNDS,
                 record_bytes: int = COMMIT_RECORD_BYTES) -> dict[str, Any]:
    """Per commit of one ``record_bytes`` record, zeroed ahead and appending: ``{"zeroed":
    (wall_us, busy_cpu_us), "appending": (...)}``, each mode's median round by wall time."""
    from cluster.durability.journal import ZEROED_AHEAD_BYTES, Journal

    payload = os.urandom(record_bytes)
    by_mode: dict[str, list[tuple[float, float]]] = {"zeroed": [], "appending": []}
    for n in range(rounds):
        order = ["zeroed", "appending"] if n % 2 == 0 else ["appending", "zeroed"]
        for mode in order:
            directory = tempfile.mkdtemp(prefix="shardex-bench-commit-")
            try:
                with Journal(directory, zeroed_ahead_bytes=(
                        ZEROED_AHEAD_BYTES if mode == "zeroed" else 0)) as journal:
                    cpu, started = _busy_cpu_s(), time.perf_counter()
                    for _ in range(commits):
                        journal.append(payload)
                        journal.commit()
                    wall_s, cpu_s = time.perf_counter() - started, _busy_cpu_s() - cpu
            finally:
                shutil.rmtree(directory, ignore_errors=True)
            by_mode[mode].append((wall_s / commits * 1e6, cpu_s / commits * 1e6))
    return {mode: sorted(runs)[(len(runs) - 1) // 2] for mode, runs in by_mode.items()}


# ---------------------------------------------------------------------- 3: recovery
def _fill_shard(host: Any, positions: int, batch: int) -> dict[str, Any]:
    """Runs inside the shard host (``__ray_call__``): a tick, then ``positions`` ``Open``
    commands through the host's journaled ``Runner.execute``, ``batch`` commands per call (one
    journal record and one commit per call)."""
    from engine.market import Tick
    from engine.messages import OpenPosition, ShardOpen
    from engine.orders import Side
    from engine.shard_machine import ApplyTick, Open

    runner = host.runner
    machine = runner.machine
    asset = machine.asset
    bid = asset.price_to_ticks("100.00")
    runner.execute([ApplyTick(Tick(asset.name, bid, bid + 1, time.time_ns() // 1000, 1,
                                   "bench"))])
    started = time.perf_counter()
    refused = 0
    rid = 0
    while rid < positions:
        commands = []
        for _ in range(min(batch, positions - rid)):
            rid += 1
            # leverage 1..50 on both sides: entries, quantities and trigger levels all differ
            commands.append(Open(ShardOpen(rid, rid % 10_000, Side(rid & 1),
                                           (10 + rid % 90) * 10**6, 1 + rid % 50, None, None,
                                           None, 100)))
        refused += sum(1 for a in runner.execute(commands) if not isinstance(a, OpenPosition))
    assert runner.store is not None
    return {"positions": len(machine.book), "fill_s": time.perf_counter() - started,
            "refused": refused, "journal_bytes": runner.journal_bytes(),
            "snapshots_written": runner.store.snapshots_written}


def _recovery_info(host: Any) -> dict[str, Any]:
    store = host.runner.store
    rec = store.recovered
    return {"positions": len(host.runner.machine.book), "recovery_s": store.recovery_s,
            "opened_at_s": store.opened_at_s,
            "snapshot_seq": rec.snapshot_seq, "replayed_records": rec.replayed,
            "pid": os.getpid(), **_memory_use()}


def _memory_use() -> dict[str, int]:
    """This process's peak resident memory (MiB) and minor page faults so far: in a restarted
    host, its start (Ray's worker, imports) and the rebuild, whose fresh memory dominates."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"peak_rss_mib": usage.ru_maxrss // 1024, "minor_faults": usage.ru_minflt}


class _AliveWatch(threading.Thread):
    """After a kill: polls Ray's actor table until the host is ALIVE in a new process, then
    times one ``Stats`` call made at that moment (``answered``: perf_counter when it answered).

    The kill loop's calls fail at once while the host restarts (the platform's Ray settings,
    cluster.actors.deploy.RAY_SYSTEM_CONFIG) and it tries again every 10 ms; this call shows
    when a request made as soon as Ray reports the host back is served.
    """

    def __init__(self, host: Any, old_pid: int, timeout_s: float = 60.0) -> None:
        super().__init__(name="alive-watch", daemon=True)
        self.host = host
        self.old_pid = old_pid
        self.timeout_s = timeout_s
        self.answered: float | None = None

    def run(self) -> None:
        import ray

        from engine.shard_machine import Stats

        deadline = time.perf_counter() + self.timeout_s
        while time.perf_counter() < deadline:
            info = ray._private.state.actors(self.host._actor_id.hex()) or {}
            if info.get("State") == "ALIVE" and int(info.get("Pid") or 0) not in (0,
                                                                                self.old_pid):
                try:
                    ray.get(self.host.execute.remote([Stats()]), timeout=self.timeout_s)
                except ray.exceptions.RayError:
                    return
                self.answered = time.perf_counter()
                return
            time.sleep(0.01)


def recovery_phase(positions: int, kills: int = 3) -> dict[str, Any]:
    """Fill a journaled shard host, kill -9 it ``kills`` times (each after the previous
    recovery), time Ray's restart plus its recovery; reports the median kill."""
    import ray

    from cluster.actors.deploy import RAY_SYSTEM_CONFIG, RESTART
    from cluster.actors.host import HostSpec, host_class
    from cluster.trading.placement import shard_layout
    from engine.shard_machine import ShardMachine, Stats

    settings = Settings.from_env()
    spec = shard_layout(settings)[0]
    data_dir = Path(tempfile.mkdtemp(prefix="shardex-bench-recovery-"))
    # the fill takes longer than MAX_PRICE_AGE_S after its one tick: prices never age here
    host_spec = HostSpec(spec.name, ShardMachine,
                         (spec.name, spec.book_tag, settings.assets[spec.asset],
                          settings.maintenance_margin_ppm, 10**15), str(data_dir))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING, _node_ip_address=HOST,
             _system_config=dict(RAY_SYSTEM_CONFIG))  # as the platform's own Ray
    try:
        host = host_class().options(**RESTART).remote(host_spec)
        filled = ray.get(host.__ray_call__.remote(_fill_shard, positions, 10_000))
        if filled["refused"]:
            raise RuntimeError(f"{filled['refused']} opens of the fill were refused")
        samples: list[tuple[float, float, dict[str, Any]]] = []
        alive_s: list[float] = []
        for _ in range(kills):
            info = ray._private.state.actors(host._actor_id.hex())
            pid = int(info["Pid"])
            watcher = _AliveWatch(host, pid)
            killed = time.perf_counter()
            killed_wall_s = time.time()
            os.kill(pid, signal.SIGKILL)
            watcher.start()
            while True:  # until the new incarnation answers a plain call (Stats)
                try:
                    [stats] = ray.get(host.execute.remote([Stats()]), timeout=60)
                    break
                except ray.exceptions.RayError:
                    time.sleep(0.01)
            ready_s = time.perf_counter() - killed
            watcher.join(60)
            if watcher.answered is not None:
                alive_s.append(watcher.answered - killed)
            after = ray.get(host.__ray_call__.remote(_recovery_info), timeout=60)
            if after["pid"] == pid or stats.positions != after["positions"]:
                raise RuntimeError("the shard did not come back as a new process")
            samples.append((ready_s, after["opened_at_s"] - killed_wall_s, after))
    finally:
        ray.shutdown()
        shutil.rmtree(data_dir, ignore_errors=True)  # a million positions: ~175 MB
    samples.sort(key=lambda x: x[0])
    ready_s, init_s, after = samples[len(samples) // 2]  # the median kill
    alive_s.sort()
    return {**filled, "kill_to_ready_s": ready_s, "kill_to_ready_max_s": samples[-1][0],
            "kill_to_alive_answer_s": alive_s[len(alive_s) // 2] if alive_s else None,
            "kills": kills, "rebuild_s": after["recovery_s"], "kill_to_init_s": init_s,
            "recovered_positions": min(s[2]["positions"] for s in samples),
            "peak_rss_mib": after["peak_rss_mib"], "minor_faults": after["minor_faults"],
            "snapshot_seq": after["snapshot_seq"],
            "replayed_records": after["replayed_records"]}


# ---------------------------------------------------------------------- main
def ledger_phase(accounts: int, closes: int, opens: int) -> dict[str, Any]:
    """Fill a journaled ledger (module docstring, 4), then time ``opens`` rebuilds of it."""
    from cluster.actors.host import host_specs
    from engine.account_events import POSITION_OPENED
    from engine.ledger_machine import (
        ApplySettlements,
        CreateAccount,
        CreatedAccount,
        LockMargin,
        Note,
        hash_api_key,
    )
    from engine.messages import ClosedPosition, MarginLock, OpenPosition, SettlementItem
    from engine.orders import CloseReason, Side
    from engine.position_ids import ROW_SHIFT

    margin = 10 * 10**6
    data_dir = tempfile.mkdtemp(prefix="shardex-bench-ledger-")
    try:
        spec, _ = host_specs(Settings(), data_dir)
        runner = spec.runner()
        started = time.perf_counter()
        users: list[int] = []
        for first in range(0, accounts, 1000):
            created = runner.execute([CreateAccount(f"acc_{n:024x}", hash_api_key(f"key-{n}"))
                                      for n in range(first, min(accounts, first + 1000))])
            users += [c.user for c in created if isinstance(c, CreatedAccount)]
        seq = 0
        for first in range(0, closes, 1000):
            batch = range(first, min(closes, first + 1000))
            runner.execute([LockMargin(MarginLock(users[n % len(users)], margin, None, n + 1))
                            for n in batch])
            items, notes = [], []
            for n in batch:
                seq += 1
                position_id = (1 << 34) | (seq << ROW_SHIFT)
                # each open noted, as the API notes it: that ends its lock, of which the
                # ledger tracks at most 65,536 under way (it refuses more)
                notes.append(Note(users[n % len(users)], n + 1, POSITION_OPENED, OpenPosition(
                    position_id, users[n % len(users)], "SOL", Side.LONG, 10_000, 100, margin,
                    10, 9_000, 0, 0, 1, None)))
                items.append(SettlementItem(seq, ClosedPosition(
                    position_id, users[n % len(users)], "SOL", Side.LONG, 10_000, 100, margin,
                    10, 9_000, 0, 0, 1, 10_000, 0, margin, 0, 0, int(CloseReason.MANUAL), 2,
                    position_id, 0)))
            runner.execute(notes)
            runner.execute([ApplySettlements("shard-SOL-0", tuple(items))])
        fill_s = time.perf_counter() - started
        runner.checkpoint()
        runner.close()
        rebuilds: list[float] = []
        # each in a new process, as a restarted ledger host rebuilds (this one holds the fill's
        # garbage and the API phases' imports)
        with multiprocessing.get_context("spawn").Pool(1, maxtasksperchild=1) as pool:
            for _ in range(opens):
                rebuild_s, history = pool.apply(_ledger_rebuild, (data_dir,))
                rebuilds.append(rebuild_s)
                if history != closes:
                    raise RuntimeError(f"the ledger came back with {history} closes, not "
                                       f"{closes}")
        return {"accounts": len(users), "closes": closes, "fill_s": fill_s,
                "rebuild_s": sorted(rebuilds)[len(rebuilds) // 2], "rebuilds_s": rebuilds}
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def answers_phase(answers: int, rounds: int = 3, new: int = 1_000) -> dict[str, Any]:
    """A ledger machine holding ``answers`` clientOrderId answers (module docstring, 5):
    medians of ``rounds`` snapshots taken after ``new`` more answers each, of the JSON
    encodings of their meta and of restores; the first snapshot; in seconds, bytes in MB."""
    from cluster.durability.runner import collector_paused
    from engine.ledger_machine import (
        CreateAccount,
        LedgerMachine,
        LockMargin,
        Remember,
        hash_api_key,
    )
    from engine.machine import run
    from engine.messages import IdemHit, IdemKey, MarginLock, OpenPosition
    from engine.orders import Side

    settings = Settings()
    held = answers + rounds * new
    m = LedgerMachine(settings.signup_balance_micros, max_client_order_ids=held,
                      max_open_positions=held)
    now_us = time.time_ns() // 1000
    users = [run(m, CreateAccount(f"acc_{n:024x}", hash_api_key(f"key-{n}")), now_us).user
             for n in range(100)]
    margin = 1_000

    given = itertools.count()

    def answer(count: int) -> None:
        for n in itertools.islice(given, count):
            user = users[n % len(users)]
            key = IdemKey(user, "open", f"order-{n}")
            run(m, LockMargin(MarginLock(user, margin, key, n + 1), asked=bytes(32)), now_us)
            run(m, Remember(key, OpenPosition(n + 1, user, "SOL", Side.LONG, 10_000, 100,
                                              margin, 10, 9_000, 0, 0, now_us, None)), now_us)

    answer(answers)
    def table_bytes(arrays: dict[str, Any]) -> int:  # (none before the answers table)
        return int(arrays["answers"].nbytes) if "answers" in arrays else 0

    started = time.perf_counter()
    previous = table_bytes(m.snapshot()[0])
    first_s = time.perf_counter() - started
    snapshot_s, json_s, restore_s, written_mb = [], [], [], []
    for _ in range(rounds):
        answer(new)
        started = time.perf_counter()
        arrays, meta = m.snapshot()
        snapshot_s.append(time.perf_counter() - started)
        started = time.perf_counter()
        text = json.dumps(meta, sort_keys=True, separators=(",", ":"))
        json_s.append(time.perf_counter() - started)
        # what the snapshot writes for them: its meta, and the table's bytes past the last
        # snapshot's (the store appends only those)
        written_mb.append((len(text) + table_bytes(arrays) - previous) / 1e6)
        previous = table_bytes(arrays)
        started = time.perf_counter()
        with collector_paused():  # (as a restart's recovery)
            restored = LedgerMachine.from_snapshot(settings.signup_balance_micros,
                                                   m.max_open_positions, m.max_open_orders,
                                                   arrays, json.loads(text),
                                                   max_client_order_ids=held)
        restore_s.append(time.perf_counter() - started)
    key = IdemKey(users[0], "open", "order-0")
    hit = run(restored, LockMargin(MarginLock(users[0], margin, key, held + 1),
                                   asked=bytes(32)), now_us)
    if not isinstance(hit, IdemHit) or hit.answer is None:
        raise RuntimeError(f"the restored ledger answered {hit!r} for a held clientOrderId")
    return {"answers": answers, "new": new, "first_snapshot_s": first_s,
            "snapshot_s": statistics.median(snapshot_s),
            "json_s": statistics.median(json_s), "json_mb": len(text) / 1e6,
            "written_mb": statistics.median(written_mb),
            "restore_s": statistics.median(restore_s)}


def _ledger_rebuild(data_dir: str) -> tuple[float, int]:
    """In a new process: open the ledger kept in ``data_dir``; ``(rebuild s, closes held)``."""
    from cluster.actors.host import host_specs
    from engine.ledger_machine import Totals

    spec, _ = host_specs(Settings(), data_dir)
    runner = spec.runner()
    try:
        [totals] = runner.execute([Totals()])
        return runner.recovery_s(), int(totals["closed_positions"])
    finally:
        runner.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardex bench durability", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=positive_int, default=64)
    parser.add_argument("--slices", type=positive_int, default=10,
                        help="API slices of each mode, alternating with the other's")
    parser.add_argument("--slice-s", type=duration, default=3.0, help="load per API slice")
    parser.add_argument("--positions", type=nonneg_int, default=ONE_MILLION,
                        help="positions in the shard killed for the recovery figure "
                             "(0 skips it)")
    parser.add_argument("--kills", type=positive_int, default=3,
                        help="kill -9 of the full shard, each after the previous recovery")
    parser.add_argument("--ledger-accounts", type=positive_int, default=50_000,
                        help="accounts in the ledger rebuilt for its recovery figure")
    parser.add_argument("--ledger-closes", type=nonneg_int, default=300_000,
                        help="closes in that ledger's history (0 skips the ledger figure)")
    parser.add_argument("--ledger-opens", type=positive_int, default=3,
                        help="rebuilds of that ledger timed (the median is reported)")
    parser.add_argument("--commits", type=nonneg_int, default=3_000,
                        help="journal commits timed per round of each mode (0 skips it)")
    answers_help = "clientOrderId answers held by the ledger snapshotted (0 skips it)"
    parser.add_argument("--ledger-answers", type=nonneg_int, default=300_000, help=answers_help)
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed)")
    args = parser.parse_args(argv)
    if args.slices < 1 or args.slice_s <= 0:
        parser.error("--slices must be at least 1 and --slice-s above 0")

    modes = api_phase(args.concurrency, args.slices, args.slice_s)
    recovery = recovery_phase(args.positions, args.kills) if args.positions else None
    ledger = ledger_phase(max(1, args.ledger_accounts), args.ledger_closes,
                          max(1, args.ledger_opens)) if args.ledger_closes else None
    answers = answers_phase(args.ledger_answers) if args.ledger_answers else None
    commit = commit_phase(args.commits) if args.commits > 0 else None
    memory, durable = modes[False], modes[True]
    ratio = _ratio(durable, memory)
    slice_ratios = [d / m if m else 0.0 for d, m in zip(
        durable["ops_per_s_by_slice"], memory["ops_per_s_by_slice"], strict=True)]
    bytes_per_op = durable["journal_bytes"] / max(1, durable["ops_total"])
    print(f"HTTP open/close closed loop at concurrency {args.concurrency}, {args.slices} slices "
          f"of {args.slice_s:g} s per mode, alternating (one op = one acknowledged request)")
    print(f"{'actors':<34}{'ops/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'errors':>8}")
    for name, r in (("in memory (no journal)", memory),
                    ("journaled (fdatasync per batch)", durable)):
        print(f"{name:<34}{r['ops_per_s']:>10.0f}{r['p50_ms']:>10.2f}{r['p99_ms']:>10.2f}"
              f"{r['errors']:>8}")
    for r, name in ((memory, "in memory"), (durable, "journaled")):
        print(f"  {name} ops/s by slice: "
              + ", ".join(f"{q:.0f}" for q in r["ops_per_s_by_slice"]))
    print(f"  journaled / in memory by slice: median {statistics.median(slice_ratios):.2f}, "
          f"{min(slice_ratios):.2f}-{max(slice_ratios):.2f}, journaled faster in "
          f"{sum(q > 1 for q in slice_ratios)} of {len(slice_ratios)}")
    print(f"durable / in-memory throughput: {ratio:.2f} (target >= 0.90)")
    print(f"journal bytes per op: {bytes_per_op:.0f} ({durable['journal_bytes']:,} bytes for "
          f"{durable['ops_total']:,} ops incl. the sim feed's tick records)")
    out: dict[str, Any] = {
        "bench": "durability",
        "concurrency": args.concurrency,
        "slices": args.slices,
        "slice_s": args.slice_s,
        "acked_ops_per_s_durable": round(durable["ops_per_s"], 1),
        "acked_ops_per_s_memory": round(memory["ops_per_s"], 1),
        "acked_ops_per_s_durable_by_slice": [round(q, 1) for q in durable["ops_per_s_by_slice"]],
        "acked_ops_per_s_memory_by_slice": [round(q, 1) for q in memory["ops_per_s_by_slice"]],
        "durable_over_memory": round(ratio, 3),
        "durable_over_memory_slice_median": round(statistics.median(slice_ratios), 3),
        "p50_ms_durable": round(durable["p50_ms"], 2),
        "p50_ms_memory": round(memory["p50_ms"], 2),
        "p99_ms_durable": round(durable["p99_ms"], 2),
        "p99_ms_memory": round(memory["p99_ms"], 2),
        "journal_bytes_per_op": round(bytes_per_op, 1),
        "errors": durable["errors"] + memory["errors"],
    }
    if recovery is not None:
        _print_recovery(recovery)
        out.update({
            "recovery_s_1m_positions": round(recovery["kill_to_ready_s"], 3),
            "recovery_s_1m_positions_max": round(recovery["kill_to_ready_max_s"], 3),
            "recovery_s_1m_positions_alive_call": (
                round(recovery["kill_to_alive_answer_s"], 3)
                if recovery["kill_to_alive_answer_s"] is not None else None),
            "recovery_rebuild_s": round(recovery["rebuild_s"], 3),
            "recovery_ray_restart_s": round(recovery["kill_to_init_s"], 3),
            "recovered_positions": recovery["recovered_positions"],
            "recovery_replayed_records": recovery["replayed_records"],
            "recovery_peak_rss_mib": recovery["peak_rss_mib"],
            "recovery_minor_faults": recovery["minor_faults"],
        })
    if ledger is not None:
        print(f"ledger with {ledger['accounts']:,} accounts and {ledger['closes']:,} closes: "
              f"filled in {ledger['fill_s']:.1f} s; rebuilt from its snapshot in "
              f"{ledger['rebuild_s']:.2f} s (median of "
              + ", ".join(f"{s:.2f}" for s in ledger["rebuilds_s"]) + " s)")
        out.update({"ledger_accounts": ledger["accounts"], "ledger_closes": ledger["closes"],
                    "ledger_rebuild_s": round(ledger["rebuild_s"], 3)})
    if answers is not None:
        print(f"ledger holding {answers['answers']:,} clientOrderId answers, "
              f"{answers['new']:,} new since the last snapshot: snapshot() "
              f"{answers['snapshot_s']:.3f} s on its thread (the first "
              f"{answers['first_snapshot_s']:.2f} s), its meta's JSON "
              f"{answers['json_s']:.3f} s, {answers['written_mb']:.2f} MB written for them; "
              f"restored in {answers['restore_s']:.2f} s")
        out.update({"answers": answers["answers"],
                    "answers_snapshot_s": round(answers["snapshot_s"], 4),
                    "answers_first_snapshot_s": round(answers["first_snapshot_s"], 3),
                    "answers_json_s": round(answers["json_s"], 4),
                    "answers_written_mb": round(answers["written_mb"], 3),
                    "answers_restore_s": round(answers["restore_s"], 3)})
    if commit is not None:
        (zeroed_us, zeroed_cpu_us), (append_us, append_cpu_us) = (
            commit["zeroed"], commit["appending"])
        print(f"journal commit of one {COMMIT_RECORD_BYTES}-byte record (write + fdatasync, "
              f"median of {COMMIT_ROUNDS} rounds of {args.commits:,}): zeroed ahead "
              f"{zeroed_us:.0f} us, {zeroed_cpu_us:.0f} us of busy CPU; appending "
              f"{append_us:.0f} us, {append_cpu_us:.0f} us of busy CPU "
              f"(zeroed / appending: time {zeroed_us / append_us:.2f}, "
              f"CPU {zeroed_cpu_us / max(append_cpu_us, 1e-9):.2f})")
        out.update({"commit_us_zeroed": round(zeroed_us, 1),
                    "commit_us_appending": round(append_us, 1),
                    "commit_cpu_us_zeroed": round(zeroed_cpu_us, 1),
                    "commit_cpu_us_appending": round(append_cpu_us, 1)})
    print(json.dumps(out))
    return 0 if recovery is None or recovery["recovered_positions"] == recovery["positions"] \
        else 1


def _ratio(durable: dict[str, Any], memory: dict[str, Any]) -> float:
    """Journaled over in-memory throughput (0 when memory served none)."""
    return durable["ops_per_s"] / memory["ops_per_s"] if memory["ops_per_s"] else 0.0


def _print_recovery(recovery: dict[str, Any]) -> None:
    print(f"shard with {recovery['positions']:,} positions: filled in "
          f"{recovery['fill_s']:.1f} s ({recovery['journal_bytes'] / 1e6:.0f} MB of journal, "
          f"{recovery['snapshots_written']} snapshots); after kill -9 answering again in "
          f"{recovery['kill_to_ready_s']:.2f} s (median of {recovery['kills']}, max "
          f"{recovery['kill_to_ready_max_s']:.2f}; target <= 2): Ray restarting the process and "
          f"entering __init__ {recovery['kill_to_init_s']:.2f} s, rebuilding the state "
          f"{recovery['rebuild_s']:.2f} s (snapshot at record {recovery['snapshot_seq']:,} + "
          f"{recovery['replayed_records']:,} journal records); "
          f"{recovery['recovered_positions']:,} positions recovered; the new process peaked "
          f"at {recovery['peak_rss_mib']:,} MiB resident after "
          f"{recovery['minor_faults']:,} minor page faults")
    if recovery["kill_to_alive_answer_s"] is not None:
        print(f"  a call made as soon as Ray reports the host alive again answers "
              f"{recovery['kill_to_alive_answer_s']:.2f} s after the kill (median)")


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
