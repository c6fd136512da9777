"""``shardex bench footprint``: what an idle platform costs, process by process.

Starts the platform the way ``shardex up`` does (cluster.actors.launcher.Platform: a local Ray, the
journaled ledger and shards, the feed actor, the Serve API; its own embedded broker on a free
port; a temporary DATA_DIR; a free API port) with ``FEED_SOURCE=none``, so nothing happens
once it is up; ``--feed-source sim`` measures a platform whose market moves (the sim source at
its default rate) while nobody trades, which is what a live platform costs between clients.
After ``--settle-s`` (start-up work: imports, the first partition checks, Serve's deploy), it
reads ``/proc`` for every process of the platform at the start and at the end of
``--window-s`` seconds:

- cores: user + system CPU time the process used in the window (``/proc/PID/stat``) divided
  by the window;
- RSS: resident memory at the end of the window (``/proc/PID/status``); PSS too
  (``/proc/PID/smaps_rollup``: shared pages, e.g. the Python and Ray libraries every worker
  maps, divided among the processes that map them), since RSS counts them once per process.

The platform's processes are this process (the driver, what ``shardex up`` runs), everything
started below it (Ray's daemons and workers, the broker, which runs in its own session) and
any other process of the same Ray session. Workers are named by their actor (from the GCS).
Then the platform is stopped through its own stop path (Ray's processes by pid, the broker by
pid); whatever is still alive below this process after that is named and killed by pid.

Prints a table, then one JSON line (``idle_cpu_cores``, ``rss_gib``, ``processes``, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench.options import duration, duration_or_zero

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")
CPU_TARGET_CORES = 0.05  # the targets of the issue: idle CPU of all processes together
RSS_TARGET_GIB = 1.2  # ... and their memory
STOP_WAIT_S = 10.0  # how long stopped processes may take to exit before they are killed

# What each kind of process is for: (a substring of its command line, the role). Ray's
# workers and agents rename themselves "ray::<Class>", which replaces their command line.
ROLES = (
    ("gcs_server", "Ray GCS: cluster metadata, actor table"),
    ("raylet", "Ray raylet: scheduling, workers, object store"),
    ("dashboard/dashboard.py", "Ray dashboard head (usage-stats module only)"),
    ("log_monitor.py", "Ray log monitor: worker logs to drivers"),
    ("autoscaler/_private/monitor.py", "Ray autoscaler monitor"),
    ("ray::DashboardAgent", "Ray dashboard agent: metrics and node reports"),
    ("ray::RuntimeEnvAgent", "Ray runtime-env agent: builds workers' runtime envs"),
    ("ray::IDLE", "Ray worker started ahead of need, idle"),
    ("ray::ServeController", "Serve controller"),
    ("ray::ProxyActor", "Serve proxy"),
    ("ray::ServeReplica", "API replica (HTTP on PORT, direct ingress)"),
    ("ray::FeedActorShell", "feed actor: Kafka -> shards, candles"),
    ("ray::MachineHost", "journaled state machine host"),
)


@dataclasses.dataclass(frozen=True)
class Sample:
    """One reading of a process: CPU ticks used so far, memory now."""

    pid: int
    start_ticks: int  # when it started (tells a reused pid apart)
    cpu_ticks: int  # user + system, in clock ticks
    rss_kib: int
    pss_kib: int | None
    title: str  # the process title (Ray workers rename themselves "ray::<Class>")
    cmdline: str


def _stat(pid: int) -> tuple[int, int, int] | None:
    """(parent pid, start time, user + system ticks) of ``pid``, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2:].split()  # after "pid (comm) "; comm may hold spaces
    return int(fields[1]), int(fields[19]), int(fields[11]) + int(fields[12])


def _kib(path: str, key: str) -> int | None:
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def sample(pid: int) -> Sample | None:
    stat = _stat(pid)
    if stat is None:
        return None
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    args = [a for a in raw.decode(errors="replace").split("\0") if a]
    cmdline = " ".join(args)
    script = next((a for a in args[1:] if a.endswith(".py")), None)
    title = (args[0].split(".", 1)[0]  # an actor's title names its running method after a dot
             if args and args[0].startswith("ray::")
             else Path(script or (args[0] if args else "?")).name)
    return Sample(pid, stat[1], stat[2], _kib(f"/proc/{pid}/status", "VmRSS:") or 0,
                  _kib(f"/proc/{pid}/smaps_rollup", "Pss:"), title, cmdline)


