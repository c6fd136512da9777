"""What the CLI decides before any Ray starts: the port check binds the way the servers do,
``status``/``audit`` say at once that DATA_DIR records no running platform, and a bad setting
is one line, not a traceback."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster.actors.launcher import LaunchError
from cluster.actors.launcher import Platform
from cluster.actors.launcher import _pid_running
from cluster.actors.launcher import api_status
from cluster.actors.launcher import check_layout
from cluster.actors.launcher import feed_status
from cluster.actors.launcher import newest_tops
from cluster.actors.launcher import port_is_free
from cluster.actors.launcher import resume_simulation
from cluster.actors.launcher import stale_prices
from cluster.actors.names import LEDGER
from cluster.config import MARKET_TOPIC
from cluster.config import Settings
from cluster.durability.journal import JournalDamagedError
from cluster.trading.reconciler import BooksDisagree
from engine.ledger import AuditDifference
from engine.market import Tick
from engine.messages import OpenPosition
from engine.shard_machine import ApplyTick
from engine.shard_machine import LastTick
from feed.broker import ProcessIdentity
from feed.broker import check_bindable
from feed.broker import free_port
from feed.broker import free_ports
from feed.source import AutoSource
from feed.source import make_source
from tests.unit.cluster.local_platform import build_platform
from tests.unit.cluster.local_platform import signup
from tests.unit.cluster.local_platform import sol_long

ROOT = Path(__file__).resolve().parents[3]


def _time_wait_port() -> int:
    """A loopback port whose server side closed first: its old connection sits in TIME_WAIT
    (what a killed server leaves behind), nothing listens any more."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        client = socket.create_connection(("127.0.0.1", port))
        server, _ = listener.accept()
        server.close()  # active close: the server's end goes to TIME_WAIT
        client.recv(1)
        client.close()
    return port


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux TIME_WAIT semantics")
def test_a_port_held_only_by_time_wait_is_free_for_a_restart() -> None:
    port = _time_wait_port()
    with socket.socket() as plain, pytest.raises(OSError):
        plain.bind(("127.0.0.1", port))  # the old check's way: refused for ~60 s
    check_bindable("127.0.0.1", port)
    assert port_is_free("127.0.0.1", port)


def test_a_live_listener_still_counts_as_in_use() -> None:
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = int(listener.getsockname()[1])
        with pytest.raises(OSError):
            check_bindable("127.0.0.1", port)
        assert not port_is_free("127.0.0.1", port)


def test_a_host_this_machine_cannot_listen_on_is_named_as_such(tmp_path: Path) -> None:
    """An address of no interface here (TEST-NET-3): not mistaken for a port in use."""
    settings = dataclasses.replace(Settings(), data_dir=tmp_path, port=free_port(),
                                   host="203.0.113.7")
    with pytest.raises(LaunchError) as refused:
        Platform(settings, host=settings.host).start()
    message = str(refused.value)
    assert message.startswith(f"cannot listen on 203.0.113.7:{settings.port}: "), message
    assert "set HOST" in message and "TIME_WAIT" not in message, message


def _cli(*args: str, env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "cluster.cli", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)
    return done, time.monotonic() - started


def _env(data_dir: Path, **extra: str) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_DIR": str(data_dir), **extra}
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.mark.parametrize("command", [["status"], ["audit"], ["audit", "--json"]])
def test_without_a_recorded_platform_status_and_audit_say_so_at_once(
        command: list[str], tmp_path: Path) -> None:
    done, took_s = _cli(*command, env=_env(tmp_path))
    assert done.returncode != 0
    assert took_s < 5.0, took_s
    assert f"no platform is recorded in DATA_DIR={tmp_path.resolve()}" in done.stderr
    assert "DATA_DIR=" in done.stderr and "RAY_ADDRESS=" in done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


@pytest.mark.parametrize("command", ["status", "audit"])
def test_a_record_left_by_a_dead_platform_is_reported_at_once(command: str,
                                                              tmp_path: Path) -> None:
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    (tmp_path / "ray-address.json").write_text(json.dumps(
        {"ray_address": f"127.0.0.1:{free_port()}", "pid": int(gone.stdout),
         "host": socket.gethostname()}))
    done, took_s = _cli(command, env=_env(tmp_path))
    assert done.returncode != 0 and took_s < 5.0, (took_s, done.stderr)
    assert "is not running" in done.stderr and "shardex up" in done.stderr


def test_a_record_whose_ray_refuses_connections_is_reported_at_once(tmp_path: Path) -> None:
    me = ProcessIdentity.of(os.getpid())
    (tmp_path / "ray-address.json").write_text(json.dumps(
        {"ray_address": f"127.0.0.1:{free_port()}", "pid": os.getpid(),
         "host": socket.gethostname(), "owner": me.to_json() if me else None}))
    done, took_s = _cli("status", env=_env(tmp_path))
    assert done.returncode != 0 and took_s < 5.0, (took_s, done.stderr)
    assert "does not answer" in done.stderr


@pytest.mark.parametrize("command", [["up"], ["engine"], ["feed"], ["status"], ["audit"],
                                     ["audit", "--offline"]])
@pytest.mark.parametrize(("variable", "value"), [("SHARDS", "0"), ("PORT", "abc")])
def test_a_bad_setting_is_one_line_and_a_non_zero_exit(command: list[str], variable: str,
                                                       value: str, tmp_path: Path) -> None:
    done, _ = _cli(*command, env=_env(tmp_path, **{variable: value}))
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "configuration error" in lines[0] and "Traceback" not in done.stderr
    assert f"{variable} must be " in lines[0], lines[0]  # the line names what to fix


