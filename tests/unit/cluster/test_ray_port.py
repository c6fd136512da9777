"""RayPort over a stand-in handle (no Ray started): what a call's failure becomes."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import pytest
import ray.exceptions
from cluster.actors.host import MachineHost
from cluster.actors.host import host_specs
from cluster.actors.port import RayPort
from cluster.actors.port import Unavailable
from cluster.config import Settings
from engine.shard_machine import LastTick
from engine.shard_machine import Stats

pytestmark = pytest.mark.asyncio


class Method:
    """``handle.method.remote(...)``: an awaitable that raises ``error`` (or answers)."""

    def __init__(self, error: BaseException | None = None, answer: Any = None,
                 submit_error: BaseException | None = None) -> None:
        self.error, self.answer, self.submit_error = error, answer, submit_error

    def remote(self, *args: Any) -> Any:
        if self.submit_error is not None:  # Ray refused to submit the call at all
            raise self.submit_error

        async def result() -> Any:
            if self.error is not None:
                raise self.error
            return self.answer
        return result()


class Handle:
    def __init__(self, error: BaseException | None,
                 submit_error: BaseException | None = None) -> None:
        self.execute_pickled = Method(error, pickle.dumps([None]), submit_error)
        self.ping = Method(error, True, submit_error)


# How Ray reports a host that died or cannot run the call: an actor killed by Ray's memory
# monitor fails its calls with OutOfMemoryError, one that cannot be placed again with
# ActorUnschedulableError, a call cut off by its node with NodeDiedError.
RAY_FAILURES = [ray.exceptions.ActorDiedError(), ray.exceptions.OutOfMemoryError("killed"),
                ray.exceptions.ActorUnschedulableError("no node"),
                ray.exceptions.NodeDiedError("node gone"), ray.exceptions.TaskCancelledError(),
                ray.exceptions.LocalRayletDiedError(), ray.exceptions.RuntimeEnvSetupError("env")]


@pytest.mark.parametrize("error", RAY_FAILURES, ids=lambda e: type(e).__name__)
async def test_every_failure_of_ray_reaches_the_caller_as_unavailable(
        error: BaseException) -> None:
    port = RayPort("shard-SOL-0", Handle(error))
    with pytest.raises(Unavailable, match="shard-SOL-0"):
        await port.call(Stats())
    with pytest.raises(Unavailable):
        await port.ping()


# How Ray refuses a call as it is submitted (``.remote()`` raises): a batch over Ray's inline
# size is stored as an object first, which fails on a full object store or spill disk.
SUBMIT_FAILURES = [ray.exceptions.ObjectStoreFullError("full"),
                   ray.exceptions.OutOfDiskError("disk full"),
                   ray.exceptions.PendingCallsLimitExceeded("too many")]


@pytest.mark.parametrize("error", SUBMIT_FAILURES, ids=lambda e: type(e).__name__)
async def test_a_call_ray_refuses_to_submit_is_unavailable_and_told(
        error: BaseException) -> None:
    port = RayPort("shard-SOL-0", Handle(None, submit_error=error))
    heard: list[bool] = []
    port.listen(heard.append)
    with pytest.raises(Unavailable, match="shard-SOL-0"):
        await port.call(Stats())
    assert heard == [False]  # a split passed over by new positions until it answers
    with pytest.raises(Unavailable):
        await port.ping()


async def test_a_host_that_answers_is_answered() -> None:
    port = RayPort("shard-SOL-0", Handle(None))
    assert await port.call(Stats()) is None
    assert await port.ping() is True


async def test_an_exception_the_hosts_own_code_raised_stays_what_it_is() -> None:
    bug = ray.exceptions.RayTaskError("execute_pickled", "Traceback ...", ValueError("bug"))
    port = RayPort("ledger", Handle(bug))
    with pytest.raises(ray.exceptions.RayTaskError):
        await port.call(Stats())


class ClosedHostHandle:
    """A real MachineHost, closed by a clean stop, behind its Ray calls: a refusal comes back
    as Ray delivers an exception the actor raised (a RayTaskError that is also the cause)."""

    def __init__(self, host: Any) -> None:
        self.execute_pickled = Relay(host.execute_pickled)


class Relay:
    def __init__(self, method: Any) -> None:
        self.method = method

    def remote(self, *args: Any) -> Any:
        async def result() -> Any:
            try:
                return self.method(*args)
            except Exception as exc:
                raise ray.exceptions.RayTaskError(
                    "execute_pickled", "Traceback ...", exc).as_instanceof_cause() from None
        return result()


async def test_a_call_to_a_closed_host_is_unavailable(tmp_path: Path) -> None:
    """A host closed by a clean stop refuses what still comes (the API not stopped within its
    bound, its reconciler's next round, a feed call): the caller gets Unavailable, a 503 with
    Retry-After at the API and a later round for the reconciler; it got the RayTaskError of a
    bug, a 500 and a logged traceback."""
    _, shards = host_specs(Settings(), str(tmp_path))
    host = MachineHost(shards["shard-SOL-0"])
    host.close()
    port = RayPort("shard-SOL-0", ClosedHostHandle(host))
    heard: list[bool] = []
    port.listen(heard.append)
    with pytest.raises(Unavailable, match="shard-SOL-0"):
        await port.call(LastTick())
    assert heard == [False]