def platform_pids(root: int, session_name: str | None) -> set[int]:
    """``root``, every process below it, and any other process whose command line names the
    Ray session (one a daemon might have left to init)."""
    children: dict[int, list[int]] = {}
    in_session: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        pid = int(entry.name)
        stat = _stat(pid)
        if stat is None:
            continue
        children.setdefault(stat[0], []).append(pid)
        if session_name:
            with contextlib.suppress(OSError):
                if session_name.encode() in (entry / "cmdline").read_bytes():
                    in_session.add(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), ()):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found | in_session


def _actor_names() -> dict[int, str]:
    """Worker pid -> the name of the actor it hosts (or its class), from the GCS.

    ``ray.util.state`` would answer this through the dashboard's state module, which a Ray
    started without the dashboard does not run; the GCS's actor table is read directly.
    """
    import ray

    names: dict[int, str] = {}
    for info in ray._private.state.actors().values():
        if info.get("State") == "ALIVE" and info.get("Pid"):
            names[int(info["Pid"])] = info.get("Name") or info.get("ActorClassName") or "?"
    return names


def _broker_pid(data_dir: Path) -> int | None:
    """The embedded broker's pid, from the record the platform keeps in DATA_DIR."""
    from cluster.actors.launcher import BROKER_RECORD

    try:
        return int(json.loads((data_dir / BROKER_RECORD).read_text())["broker"]["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def role_of(s: Sample, driver: int, broker: int | None) -> str:
    if s.pid == driver:
        return "driver (`shardex up`): Ray driver, feed supervisor"
    if s.pid == broker:
        return "embedded Kafka broker (Tansu)"
    for needle, role in ROLES:
        if needle in s.cmdline:
            return role
    return "?"


@dataclasses.dataclass
class Row:
    name: str
    pid: int
    role: str
    cores: float
    rss_mib: float
    pss_mib: float | None


def measure(window_s: float, driver: int, broker: int | None, session_name: str | None
            ) -> tuple[list[Row], dict[str, int]]:
    """Rows of every platform process over ``window_s``; counts of processes that appeared
    or ended within the window."""
    pids = platform_pids(driver, session_name)
    before = {s.pid: s for p in pids if (s := sample(p)) is not None}
    t0 = time.monotonic()
    time.sleep(window_s)
    elapsed_s = time.monotonic() - t0
    pids = platform_pids(driver, session_name)
    after = {s.pid: s for p in pids if (s := sample(p)) is not None}
    names = _actor_names()
    rows: list[Row] = []
    appeared = 0
    for pid, s in after.items():
        first = before.get(pid)
        if first is None or first.start_ticks != s.start_ticks:
            appeared += 1
            used = s.cpu_ticks  # started within the window: all of its CPU is in it
        else:
            used = s.cpu_ticks - first.cpu_ticks
        name = "shardex (driver)" if pid == driver else s.title
        if names.get(pid) and not names[pid].startswith("SERVE_"):  # Serve's names are ids
            name = f"{s.title} ({names[pid]})"
        rows.append(Row(name, pid, role_of(s, driver, broker), used / CLK_TCK / elapsed_s,
                        s.rss_kib / 1024, None if s.pss_kib is None else s.pss_kib / 1024))
    rows.sort(key=lambda r: (-r.cores, -r.rss_mib))
    ended = sum(1 for pid in before if pid not in after)
    return rows, {"appeared": appeared, "ended": ended}


def total_pss_mib(rows: list[Row]) -> float | None:
    """The PSS of ``rows`` summed, or None when a process's could not be read: a total that
    left it out (counted it as 0) would be too low, and look like a target met."""
    if any(r.pss_mib is None for r in rows):
        return None
    return sum(r.pss_mib or 0.0 for r in rows)


def _stop_leftovers(driver: int) -> list[str]:
    """What still runs below this process ``STOP_WAIT_S`` after the platform stopped: named,
    then killed by pid (SIGTERM, then SIGKILL a second later)."""
    deadline = time.monotonic() + STOP_WAIT_S
    left = platform_pids(driver, None) - {driver}
    while left and time.monotonic() < deadline:
        time.sleep(0.2)
        left = platform_pids(driver, None) - {driver}
    named = [f"{s.title} (pid {s.pid})" for p in sorted(left) if (s := sample(p)) is not None]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in left:
            with contextlib.suppress(OSError):
                os.kill(pid, sig)
        time.sleep(1.0)
        left = platform_pids(driver, None) - {driver}
        if not left:
            break
    return named


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardex bench footprint", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--window-s", type=duration, default=20.0, help="the measured window")
    parser.add_argument("--settle-s", type=duration_or_zero, default=10.0,
                        help="wait after the platform is up, before the window")
    parser.add_argument("--feed-source", choices=("none", "sim"), default="none",
                        help="none: nothing moves; sim: simulated prices flow, nobody trades")
    parser.add_argument("--json", action="store_true", help="(the JSON line is always printed)")
    args = parser.parse_args(argv)

    from cluster.actors.launcher import Platform
    from cluster.config import Settings
    from feed.broker import free_port

    driver = os.getpid()
    data_dir = tempfile.mkdtemp(prefix="shardex-bench-footprint-")
    settings = dataclasses.replace(Settings.from_env(), port=free_port(HOST), host=HOST,
                                   feed_source=args.feed_source, data_dir=Path(data_dir),
                                   kafka_brokers=None, ray_address=None)
    # what `shardex up` builds (cluster.actors.launcher.up), with its own broker port
    platform = Platform(settings, with_feed=True, host=HOST, broker_port=free_port(HOST),
                        durable=True)
    leftovers: list[str] = []
    broker: int | None = None
    try:
        t0 = time.monotonic()
        platform.start()
        startup_s = time.monotonic() - t0
        phases_s = dict(platform.phases_s)
        import ray

        session = ray.get_runtime_context().get_session_name()
        broker = _broker_pid(settings.data_dir)
        time.sleep(args.settle_s)
        rows, churn = measure(args.window_s, driver, broker, session)
    finally:
        platform.stop()
        leftovers = _stop_leftovers(driver)
        shutil.rmtree(data_dir, ignore_errors=True)

    total_cores = sum(r.cores for r in rows)
    rss_mib = sum(r.rss_mib for r in rows)
    pss_mib = total_pss_mib(rows)
    broker_cores = sum(r.cores for r in rows if r.pid == broker)
    width = max(len(r.name) for r in rows)
    what = "idle platform" if args.feed_source == "none" else "no trading, prices flowing"
    print(f"shardex bench footprint: {what} (FEED_SOURCE={args.feed_source}), {args.window_s:g} s "
          f"window after {args.settle_s:g} s settling; started in {startup_s:.1f} s ("
          + ", ".join(f"{name} {s:.1f} s" for name, s in phases_s.items()) + ")")
    print(f"  {'process':<{width}}  {'pid':>7}  {'cores':>6}  {'RSS MiB':>8}  {'PSS MiB':>8}  "
          "role")
    for r in rows:
        pss = "" if r.pss_mib is None else f"{r.pss_mib:8.0f}"
        print(f"  {r.name:<{width}}  {r.pid:>7}  {r.cores:6.3f}  {r.rss_mib:8.0f}  {pss:>8}  "
              f"{r.role}")
    pss_total = "" if pss_mib is None else f"{pss_mib:8.0f}"
    print(f"  {'total (' + str(len(rows)) + ' processes)':<{width}}  {'':>7}  "
          f"{total_cores:6.3f}  {rss_mib:8.0f}  {pss_total:>8}"
          + ("" if pss_mib is not None else "  (no PSS: a process's smaps_rollup was unread)"))
    print(f"  targets: idle CPU <= {CPU_TARGET_CORES} cores "
          f"({'met' if total_cores <= CPU_TARGET_CORES else 'missed'}), RSS <= "
          f"{RSS_TARGET_GIB} GiB ({'met' if rss_mib / 1024 <= RSS_TARGET_GIB else 'missed'})")
    if churn["appeared"] or churn["ended"]:
        print(f"  within the window {churn['appeared']} process(es) started and "
              f"{churn['ended']} ended (counted from their start / not counted)")
    if leftovers:
        print(f"  still running after the stop, killed by pid: {', '.join(leftovers)}",
              file=sys.stderr)
    print(json.dumps({
        "bench": "footprint", "feed_source": args.feed_source, "window_s": args.window_s,
        "settle_s": args.settle_s,
        "startup_s": round(startup_s, 2),
        "startup_phases_s": {name: round(s, 2) for name, s in phases_s.items()},
        "idle_cpu_cores": round(total_cores, 4), "rss_gib": round(rss_mib / 1024, 3),
        "pss_gib": None if pss_mib is None else round(pss_mib / 1024, 3),
        "processes": len(rows),
        "broker_cores": round(broker_cores, 4),
        "cpu_target_met": total_cores <= CPU_TARGET_CORES,
        "rss_target_met": rss_mib / 1024 <= RSS_TARGET_GIB,
        "by_process": [{"name": r.name, "pid": r.pid, "role": r.role,
                        "cores": round(r.cores, 4), "rss_mib": round(r.rss_mib, 1),
                        "pss_mib": None if r.pss_mib is None else round(r.pss_mib, 1)}
                       for r in rows],
        "started_in_window": churn["appeared"], "ended_in_window": churn["ended"],
        "left_after_stop": leftovers, "load_avg_1m": os.getloadavg()[0],
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