@pytest.mark.parametrize("argv", [
    [], ["frobnicate"], ["status", "--bogus"], ["bench"], ["bench", "nope"],
    ["up", "--broker-port", "70000"], ["engine", "--broker-port", "0"],
    ["up", "--broker-port", "x"], ["up", "--broker-port", "9_092"],
    ["up", "--broker-port", "\u0669\u0660\u0669\u0662"], ["engine", "--broker-port", "+9092"],
    ["feed", "--broker-port", "0"]])
def test_a_bad_command_line_is_a_usage_error_before_anything_starts(
        argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    """argparse's usage line and exit 2, read from no setting. A --broker-port out of range was
    refused only after the settings were read and Ray imported, without the usage, and int()
    took 9_092 and other scripts' digits as 9092."""
    from cluster import cli

    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    err = capsys.readouterr().err
    assert ended.value.code == 2 and err.startswith("usage: shardex"), err
    assert "Traceback" not in err and ": error: " in err.splitlines()[-1], err


@pytest.mark.parametrize("argv,stray", [
    (["up", "--bogus"], "--bogus"), (["engine", "x"], "x"), (["status", "--json"], "--json"),
    (["audit", "--offline", "now"], "now"), (["feed", "-v", "1"], "-v 1")])
def test_an_argument_a_subcommand_does_not_take_shows_that_subcommands_usage(
        argv: list[str], stray: str, capsys: pytest.CaptureFixture[str]) -> None:
    """`shardex up --bogus` printed the top level's usage (`shardex [-h] {up,engine,...}`),
    which does not list what `up` takes."""
    from cluster import cli

    with pytest.raises(SystemExit) as ended:
        cli.main(argv)
    err = capsys.readouterr().err.splitlines()
    assert ended.value.code == 2
    assert err[0].startswith(f"usage: shardex {argv[0]} [-h]"), err
    assert err[-1] == f"shardex {argv[0]}: error: unrecognized arguments: {stray}"


@pytest.mark.parametrize("command", [["up"], ["status"], ["audit"], ["audit", "--offline"]])
def test_a_layout_other_than_the_data_dirs_is_one_line_naming_it(command: list[str],
                                                                 tmp_path: Path) -> None:
    """Ids carry their shard's tag: a DATA_DIR first used with SOL in two shards is read with
    that layout only; any other SHARDS is refused before anything is read or written."""
    first = dataclasses.replace(Settings(), data_dir=tmp_path, shards={"SOL": 2})
    check_layout(first, record=True)
    (tmp_path / LEDGER).mkdir()  # state to audit offline
    before = sorted(p.name for p in tmp_path.iterdir())
    done, took_s = _cli(*command, env=_env(tmp_path, PORT=str(free_port()),
                                           FEED_SOURCE="sim"))
    assert done.returncode != 0 and took_s < 10, (took_s, done.stderr)
    assert "ASSETS=SOL,BTC,ETH SHARDS=SOL=2,BTC=1,ETH=1" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before
    check_layout(first)  # the layout it was made with still passes


async def _positions_on_two_splits(data_dir: Path) -> Settings:
    """A DATA_DIR whose SOL positions sit on two splits, written without a layout.json (one
    made before the layout was recorded, or the ledger's and shards' directories restored
    alone); its settings."""
    settings = dataclasses.replace(Settings(), data_dir=data_dir, shards={"SOL": 2})
    p = build_platform(settings, data_dir=str(data_dir))
    try:
        who = await signup(p.service)
        await p.push_tick("SOL", "100.00", "100.01")
        splits = set()
        for _ in range(2):
            opened = await p.service.open_position(who, sol_long())
            assert isinstance(opened, OpenPosition), opened
            splits.add(p.service.layout.of_position(opened.position_id))
        assert {s.name for s in splits if s is not None} == {"shard-SOL-0", "shard-SOL-1"}
    finally:
        await p.service.aclose()
        p.hosts.close()
    assert not (data_dir / "layout.json").exists()
    return settings


def test_a_data_dir_without_its_layout_holding_a_split_the_layout_lacks_is_refused(
        tmp_path: Path) -> None:
    """No layout.json, and SHARDS leaves out a split whose directory holds positions: the
    start is refused naming it. It recorded the new layout and started, and its reconciliation
    released the margin of the positions it no longer read (a warning in the log)."""
    made = asyncio.run(_positions_on_two_splits(tmp_path))
    one = dataclasses.replace(made, shards={})
    with pytest.raises(LaunchError, match="shard-SOL-1") as refused:
        check_layout(one, record=True)
    assert "SHARDS=SOL=2,BTC=1,ETH=1" in str(refused.value), refused.value
    assert not (tmp_path / "layout.json").exists()
    with pytest.raises(LaunchError, match="shard-SOL-1"):
        check_layout(one)  # status, audit
    check_layout(made, record=True)  # the layout it was made with is recorded
    check_layout(made)


def _platform(data_dir: Path) -> Platform:
    settings = dataclasses.replace(Settings(), data_dir=data_dir, port=free_port())
    return Platform(settings)


def _record_owner(directory: Path, pid: int, **fields: str) -> None:
    owner = ProcessIdentity.of(pid)
    (directory / "ray-address.json").write_text(json.dumps(
        {"ray_address": "127.0.0.1:1", "pid": pid, "host": socket.gethostname(),
         "owner": owner.to_json() if owner else None, **fields}))


@pytest.fixture
def other() -> Iterator[subprocess.Popen[bytes]]:
    """A live process, not this one, to record as a platform's ``up``."""
    process = subprocess.Popen(["sleep", "30"])
    yield process
    process.kill()
    process.wait()


def test_up_refuses_a_data_dir_a_live_platform_runs_from(
        tmp_path: Path, other: subprocess.Popen[bytes]) -> None:
    _record_owner(tmp_path, other.pid)
    with pytest.raises(LaunchError, match=f"already runs from DATA_DIR.*pid {other.pid}"):
        _platform(tmp_path)._take_over_data_dir()
    assert (tmp_path / "ray-address.json").exists()


def test_a_copy_of_a_running_platforms_data_dir_is_not_taken_for_it(
        tmp_path: Path, other: subprocess.Popen[bytes]) -> None:
    """A copy of DATA_DIR made while its platform ran (a hot backup restored elsewhere) holds
    that platform's record: a start from the copy was refused as if that platform ran from it,
    and ``status`` reported that platform. The record names its directory; from another one it
    is a copy's, removed by a start, and ``status`` says no platform runs there."""
    original, copy = tmp_path / "original", tmp_path / "copy"
    original.mkdir()
    copy.mkdir()
    (tmp_path / "by-another-path").symlink_to(original)
    _record_owner(copy, other.pid, data_dir=str(original.resolve()))
    done, took_s = _cli("status", env=_env(copy))
    assert done.returncode == 1 and took_s < 5.0, (took_s, done.stderr)
    assert f"no platform runs from DATA_DIR={copy.resolve()}" in done.stderr, done.stderr
    assert f"DATA_DIR={original.resolve()}, of which this directory is a copy" \
        in done.stderr, done.stderr
    _platform(copy)._take_over_data_dir()
    assert not (copy / "ray-address.json").exists()
    # the original's own record, by any path to it, still says its platform runs there
    _record_owner(original, other.pid, data_dir=str(original.resolve()))
    for path in (original, tmp_path / "by-another-path"):
        with pytest.raises(LaunchError, match=f"already runs from DATA_DIR.*pid {other.pid}"):
            _platform(path)._take_over_data_dir()
    assert (original / "ray-address.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock and /proc/locks")
def test_a_second_start_is_refused_while_the_first_still_starts_and_not_after_its_kill(
        tmp_path: Path) -> None:
    """Two starts on one DATA_DIR: the first has not recorded its Ray yet (it records it once
    its broker and Ray run, seconds into its start). The second went ahead, overwrote the
    first's record and removed it when its hosts failed on the first's journals (with
    KAFKA_BROKERS; else it failed on the first's broker, blaming a `shardex feed`), leaving
    the first unrecorded for `status`, `audit` and the next start. The first's kill -9
    leaves nothing that refuses the next start."""
    first = subprocess.Popen([sys.executable, "-c", (
        "import dataclasses, pathlib, sys, time; "
        "from cluster.actors.launcher import Platform; from cluster.config import Settings; "
        "Platform(dataclasses.replace(Settings(), data_dir=pathlib.Path(sys.argv[1])))"
        "._take_over_data_dir(); print('started', flush=True); time.sleep(60)"),
        str(tmp_path)], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.PIPE, text=True)
    try:
        assert first.stdout is not None and first.stdout.readline().strip() == "started"
        assert not (tmp_path / "ray-address.json").exists()
        with pytest.raises(LaunchError, match=rf"^a platform already runs from DATA_DIR="
                                              rf"{tmp_path.resolve()} \(pid {first.pid} \("):
            _platform(tmp_path)._take_over_data_dir()
    finally:
        first.kill()
        first.wait()
    second = _platform(tmp_path)
    started = time.monotonic()
    second._take_over_data_dir()
    assert time.monotonic() - started < 2.0
    with pytest.raises(LaunchError, match="already runs"):  # held until it stops
        _platform(tmp_path)._take_over_data_dir()
    second.stop()
    _platform(tmp_path)._take_over_data_dir()


def test_the_record_of_a_killed_run_is_taken_over(tmp_path: Path) -> None:
    _record_owner(tmp_path, 2**22 + 7)  # no such process
    started = time.monotonic()
    _platform(tmp_path)._take_over_data_dir()
    assert time.monotonic() - started < 2.0
    assert not (tmp_path / "ray-address.json").exists()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="flock semantics")
