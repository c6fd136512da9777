"""Where a request's CPU goes: py-spy samples of the platform's processes, sorted into layers.

``record(pids, duration_s)`` samples each process (``py-spy record --format raw``, 200 Hz, the
threads py-spy finds busy: on the CPU, or in a system call it does not take for a wait, such
as the journal's fdatasync, so "journal" is time, not only CPU). ``split(stacks)`` charges
every sample to the innermost frame of a known layer (:data:`LAYERS`): the journal's writes
and fdatasync, HTTP (uvicorn, Starlette, FastAPI), validation (pydantic, the API's exact JSON
and decimal parsing), JSON encoding, the trading service and its batching, the engine's state
machines, Ray calls (serialisation and the core worker), the asyncio loop itself; a sample in
none of them is "other". Divided by the requests served meanwhile it is CPU per request by
layer.
"""

from __future__ import annotations

import collections
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

RATE_HZ = 200
# layer -> path fragments of its frames ("file.py" or a package path); the first layer whose
# fragment a frame's file contains, looking from the innermost frame outwards, gets the sample
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("journal", ("cluster/durability/journal.py", "cluster/durability/store.py")),
    ("validation", ("pydantic", "cluster/http/json_body.py", "cluster/http/decimals.py",
                    "cluster/http/limits.py")),
    ("json", ("json/encoder.py", "json/decoder.py", "json/__init__.py")),
    ("engine", ("/engine/",)),
    ("service", ("cluster/trading/", "cluster/actors/port.py", "cluster/http/api.py",
                 "cluster/live/")),
    ("http", ("uvicorn/", "starlette/", "fastapi/", "httptools", "h11/")),
    ("ray", ("ray/",)),
    ("asyncio", ("asyncio/",)),
)
# a sample whose innermost frame waits is idle (py-spy reports some waits as active)
_WAITS = ("threading.py", "selectors.py", "Worker.main_loop", "queue.py")


def py_spy() -> str | None:
    """py-spy from this environment (a dev dependency), else from PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(pids: Mapping[str, int], duration_s: float) -> dict[str, list[str]]:
    """``{role: raw py-spy lines}`` of sampling each of ``pids`` (by role) for ``duration_s``
    at once (non-blocking: the processes are not paused)."""
    binary = py_spy()
    if binary is None:
        raise FileNotFoundError("py-spy is not installed")
    with tempfile.TemporaryDirectory(prefix="shardex-spy-") as tmp:
        procs = {role: (subprocess.Popen(
            [binary, "record", "-p", str(pid), "-d", str(max(1, round(duration_s))),
             "-r", str(RATE_HZ), "-f", "raw", "--nonblocking", "-o", f"{tmp}/{role}.txt"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL), Path(tmp) / f"{role}.txt")
            for role, pid in pids.items()}
        out: dict[str, list[str]] = {}
        for role, (proc, path) in procs.items():
            proc.wait(duration_s + 30)
            out[role] = path.read_text().splitlines() if path.exists() else []
        return out


def split(lines: Iterable[str]) -> collections.Counter[str]:
    """Samples by layer, from py-spy's raw lines (``frame;frame;... count``; frames are
    ``function (file:line)``, outermost first)."""
    layers: collections.Counter[str] = collections.Counter()
    for line in lines:
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        if any(w in frames[-1] for w in _WAITS):
            continue
        layers[_layer(frames)] += int(count)
    return layers


def _layer(frames: list[str]) -> str:
    for frame in reversed(frames):
        for layer, fragments in LAYERS:
            if any(f in frame for f in fragments):
                return layer
    return "other"


def per_request_ms(layers: Mapping[str, int], requests: int) -> dict[str, float]:
    """CPU milliseconds per request by layer (``layers`` in samples at RATE_HZ)."""
    if requests <= 0:
        return {}
    return {layer: round(n * 1000 / RATE_HZ / requests, 3)
            for layer, n in sorted(layers.items(), key=lambda kv: -kv[1])}


def listener_pid(port: int, host_hex: str = "0100007F") -> int:
    """The pid of the process listening on ``port`` of 127.0.0.1 (Linux /proc)."""
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "0A" and fields[1] == f"{host_hex}:{port:04X}":  # LISTEN
            inodes.add(f"socket:[{fields[9]}]")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            if any(os.readlink(fd) in inodes for fd in (proc / "fd").iterdir()):
                return int(proc.name)
        except OSError:  # a process that ended, or one of another user
            continue
    raise LookupError(f"nothing listens on 127.0.0.1:{port}")
