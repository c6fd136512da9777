"""What a start ends of the local Ray a killed run left (``_end_killed_ray``): the processes
writing to that Ray session's logs, as each of Ray's own does, and nothing else: not a reader
of those logs, not a driver connected to that Ray, not a writer to another session's, not a
session named by a damaged record.
A stop whose own Ray is going ends those too, and those its raylets started
(``_end_ray_processes``)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cluster.actors.launcher import _end_killed_ray
from cluster.actors.launcher import _end_ray_processes

# writes its line, then waits: as a Ray process holds its log open for writing
WRITER = "import sys, time; f = open(sys.argv[1], 'a'); f.write('up\\n'); f.flush(); time.sleep(60)"
# writes a driver's log and an event log beside it, then waits: a program connected to a Ray
DRIVER = ("import os, sys, time; f = open(sys.argv[1], 'a'); "
          "g = open(os.path.join(os.path.dirname(sys.argv[1]), 'event_CORE_WORKER_1.log'), 'a'); "
          "f.write('up\\n'); f.flush(); time.sleep(60)")
# reads the file, then waits with it open: as `tail -f` or `less` does
READER = ("import sys, time; f = open(sys.argv[1]); f.read(); print('read', flush=True); "
          "time.sleep(60)")


@pytest.fixture
def processes() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for process in started:
        process.kill()
        process.wait(10)


def _start(started: list[subprocess.Popen[str]], code: str, path: Path,
           env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    process = subprocess.Popen([sys.executable, "-c", code, str(path)], text=True,
                               stdout=subprocess.PIPE, env=env)
    started.append(process)
    return process


def _session(root: Path, name: str) -> Path:
    (root / name / "logs").mkdir(parents=True)
    return root / name


def _wait_written(path: Path) -> None:
    """Until a process started with WRITER or DRIVER has written its line to ``path``."""
    while not path.exists() or "up" not in path.read_text():
        time.sleep(0.05)


def _wait_exit(process: subprocess.Popen[str]) -> int | None:
    try:
        return process.wait(10)
    except subprocess.TimeoutExpired:
        return None


def test_ends_the_writers_of_the_killed_sessions_logs_and_no_other_process(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    killed = _session(tmp_path, "session_2026-12-07_06-30-32_740164_21773")
    other = _session(tmp_path, "session_2026-12-07_06-31-24_106209_23182")
    log = killed / "logs" / "raylet.out"
    log.write_text("")
    writers = [_start(processes, WRITER, log),
               _start(processes, WRITER, killed / "logs" / "dashboard_agent.log")]
    reader = _start(processes, READER, log)
    elsewhere = _start(processes, WRITER, other / "logs" / "raylet.out")
    # a program connected to that Ray (`shardex status`): its driver's log and an event log
    # of the kind the workers write too
    driver_log = killed / "logs" / "python-core-driver-01000000ffff_4779.log"
    driver = _start(processes, DRIVER, driver_log)
    for path in (log, killed / "logs" / "dashboard_agent.log", other / "logs" / "raylet.out",
                 driver_log):
        _wait_written(path)  # each writer has its file open
    assert reader.stdout is not None and reader.stdout.readline() == "read\n"

    ended = _end_killed_ray(str(killed))

    assert sorted(ended) == sorted(w.pid for w in writers)
    assert [_wait_exit(w) for w in writers] == [-9, -9]
    assert reader.poll() is None and elsewhere.poll() is None and driver.poll() is None


@pytest.mark.parametrize("recorded", [None, 7, "", "relative/session_x",
                                      "/tmp/not-a-session-dir"])
def test_a_record_with_no_usable_session_dir_ends_nothing(
        tmp_path: Path, processes: list[subprocess.Popen[str]], recorded: object) -> None:
    logs = tmp_path / "logs"
    logs.mkdir()
    writer = _start(processes, WRITER, logs / "raylet.out")
    _wait_written(logs / "raylet.out")
    assert _end_killed_ray(recorded) == []
    assert _end_killed_ray(str(tmp_path)) == []  # the directory is not named as Ray names one
    assert writer.poll() is None


def test_a_stop_also_ends_what_its_raylets_started_before_it_wrote_a_log(
        tmp_path: Path, processes: list[subprocess.Popen[str]]) -> None:
    session = _session(tmp_path, "session_2026-12-07_07-40-02_311802_30117")
    elsewhere = tmp_path / "elsewhere.txt"
    raylet_pid = 2**22 + 17  # past any pid_max (2**22 at most): no process's
    elsewhere.write_text("")
    starting = _start(processes, READER, elsewhere,
                      env={**os.environ, "RAY_RAYLET_PID": str(raylet_pid)})
    others = _start(processes, READER, elsewhere,
                    env={**os.environ, "RAY_RAYLET_PID": str(raylet_pid + 1)})
    (session / "logs" / "worker.out").write_text("")
    writer = _start(processes, WRITER, session / "logs" / "worker.out")
    _wait_written(session / "logs" / "worker.out")
    for reader in (starting, others):
        assert reader.stdout is not None and reader.stdout.readline() == "read\n"

    ended = _end_ray_processes(str(session), [raylet_pid])

    assert sorted(ended) == sorted([starting.pid, writer.pid])
    assert [_wait_exit(starting), _wait_exit(writer)] == [-9, -9]
    assert others.poll() is None