def test_a_journal_a_killed_run_still_writes_is_named(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    import cluster.actors.launcher as launcher

    monkeypatch.setattr(launcher, "CRASHED_RUN_WAIT_S", 0.3)
    lock = tmp_path / "ledger" / "journal" / "LOCK"
    lock.parent.mkdir(parents=True)
    lock.touch()
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
        "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(30)"),
        str(lock)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        _record_owner(tmp_path, 2**22 + 7)
        # named by the process that holds it, as /proc/locks has it
        with pytest.raises(LaunchError, match=rf"LOCK is still locked by pid {holder.pid} \("):
            _platform(tmp_path)._take_over_data_dir()
        cancel = threading.Event()
        cancel.set()
        platform = _platform(tmp_path)
        platform.cancel = cancel
        started = time.monotonic()
        with pytest.raises(LaunchError, match="cancelled"):
            platform._take_over_data_dir()
        assert time.monotonic() - started < 1.0
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize("form", ["{}", "ray://{}"])
@pytest.mark.parametrize("command", [["status"], ["audit"]])
def test_a_ray_address_where_nothing_listens_is_said_at_once(
        command: list[str], form: str, tmp_path: Path) -> None:
    # ray.init waited without a limit (over 4 minutes seen) on a port where nothing listens;
    # a Ray Client (ray://) gave up after 30 s
    address = form.format(f"127.0.0.1:{free_port()}")
    done, took_s = _cli(*command, env={**_env(tmp_path), "RAY_ADDRESS": address})
    assert done.returncode != 0 and took_s < 5.0, (done.returncode, took_s)
    assert f"nothing answers at RAY_ADDRESS={address}" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_start_joining_a_ray_address_where_nothing_listens_is_refused_at_once(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``up``/``engine`` check it as ``status`` does: ray.init retried such an address for
    minutes, its log lines the only sign, and a SIGTERM waited for it."""
    import cluster.actors.launcher as launcher

    def joined(**options: object) -> None:
        raise AssertionError(f"ray.init reached: {options.get('address')}")

    monkeypatch.setattr(launcher, "_ray_init", joined)
    address = f"127.0.0.1:{free_port()}"
    settings = dataclasses.replace(Settings(), data_dir=tmp_path, ray_address=address)
    with pytest.raises(LaunchError, match=f"^nothing answers at RAY_ADDRESS={address} "):
        Platform(settings, bootstrap="127.0.0.1:1", with_feed=False).start()
    assert list(tmp_path.iterdir()) == []


def test_a_ray_whose_node_never_registers_is_a_start_that_failed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """ray.init raises a bare Exception when the node it started never registers with its GCS
    (its raylet ended as it started), after a fixed 30 s: ``up`` showed a traceback. It is now
    a LaunchError, which ``up`` says in one line (``shardex: cannot start: Ray did not start:
    ...``, exit 1); Ray's typed errors pass as they were."""
    import cluster.actors.launcher as launcher
    import ray
    from ray._private import auto_init_hook

    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", True)  # _ray_init turns it off
    raised: list[Exception] = []

    def init(**options: object) -> None:
        raise raised[-1]

    monkeypatch.setattr(ray, "init", init)
    raised.append(Exception("The current node timed out during startup. This could happen "
                            "because some of the raylet failed to startup"))
    with pytest.raises(LaunchError, match=r"^Ray did not start: The current node timed out "):
        launcher._ray_init(address="local")
    assert issubclass(LaunchError, launcher._start_failures())
    assert not auto_init_hook.enable_auto_connect
    raised.append(ConnectionError("no GCS"))
    with pytest.raises(ConnectionError, match=r"^no GCS$"):
        launcher._ray_init(address="local")


@pytest.mark.parametrize("mode", [None, "disabled", "token"])
def test_a_join_refused_names_the_token_a_cluster_may_want(
        monkeypatch: pytest.MonkeyPatch, mode: str | None) -> None:
    """A cluster with token authentication refuses a join without RAY_AUTH_MODE=token: Ray
    names the cause (InvalidAuthToken) only in its warnings, and ``up``'s line said only
    "Failed to connect to Ray cluster at ...". That line now names the setting, unless it
    is set."""
    import cluster.actors.launcher as launcher
    import ray
    from ray._private import auto_init_hook

    monkeypatch.setattr(auto_init_hook, "enable_auto_connect", True)  # _ray_init turns it off
    if mode is None:
        monkeypatch.delenv("RAY_AUTH_MODE", raising=False)
    else:
        monkeypatch.setenv("RAY_AUTH_MODE", mode)

    def init(**options: object) -> None:
        raise ConnectionError("Failed to connect to Ray cluster at 127.0.0.1:6379")

    monkeypatch.setattr(ray, "init", init)
    if mode == "token":
        with pytest.raises(ConnectionError, match=r"^Failed to connect to Ray cluster at "):
            launcher._ray_init(address="127.0.0.1:6379")
    else:
        with pytest.raises(LaunchError, match=r"^Failed to connect .* set RAY_AUTH_MODE=token"):
            launcher._ray_init(address="127.0.0.1:6379")
    with pytest.raises(ConnectionError):  # a local start joins nothing
        launcher._ray_init(address="local")


def test_the_layout_record_notes_once_the_hosts_made_their_journals(tmp_path: Path) -> None:
    """What a start reads to tell its hosts that they made their journals before
    (cluster.actors.host.HostSpec.made); the layout it records is kept as it was."""
    from cluster.actors.launcher import LAYOUT_FILE
    from cluster.actors.launcher import hosts_made
    from cluster.actors.launcher import record_hosts_made

    settings = dataclasses.replace(Settings(), data_dir=tmp_path)
    assert not hosts_made(settings)  # no record: a first start
    check_layout(settings, record=True)
    layout = json.loads((tmp_path / LAYOUT_FILE).read_text())
    assert not hosts_made(settings)  # recorded, the hosts not started yet
    record_hosts_made(settings)
    assert hosts_made(settings)
    assert json.loads((tmp_path / LAYOUT_FILE).read_text()) == {**layout, "hosts_made": True}
    check_layout(settings)  # the same layout still
    (tmp_path / LAYOUT_FILE).write_text("[]")  # not a record: as a first start, and refused
    assert not hosts_made(settings)


def test_a_ray_address_that_is_no_address_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    done, _ = _cli("status", env={**_env(tmp_path), "RAY_ADDRESS": "garbage"})
    assert done.returncode != 0
    assert done.stderr.startswith("shardex: configuration error: RAY_ADDRESS must be ")
    assert done.stderr.count("\n") == 1, done.stderr
    assert "Traceback" not in done.stderr and done.stdout == ""


def test_a_start_refused_for_its_port_records_no_layout(tmp_path: Path) -> None:
    """A durable start refused before it starts anything leaves DATA_DIR without a layout:
    the next try may use another SHARDS. Before, the refused start had recorded its layout,
    and the retry with other SHARDS was refused for the ids of a run that never was."""
    with socket.socket() as listener:
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        busy = dataclasses.replace(Settings.from_env({"SHARDS": "2"}), data_dir=tmp_path,
                                   port=int(listener.getsockname()[1]))
        with pytest.raises(LaunchError, match="already in use"):
            Platform(busy, host="127.0.0.1", durable=True).start()
    assert not (tmp_path / "layout.json").exists()
    check_layout(dataclasses.replace(busy, shards={}), record=False)  # another SHARDS: fine


@pytest.mark.parametrize(("command", "said"), [("feed", "shardex feed"),
                                               ("up", "shardex: configuration error")])
def test_a_replay_without_a_price_is_a_setting_refused_before_anything_starts(
        command: str, said: str, tmp_path: Path) -> None:
    """Exit 2, for `up` as for `shardex feed`: `up` called it a start refused, exit 1."""
    recording = tmp_path / "empty.jsonl"
    recording.write_text('{"id":null,"error":{"code":400,"message":"Invalid"}}\n')
    done, took_s = _cli(command, env=_env(tmp_path, FEED_SOURCE=f"replay:{recording}",
                                          KAFKA_BROKERS=f"127.0.0.1:{free_port()}"))
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1] == (
        f"{said}: replay: {recording} holds no valid bookTicker frame of SOL,BTC,ETH"), \
        done.stderr
    assert "Traceback" not in done.stderr and took_s < 30, (took_s, done.stderr)
    assert not (tmp_path / "ray-address.json").exists()


