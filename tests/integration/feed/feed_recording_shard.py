"""A stand-in shard actor for the feed tests and benchmark: records the ticks it is given
(``apply_ticks(ticks)``, or ``execute(commands)`` of ApplyTick commands, plain or pickled as
the feed actor's port sends them)."""

from __future__ import annotations

import sys
import threading
import time
from typing import Any

import ray
from cluster.actors.host import MachineHost
from engine.market import Tick
from engine.shard_machine import ApplyTick
from engine.shard_machine import Outbox
from engine.shard_machine import OutboxView


class _RecordingShard:
    """Records every call: receive time (us), the ticks; sleeps ``delay_s`` per
    call and tracks the most calls ever running at once (threaded actor, so the feed actor's
    in-flight bound is what limits concurrency)."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.calls: list[tuple[int, list[Tick]]] = []
        self._lock = threading.Lock()
        self._running = 0
        self.max_running = 0

    def execute(self, commands: list[Any]) -> list[Any]:
        """The shard host's batched call: records the ``tick`` of each ApplyTick command and
        answers 0 closes per tick (and an empty outbox to an Outbox read)."""
        self.apply_ticks([c.tick for c in commands if isinstance(c, ApplyTick)])
        return [OutboxView([], 0) if isinstance(c, Outbox) else 0 for c in commands]

    # the host's pickled form of execute, as the feed actor's port calls it (it only needs
    # ``self.execute``)
    execute_pickled = MachineHost.execute_pickled

    def apply_ticks(self, ticks: list[Tick]) -> int:
        now_us = time.time_ns() // 1000
        with self._lock:
            self._running += 1
            self.max_running = max(self.max_running, self._running)
            self.calls.append((now_us, list(ticks)))
        if self.delay_s:
            time.sleep(self.delay_s)
        with self._lock:
            self._running -= 1
        return len(ticks)

    def received(self) -> list[tuple[int, list[Tick]]]:
        with self._lock:
            return list(self.calls)

    def max_concurrent(self) -> int:
        return self.max_running


# Ray workers cannot import test modules: ship this module's classes by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])

_ray_remote: Any = ray.remote
RecordingShard: Any = _ray_remote(num_cpus=0, max_concurrency=8)(_RecordingShard)
