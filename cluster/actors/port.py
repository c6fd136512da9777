"""Port: how the service reaches a hosted state machine, in this process or through Ray.

One interface, two implementations, no method per operation:

* ``await port.call(command)`` -> the answer. Concurrent calls are coalesced into one
  ``execute(commands)`` per event-loop turn (cluster.trading.batcher.MicroBatcher), so N
  requests cost one actor round trip, and at most :data:`BATCHES_IN_FLIGHT` batches are under
  way at once. A command whose ``decide`` raised answers :class:`CommandFailed`.
* ``port.listen(listener)``: ``listener(answered)`` after every batch, True when the host
  answered it, False when it raised :class:`Unavailable` (the service steers new positions
  away from a split that does not answer).
* ``port.post(command)``: no call of its own; ``command`` rides at the head of the next batch
  that goes to the host anyway, and its answer is dropped (an outbox acknowledgement, whose
  loss only means a resend the ledger ignores).
* :class:`LocalPort` runs a :class:`cluster.durability.runner.Runner` on one worker thread
  (calls run one at a time, like an actor, and numpy work stays off the event loop).
* :class:`RayPort` wraps a :class:`cluster.actors.host.MachineHost` handle. Every Ray call of
  the service is here, and Ray's failures become one :class:`Unavailable`. A batch travels
  pickled (``MachineHost.execute_pickled``).
"""

from __future__ import annotations

import asyncio
import pickle
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from cluster.actors.host import HostClosed
from cluster.durability.runner import Failed, Runner
from cluster.trading.batcher import MicroBatcher

# A host runs one batch at a time and commits each on its own (one fdatasync). Two under way
# keep it busy back to back (one running, the next already there) while every later call
# waits here and joins one batch: the slower the commits, the larger the batches, and the
# fewer the commits per request. More in flight would only queue small batches at the host,
# one commit each.
BATCHES_IN_FLIGHT = 2


class Unavailable(Exception):
    """A component (the ledger or a shard) did not answer; the outcome of the call is unknown."""

    def __init__(self, component: str, detail: str = "", *, message: str = "") -> None:
        super().__init__(message or f"{component} is unavailable"
                         + (f": {detail}" if detail else ""))
        self.component = component


class CommandFailed(RuntimeError):
    """The machine refused to run a command because of a bug (nothing was changed)."""


class Port:
    """Base of both ports: batching and answer checking; ``execute`` is the transport."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.batcher: MicroBatcher[Any, Any] = MicroBatcher(self.send,
                                                            max_in_flight=BATCHES_IN_FLIGHT)
        self._riders: dict[type, Any] = {}
        self._listeners: list[Callable[[bool], None]] = []

    async def call(self, command: Any) -> Any:
        """The answer to ``command`` (batched with concurrent calls)."""
        return _checked(await self.batcher.submit(command))

    async def call_many(self, commands: Sequence[Any]) -> list[Any]:
        """The answers to ``commands``, sent together in one batch (in order)."""
        return [_checked(a) for a in await self.send(list(commands))]

    def listen(self, listener: Callable[[bool], None]) -> None:
        """Call ``listener(answered)`` after every batch (calls, posts and ``call_many``; not
        ``ping``): True when the host answered, False when the batch raised Unavailable."""
        self._listeners.append(listener)

    def post(self, command: Any) -> None:
        """Send ``command`` with the next batch that goes to the host, ahead of that batch's
        commands; its answer is dropped. A later command of the same type replaces it. Only
        for commands whose loss is harmless: nothing says whether or when it arrives."""
        self._riders[type(command)] = command

    async def send(self, commands: list[Any]) -> list[Any]:
        """``execute(commands)`` with the posted commands ahead of them; the answers to
        ``commands`` (a Failed one as it is). Posted commands whose batch failed are posted
        again unless newer ones replaced them."""
        riders = list(self._riders.values())
        self._riders.clear()
        try:
            answers = await self.execute([*riders, *commands] if riders else commands)
        except BaseException as exc:
            for rider in riders:
                self._riders.setdefault(type(rider), rider)
            if isinstance(exc, Unavailable):
                self._tell(False)
            raise
        self._tell(True)
        return answers[len(riders):] if riders else answers

    def _tell(self, answered: bool) -> None:
        for listener in self._listeners:
            listener(answered)

    async def execute(self, commands: list[Any]) -> list[Any]:
        raise NotImplementedError

    async def ping(self) -> bool | str:
        """True when the host answers and can take writes; else why not (text)."""
        raise NotImplementedError


def _checked(answer: Any) -> Any:
    if isinstance(answer, Failed):
        raise CommandFailed(answer.error)
    return answer


class LocalPort(Port):
    """A runner in this process, on its own worker thread."""

    def __init__(self, name: str, runner: Runner[Any]) -> None:
        super().__init__(name)
        self.runner = runner
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def execute(self, commands: list[Any]) -> list[Any]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self.runner.execute, commands)

    def execute_blocking(self, commands: Sequence[Any]) -> list[Any]:
        """``execute`` from a thread that runs no event loop (tests, fixtures, benchmarks)."""
        answers = self._executor.submit(self.runner.execute, list(commands)).result()
        return [_checked(a) for a in answers]

    async def ping(self) -> bool | str:
        return self.runner.problem() or True

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class RayPort(Port):
    """A MachineHost actor; ``timeout_s`` bounds every call (None = wait forever)."""

    def __init__(self, name: str, handle: Any, timeout_s: float | None = 30.0) -> None:
        super().__init__(name)
        self.handle = handle
        self.timeout_s = timeout_s

    async def execute(self, commands: list[Any]) -> list[Any]:
        payload = pickle.dumps(commands, protocol=pickle.HIGHEST_PROTOCOL)
        answers: bytes = await remote(self.name, self.handle.execute_pickled, self.timeout_s,
                                      payload)
        return pickle.loads(answers)

    async def ping(self) -> bool | str:
        return await remote(self.name, self.handle.ping, 5.0)

    async def info(self) -> dict[str, Any]:
        return await remote(self.name, self.handle.info, 5.0)


async def remote(component: str, method: Any, timeout_s: float | None, *args: Any) -> Any:
    """``method.remote(*args)`` (an actor method) awaited; Ray's failures become
    ``Unavailable(component)``, as does a host's refusal after its close (HostClosed); an
    exception the host's own code raised (a bug: RayTaskError) stays what it is. The call is
    made in here too: Ray refuses some as they are made (a batch over its inline size is stored
    as an object first, which a full object store or spill disk fails)."""
    import ray.exceptions

    try:
        return await asyncio.wait_for(method.remote(*args), timeout_s)
    except ray.exceptions.RayTaskError as exc:
        # a host a clean stop closed refuses what still comes (an API past its stop bound, its
        # reconciler): the command never ran, as with a host that is down
        if isinstance(exc.cause, HostClosed):
            raise Unavailable(component, "closed") from exc
        raise
    except (ray.exceptions.RayError, TimeoutError) as exc:
        # every other RayError: Ray fails the calls of a host it killed for memory with
        # OutOfMemoryError, of one it cannot place again with ActorUnschedulableError, ...; a
        # caller that expects only Unavailable would take such a call for one that never ran
        raise Unavailable(component, type(exc).__name__) from exc