@pytest.mark.parametrize(("replicas", "above"), [(1, 0), (2, 0), (2, 2), (2, 5)])
def test_an_api_port_the_embedded_broker_listens_on_is_refused_before_anything_starts(
        replicas: int, above: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """PORT (or, behind the front door, a port of the replicas or of the door's listeners
    above it) on the embedded broker's port: the broker took it first and the API could not
    listen there; the start ended in a traceback from Serve after Ray had started."""
    def no_broker(_self: Platform) -> None:
        raise AssertionError("the broker started")

    monkeypatch.setattr(Platform, "_start_broker", no_broker)
    port = free_ports(replicas + 4)
    settings = dataclasses.replace(Settings(), data_dir=tmp_path, port=port,
                                   api_replicas=replicas)
    with pytest.raises(LaunchError) as refused:
        Platform(settings, broker_port=port + above, durable=True).start()
    assert str(refused.value).startswith(
        f"the embedded broker's port {port + above} is one the API listens on"), refused.value
    assert "--broker-port" in str(refused.value) and "PORT" in str(refused.value)
    assert not (tmp_path / "layout.json").exists()


@pytest.mark.parametrize(("variable", "replicas", "max_replicas"),
                         [("API_REPLICAS", 2, 0), ("API_MAX_REPLICAS", 1, 3)])
def test_a_front_door_joined_from_a_node_that_is_not_the_head_is_refused(
        variable: str, replicas: int, max_replicas: int) -> None:
    """Serve runs HAProxy on the head node only, the replicas on the node ``up`` runs on: from
    a worker nothing answered PORT there, and the start ended when it gave up waiting for it
    (two minutes), after it had removed a killed run's API from the cluster. One replica (no
    HAProxy) starts from any node."""
    from cluster.actors.launcher import front_door_off_the_head

    nodes = [{"NodeID": "head", "Alive": True, "Resources": {"node:__internal_head__": 1.0}},
             {"NodeID": "worker", "Alive": True, "Resources": {"CPU": 1.0}}]
    settings = dataclasses.replace(Settings(), ray_address="auto", api_replicas=replicas,
                                   api_max_replicas=max_replicas)
    fault = front_door_off_the_head(settings, nodes, "worker")
    assert fault is not None and fault.startswith(
        f"{variable}={max(replicas, max_replicas)} puts HAProxy on PORT, which Serve runs on "
        "the head node"), fault
    assert front_door_off_the_head(settings, nodes, "head") is None
    one = dataclasses.replace(settings, api_replicas=1, api_max_replicas=0)
    assert front_door_off_the_head(one, nodes, "worker") is None


def test_the_embedded_broker_is_refused_for_a_cluster_of_several_machines() -> None:
    """It listens on 127.0.0.1 of the machine ``up`` runs on: a ledger or feed actor that Ray
    places on another machine could not reach it (account events lost without a sign). Nodes
    on one machine (``ray.cluster_utils.Cluster``) share its address and are let through."""
    from cluster.actors.launcher import embedded_broker_off_this_machine

    def node(node_id: str, address: str, alive: bool = True) -> dict[str, object]:
        return {"NodeID": node_id, "Alive": alive, "NodeManagerAddress": address}

    machines = [node("a", "10.0.0.1"), node("b", "10.0.0.2"), node("c", "10.0.0.3", False)]
    fault = embedded_broker_off_this_machine(machines, "a")
    assert fault is not None and fault.startswith("KAFKA_BROKERS is unset: the embedded broker "
                                                  "listens on 127.0.0.1 of this machine "
                                                  "(10.0.0.1)"), fault
    assert "(10.0.0.2); set KAFKA_BROKERS" in fault  # a dead node's machine is not named
    one_machine = [node("a", "127.0.0.1"), node("b", "127.0.0.1"), node("c", "127.0.0.1")]
    assert embedded_broker_off_this_machine(one_machine, "b") is None


def _died_in_its_constructor(error: Exception) -> Callable[[], Exception]:
    """What ``ray.get`` raises for a host whose constructor failed with ``error`` (Ray does not
    restart it): the message holds the constructor's whole traceback."""

    def died() -> Exception:
        from ray.exceptions import ActorDiedError
        from ray.exceptions import RayTaskError

        try:
            raise error
        except Exception as exc:
            import traceback

            return ActorDiedError(RayTaskError("ledger:MachineHost.__init__",
                                               traceback.format_exc(), exc, pid=1,
                                               ip="127.0.0.1"))

    return died


@pytest.mark.parametrize(("failure", "line"), [
    (_died_in_its_constructor(NotADirectoryError(20, "Not a directory", "/data/ledger/journal")),
     "NotADirectoryError: [Errno 20] Not a directory: '/data/ledger/journal'"),
    # the platform's own exception by its name, as a builtin's, not its module's path
    (_died_in_its_constructor(JournalDamagedError("00000000000000000008.wal: a damaged record "
                                                  "at byte 3300, valid ones after it")),
     "JournalDamagedError: 00000000000000000008.wal: a damaged record at byte 3300, valid ones "
     "after it"),
    (lambda: RuntimeError("Deploying application shardex failed: Failed to update the "
                          "deployments ['api']."),
     "Deploying application shardex failed: Failed to update the deployments ['api']."),
    (lambda: BooksDisagree([AuditDifference("user:2:margin", "user 2 has open positions but "
                                            "no account")]),
     "the ledger's and the shards' books differ after recovery (user 2 has open positions but "
     "no account), which no crash leaves: a journal lacks records the others hold (damaged, or "
     "the hosts' directories restored from different moments); refused rather than trade on "
     "them: restore DATA_DIR whole from one backup (`shardex audit --offline` lists the "
     "differences)"),
], ids=["host", "journal", "serve", "books"])
def test_a_start_that_fails_inside_ray_is_one_line_not_a_traceback(
        failure: Callable[[], Exception], line: str, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A host that cannot open its journal (a damaged or unwritable DATA_DIR), an API that
    Serve could not deploy: `up` printed Ray's traceback (the host's own inside it)."""
    from cluster.actors import launcher

    def fail(_self: Platform) -> Platform:
        raise failure()

    monkeypatch.setattr(Platform, "start", fail)
    settings = dataclasses.replace(Settings(), data_dir=tmp_path, port=free_port())
    assert launcher.up(settings, with_feed=False) == 1
    assert capsys.readouterr().err == f"shardex: cannot start: {line}\n"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="RLIMIT_FSIZE semantics")
def test_a_layout_the_disk_could_not_take_does_not_refuse_the_next_start(tmp_path: Path) -> None:
    """The first start's layout write fails (a full disk: here a file size limit of 0): the
    next start records it. The failed write had left an empty layout.json, which refused
    every later start ("cannot read ...layout.json") until removed by hand."""
    code = ("import dataclasses, pathlib, resource, signal, sys; "
            "signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (0, 0)); "
            "from cluster.actors.launcher import check_layout; "
            "from cluster.config import Settings; "
            "check_layout(dataclasses.replace(Settings(), data_dir=pathlib.Path(sys.argv[1])), "
            "record=True)")
    full = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=60)
    assert full.returncode != 0 and "File too large" in full.stderr, full.stderr
    settings = dataclasses.replace(Settings(), data_dir=tmp_path)
    check_layout(settings, record=True)
    check_layout(dataclasses.replace(settings, shards={}))
    with pytest.raises(LaunchError, match="SHARDS=SOL=1,BTC=1,ETH=1"):
        check_layout(dataclasses.replace(settings, shards={"SOL": 2}))


def test_a_data_dir_the_start_cannot_write_is_refused_naming_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Its first write (the layout) fails: the refusal names DATA_DIR, not only the errno of
    a path ("No such file or directory" for the directory it was about to make)."""
    import cluster.durability.journal as journal

    def refused(directory: object) -> None:
        raise PermissionError(13, "Permission denied", str(directory))

    monkeypatch.setattr(journal, "create_directory", refused)
    settings = dataclasses.replace(Settings(), data_dir=tmp_path / "data")
    with pytest.raises(LaunchError, match=f"^cannot write to DATA_DIR={tmp_path / 'data'}: "
                                          "Permission denied$"):
        check_layout(settings, record=True)


def test_a_live_audit_a_host_does_not_answer_is_one_line_and_not_a_difference(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """A host Ray is restarting (or that died) answers the audit with Unavailable, the port's
    one error for Ray's failures: `audit` printed a traceback and exited 1, the code of a
    difference found, where a platform that does not answer exits 2."""
    from cluster.actors import deploy
    from cluster.actors import launcher
    from cluster.actors.port import Unavailable

    class Service:
        async def audit(self) -> None:
            raise Unavailable("shard-SOL-0", "ActorUnavailableError")

    monkeypatch.setattr(deploy, "service_from_names", lambda *_a, **_k: Service())
    assert launcher._audit_live(Settings(), as_json=True) == 2
    out = capsys.readouterr()
    assert out.err == ("shardex audit: the platform does not answer: shard-SOL-0 is "
                       "unavailable: ActorUnavailableError\n") and out.out == ""


def test_a_start_that_failed_before_its_api_stops_no_api(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
        ) -> None:
    """A start whose hosts failed (on a Ray it was already connected to, here a stand-in):
    its stop warned that the API's replicas did not close their WebSockets, of an API that
    was never deployed. It stops what did start (Serve on that cluster), quietly."""
    import ray
    from cluster.actors import serve_app

    def hosts_fail(_self: Platform, _phase: object) -> None:
        raise RuntimeError("test: a host failed")

    def never(*_a: object, **_k: object) -> object:
        raise AssertionError("called")

    shut: list[bool] = []
    asked: list[bool] = []

    def stop_api(*_a: object) -> bool:  # the real one, with no app, warns about WebSockets
        asked.append(True)
        return True

    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(serve_app, "export_serve_env", lambda *_a, **_k: {})
    monkeypatch.setattr(serve_app, "start_serve", lambda *_a, **_k: {})
    monkeypatch.setattr(serve_app, "stop_api", stop_api)
    monkeypatch.setattr(serve_app, "deploy_api", never)
    monkeypatch.setattr(serve_app, "shutdown_api", lambda: shut.append(True))
    monkeypatch.setattr(Platform, "_ensure_topic", lambda *_a: asyncio.sleep(0))
    monkeypatch.setattr(Platform, "_start_actors", hosts_fail)
    settings = dataclasses.replace(Settings(), data_dir=tmp_path, port=free_port())
    platform = Platform(settings, with_feed=False, bootstrap="127.0.0.1:9")
    with caplog.at_level(logging.WARNING), pytest.raises(RuntimeError, match="a host failed"):
        platform.start()
    assert asked == [] and shut == [True]  # no API to stop; Serve, which it had started
    assert caplog.records == [], caplog.text


def test_an_embedded_broker_another_running_process_owns_is_refused_naming_it(
        tmp_path: Path) -> None:
    """A ``shardex feed`` started first records its broker in DATA_DIR: ``engine`` (or
    ``up``), started next, refuses it naming that process and the order that works, instead
    of a broker of its own on another port that the feed would never produce into."""
    owner = subprocess.Popen(["sleep", "60"])
    try:
        deadline = time.monotonic() + 10.0
        # until it runs sleep: just after the fork it is still a copy of this process
        while (me := ProcessIdentity.of(owner.pid)) is None or me.cmdline != ("sleep", "60"):
            assert time.monotonic() < deadline, me
            time.sleep(0.01)
        (tmp_path / "embedded-broker.json").write_text(json.dumps(
            {"bootstrap": "127.0.0.1:9", "broker": me.to_json(), "owner": me.to_json()}))
        settings = dataclasses.replace(Settings(), data_dir=tmp_path, port=free_port())
        with pytest.raises(LaunchError) as refused:
            Platform(settings, with_feed=False, broker_port=free_port()).start()
    finally:
        owner.kill()
        owner.wait()
    message = str(refused.value)
    assert f"(pid {owner.pid}: sleep 60)" in message, message
    assert "a `shardex feed` started after the platform" in message, message


def test_a_broker_port_another_program_listens_on_names_the_option_that_moves_it(
        tmp_path: Path) -> None:
    """A second platform on the machine (another DATA_DIR and PORT) finds the first one's
    broker on the default port: the refusal names ``--broker-port``, the one setting that
    lets both run; it said only to set KAFKA_BROKERS or free the port."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        taken = int(listener.getsockname()[1])
        settings = dataclasses.replace(Settings(), data_dir=tmp_path, port=free_port())
        with pytest.raises(LaunchError) as refused:
            Platform(settings, with_feed=False, broker_port=taken, durable=True).start()
    message = str(refused.value)
    assert f"127.0.0.1:{taken} is already in use" in message, message
    assert "--broker-port" in message, message
    assert not (tmp_path / "ray-address.json").exists()
    # nor a layout: a retry (with the port moved) may use other SHARDS
    assert not (tmp_path / "layout.json").exists()


def test_a_broker_restart_the_disk_refuses_is_tried_again_next_round(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The supervisor starts a dead embedded broker again each round. A restart that failed
    on DATA_DIR's disk (its log's directory could not be made: a full or failing disk, a
    DATA_DIR removed) raised OSError out of the round and ended the supervisor's thread: the
    broker was never started again, nor the feed actor pinged, until `up` was restarted."""
    from feed.broker import EmbeddedBroker

    blocked = tmp_path / "not-a-directory"
    blocked.write_text("")
    broker = EmbeddedBroker(port=free_port(), binary="/bin/true",
                            log_path=blocked / "embedded-broker.log", trim={})
    platform = _platform(tmp_path)
    platform._broker = broker  # as a start leaves it; its process has ended (never ran)
    with caplog.at_level(logging.WARNING):
        platform._revive_broker()
    assert "cannot start the embedded broker again yet" in caplog.text, caplog.text
    broker.log_path = tmp_path / "embedded-broker.log"  # the disk takes writes again
    platform._revive_broker()  # the next round tries again (this binary exits at once)
    assert broker.log_path.exists() and not broker.running


def test_a_recorded_pid_another_user_runs_is_running() -> None:
    """``os.kill(pid, 0)`` on another user's process raises PermissionError: it runs (a
    status, audit or start that read such a pid ended in a traceback)."""
    def check() -> bool:
        return _pid_running(1)  # init: root's

    if os.geteuid() != 0:
        assert check()
        return
    child = os.fork()
    if child == 0:  # as nobody, where init is another user's
        try:
            os.setgid(65534)
            os.setuid(65534)
            os._exit(0 if check() else 1)
        finally:
            os._exit(2)
    assert os.waitstatus_to_exitcode(os.waitpid(child, 0)[1]) == 0


def test_status_says_when_the_feed_reads_no_partition_and_fails() -> None:
    """``status`` of a feed actor with no partition of the market topic assigned (the broker
    does not answer, the topic is gone): a line says no price comes in, and the exit is 1;
    before, only the stale ages showed it and ``status`` exited 0."""
    stats = {"assigned": False, "lag": None, "bootstrap": "127.0.0.1:9092",
             "dropped": {}, "tick_age_s": {"SOL": 42.0},
             "prices": {"SOL": {"bid": "100.00", "ask": "100.01", "source": "sim"}}}
    lines, reading = feed_status(stats, "abcdef0123456789", MARKET_TOPIC)
    assert not reading
    assert lines[1] == f"  no partition of {MARKET_TOPIC} is read: no price comes in"
    assert lines[0].startswith("feed: node abcdef012345 assigned=False")
    assert lines[-1] == "  SOL   bid 100.00 ask 100.01 age 42.0s source sim"
    lines, reading = feed_status({**stats, "assigned": True}, "abcdef0123456789", MARKET_TOPIC)
    assert reading and not any("no partition" in line for line in lines)


def test_status_names_stale_prices_and_fails() -> None:
    """A feed that reads its topic with nothing coming (`shardex feed` stopped beside an
    `engine`, a replay of one asset): ``status`` showed the ages and exited 0 while every
    open and close of those assets was refused."""
    ages = {"SOL": 3.0, "BTC": 15.5}
    assert stale_prices(ages, ["SOL", "BTC", "ETH"], 15.0) == (
        "  stale prices: BTC (15.5s), ETH (no price): older than MAX_PRICE_AGE_S=15s, opens "
        "and closes of them are refused")
    assert stale_prices(ages, ["SOL", "BTC"], 15.5) is None  # at the bound: still taken
    assert stale_prices({"SOL": None}, ["SOL"], 15.0) == (
        "  stale prices: SOL (no price): older than MAX_PRICE_AGE_S=15s, opens and closes "
        "of them are refused")


def test_status_names_the_api_replicas_by_state_and_fails_with_none_running() -> None:
    """``status``'s API line: the app's state and its replicas by state; the exit is 1 when no
    replica runs (none answers a request) or Serve has no API app, 0 while one of two is
    being replaced."""
    assert api_status(("RUNNING", {"RUNNING": 1})) == ("api: running, replicas running=1", True)
    assert api_status(("UNHEALTHY", {"STARTING": 1})) == (
        "api: unhealthy, replicas starting=1", False)
    assert api_status(("DEPLOYING", {"STARTING": 1, "RUNNING": 1})) == (
        "api: deploying, replicas running=1 starting=1", True)
    assert api_status(("DEPLOYING", {})) == ("api: deploying, replicas none", False)
    assert api_status(None) == ("api: not deployed", False)


def test_a_simulation_continues_from_the_newest_price_of_an_asset_split_over_shards() -> None:
    """SHARDS=SOL=3, split 0 missed the last SOL tick (down, or its journal's tail lost): the
    sim continues SOL from the tick splits 1 and 2 hold, not from split 0's older one (a jump
    back on the other splits); an asset no shard has a price of is left to the walk."""
    p = build_platform(Settings(shards={"SOL": 3}))
    try:
        older = Tick("SOL", 10_000, 10_001, 1_000, 1, "test")
        newer = Tick("SOL", 10_500, 10_501, 2_000, 2, "test")
        for name, port in p.shards.items():
            if name.startswith("shard-SOL-"):
                ticks = [older] if name == "shard-SOL-0" else [older, newer]
                port.execute_blocking([ApplyTick(t) for t in ticks])
        last = [p.shards[spec.name].execute_blocking([LastTick()])[0]
                for spec in p.hosts.layout.shards]
        assert last[0] == older and newer in last
        assert newest_tops(last) == {"SOL": (10_500, 10_501)}
    finally:
        p.hosts.close()


def test_the_sim_fallback_of_auto_continues_from_the_shards_last_prices() -> None:
    """FEED_SOURCE=auto (the default) on a machine that cannot reach Backpack runs the sim
    source: it continues from the shards' last prices, as FEED_SOURCE=sim does. Before, only
    an explicit sim did; auto's fallback restarted every asset at the walk's start (SOL
    140.00), a jump no market made, on every restart of an offline platform."""
    settings = Settings()
    source = make_source(settings, "auto")
    assert isinstance(source, AutoSource)
    sol = settings.assets["SOL"]
    last = Tick("SOL", sol.price_to_ticks("181.20"), sol.price_to_ticks("181.22"), 1_000, 1,
                "sim")
    suffix = resume_simulation(source, [last, None])
    assert suffix == " (its sim fallback continuing from SOL 181.21)"
    bid, ask = source.fallback.walk.next(sol)
    assert abs(bid - last.bid_ticks) < 100, (bid, ask)  # within a dollar, not back at 140


def test_a_data_dir_without_its_layout_given_a_split_more_is_refused(tmp_path: Path) -> None:
    """No layout.json, and SHARDS splits an asset in more shards than its directories show: the
    start is refused naming the shard it lacks, and writes nothing. It recorded the new layout,
    in which the shards after the new one have other book tags, and then failed to recover
    such a shard with positions (a RecoveryError: its ids carry the old tag); every later
    start with the layout DATA_DIR was made with was refused as not the one recorded."""
    made = asyncio.run(_positions_on_two_splits(tmp_path))
    three = dataclasses.replace(made, shards={"SOL": 3})
    with pytest.raises(LaunchError, match="no shard-SOL-2") as refused:
        check_layout(three, record=True)
    assert "SHARDS=SOL=2,BTC=1,ETH=1" in str(refused.value), refused.value
    assert not (tmp_path / "layout.json").exists()
    check_layout(made, record=True)
    check_layout(made)


def test_a_broker_that_cannot_be_reached_is_waited_for_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An unreachable KAFKA_BROKERS took 30 s and about 150 lines of aiokafka's errors, one
    per connection refused, before the line that names it: one warning now says what the
    start waits for, and the refusal follows it."""
    from cluster.actors import launcher

    monkeypatch.setattr(launcher, "TOPIC_WAIT_S", 3.0)
    monkeypatch.setattr(launcher, "TOPIC_QUIET_S", 0.5)
    aiokafka_level = logging.getLogger("aiokafka").level
    platform = Platform(dataclasses.replace(Settings(), data_dir=tmp_path))
    with caplog.at_level(logging.INFO), pytest.raises(
            LaunchError, match=r"^cannot create topic backpack-market-updates on 127\.0\.0\.1:1: "):
        asyncio.run(platform._ensure_topic("127.0.0.1:1"))
    assert [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")] == []
    said = "waiting up to 3 s for the Kafka broker at 127.0.0.1:1: "
    waits = [r.getMessage() for r in caplog.records if r.getMessage().startswith(said)]
    assert len(waits) == 1, caplog.text
    assert logging.getLogger("aiokafka").level == aiokafka_level  # its errors log again after
