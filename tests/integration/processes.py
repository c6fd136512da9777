"""The processes a test started, found by their parentage (Linux ``/proc``)."""

from __future__ import annotations

import ipaddress
import os
import signal
import subprocess
import sys
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


def ray_processes(environ_entry: str) -> set[ProcessIdentity]:
    """Every live process of a Ray on this machine, its own (GCS, raylet, dashboard, monitors)
    and its workers and agents (``ray::...``), whose environment holds ``environ_entry``
    (``NAME=value``): a Ray started by a process with that entry passes it to every process
    it starts, and a Ray another test runs beside this one on the machine does not have it."""
    found: set[ProcessIdentity] = set()
    entry_bytes = environ_entry.encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        identity = ProcessIdentity.of(int(entry.name))
        if identity is None or not identity.cmdline:
            continue
        program = identity.cmdline[0]
        if not (program.startswith("ray::") or Path(program).name in ("gcs_server", "raylet")
                or any("/site-packages/ray/" in arg for arg in identity.cmdline[:3])):
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone since
            continue
        if entry_bytes in environ:
            found.add(identity)
    return found


def listening_addresses(pids: list[int]) -> dict[tuple[str, int], int]:
    """The address and port of every TCP socket of ``pids`` listening, each with a pid that
    holds it (Linux: the sockets' inodes in ``/proc/<pid>/fd``, their rows in
    ``/proc/net/tcp`` and ``tcp6``, state 0A)."""
    owner: dict[str, int] = {}
    for pid in pids:
        try:
            fds = list(Path(f"/proc/{pid}/fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                target = os.readlink(fd)
            except OSError:
                continue
            if target.startswith("socket:["):
                owner[target[8:-1]] = pid
    found: dict[tuple[str, int], int] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:  # (no IPv6 in this kernel)
            continue
        for row in rows:
            fields = row.split()
            local, state, inode = fields[1], fields[3], fields[9]
            if state != "0A" or inode not in owner:
                continue
            hex_address, hex_port = local.split(":")
            raw = bytes.fromhex(hex_address)
            # the kernel prints each 32-bit word of the address in host order
            packed = raw if sys.byteorder == "big" \
                else b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
            found[(str(ipaddress.ip_address(packed)), int(hex_port, 16))] = owner[inode]
    return found


def loopback(address: str) -> bool:
    """Whether ``address`` is a loopback one (an IPv4-mapped IPv6 one too)."""
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)
    return (mapped or ip).is_loopback
