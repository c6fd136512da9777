"""The processes a test started, found by their parentage (Linux ``/proc``)."""

from __future__ import annotations

from pathlib import Path

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
