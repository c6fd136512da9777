"""The processes a test started, found by their parentage (Linux ``/proc``)."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

from feed.broker import ProcessIdentity


def descendants(pid: int) -> list[ProcessIdentity]:
    """Every live process below ``pid`` (``/proc/<pid>/task/*/children``)."""
    found: list[ProcessIdentity] = []
    todo = [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = (task / "children").read_text().split()
            except OSError:
                continue
            for child in map(int, children):
                identity = ProcessIdentity.of(child)
                if identity is not None and identity not in found:
                    found.append(identity)
                    todo.append(child)
    return found


def stop_child(proc: subprocess.Popen[Any], sig: int = signal.SIGTERM,
               wait_s: float = 10.0) -> None:
    """Stop a child this test started: ``sig``, then SIGKILL if it is still there after
    ``wait_s`` seconds; returns once it has exited."""
    proc.send_signal(sig)
    try:
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def ray_processes() -> set[ProcessIdentity]:
    """Every live process of a Ray on this machine: its own (GCS, raylet, dashboard, monitors)
    and its workers and agents (``ray::...``)."""
    found: set[ProcessIdentity] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        identity = ProcessIdentity.of(int(entry.name))
        if identity is None or not identity.cmdline:
            continue
        program = identity.cmdline[0]
        if program.startswith("ray::") or Path(program).name in ("gcs_server", "raylet") \
                or any("/site-packages/ray/" in arg for arg in identity.cmdline[:3]):
            found.add(identity)
    return found
