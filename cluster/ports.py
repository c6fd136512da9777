"""Ports: how the TradingService reaches the ledger and the shards.

Two implementations of each Protocol:

* ``LocalLedgerPort``/``LocalShardPort`` hold the cores in this process. Each core gets one
  worker thread, which serialises calls (the core is not thread-safe, like an actor) and keeps
  numpy work off the event loop. Used by the unit and e2e tests and by the no-Ray API baseline.
* ``RayLedgerPort``/``RayShardPort`` wrap actor handles. Every Ray call of the service lives
  here: ``await handle.method.remote(...)``, with Ray's failures turned into ``Unavailable``.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol, TypeVar

from cluster.ledger_core import LedgerCore
from engine.messages import (
    ClosedPosition,
    IdemHit,
    IdemKey,
    MarginLock,
    NewAccount,
    OpenPosition,
    Principal,
    SettlementItem,
    ShardClose,
    ShardOpen,
    ShardStats,
)
from cluster.shard_core import ShardCore
from engine.market import Tick
from engine.results import Rejected

T = TypeVar("T")


class Unavailable(Exception):
    """A component (the ledger or a shard) did not answer; the outcome of the call is unknown."""

    def __init__(self, component: str, detail: str = "") -> None:
        super().__init__(f"{component} is unavailable" + (f": {detail}" if detail else ""))
        self.component = component


def now_us() -> int:
    """Wall clock in microseconds since the epoch (the shells' only clock)."""
    return time.time_ns() // 1000


class LedgerPort(Protocol):
    async def create_account(self) -> NewAccount: ...
    async def principals_of_key_hashes(self, key_hashes: Sequence[str]
                                       ) -> list[Principal | None]: ...
    async def balances_many(self, users: Sequence[int]) -> list[tuple[int, int]]: ...
    async def lock_margins(self, items: Sequence[MarginLock]
                           ) -> list[Rejected | IdemHit | None]: ...
    async def release_margins(self, items: Sequence[tuple[int, int]],
                              answers: Sequence[tuple[IdemKey, object]] = ()) -> None: ...
    async def abandon_locks(self, request_ids: Sequence[int]
                            ) -> list[tuple[int, int, int]]: ...
    async def begin(self, keys: Sequence[IdemKey]) -> list[IdemHit | None]: ...
    async def remember(self, answers: Sequence[tuple[IdemKey, object]]) -> None: ...
    async def forget(self, keys: Sequence[IdemKey]) -> None: ...
    async def apply_settlements(self, shard_name: str, items: Sequence[SettlementItem],
                                answers: Sequence[tuple[IdemKey, object]] = ()) -> int: ...
    async def history(self, user: int, limit: int,
                      before: int | None) -> list[ClosedPosition] | Rejected: ...
    async def audit(self, open_margins_by_user: Mapping[int, int],
                    unsettled: Mapping[str, Sequence[SettlementItem]]) -> list[str]: ...
    async def totals(self) -> dict[str, object]: ...
    async def ping(self) -> bool: ...


class ShardPort(Protocol):
    name: str

    async def open_many(self, requests: Sequence[ShardOpen]) -> list[OpenPosition | Rejected]: ...
    async def resolve_opens(self, request_ids: Sequence[int]
                            ) -> list[OpenPosition | Rejected | None]: ...
    async def close_many(self, requests: Sequence[ShardClose]
                         ) -> list[SettlementItem | Rejected]: ...
    async def positions_of_many(self, owners: Sequence[int]) -> list[list[OpenPosition]]: ...
    async def last_tick(self) -> Tick | None: ...
    async def apply_ticks(self, ticks: Sequence[Tick]) -> int: ...
    async def outbox(self) -> list[SettlementItem]: ...
    async def ack_outbox(self, upto_seq: int) -> int: ...
    async def open_margins_by_user(self) -> dict[int, int]: ...
    async def audit_view(self) -> tuple[dict[int, int], list[SettlementItem]]: ...
    async def stats(self) -> ShardStats: ...


# --------------------------------------------------------------------------- in-process
class _Serial:
    """One worker thread per core: calls run one at a time, off the event loop."""

    def __init__(self, name: str) -> None:
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=name)

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self.executor, fn, *args)

    def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run on the core's thread and wait (for code outside the event loop, e.g. a test)."""
        return self.executor.submit(fn, *args).result()

    def shutdown(self) -> None:
        self.executor.shutdown(wait=True)


class LocalLedgerPort:
    """The LedgerPort over a LedgerCore in this process."""

    def __init__(self, core: LedgerCore) -> None:
        self.core = core
        self.serial = _Serial("ledger")

    async def create_account(self) -> NewAccount:
        return await self.serial.run(self.core.create_account)

    async def principals_of_key_hashes(self, key_hashes: Sequence[str]) -> list[Principal | None]:
        return await self.serial.run(self.core.principals_of_key_hashes, key_hashes)

    async def balances_many(self, users: Sequence[int]) -> list[tuple[int, int]]:
        return await self.serial.run(self.core.balances_many, users)

    async def lock_margins(self, items: Sequence[MarginLock]) -> list[Rejected | IdemHit | None]:
        return await self.serial.run(self.core.lock_margins, items)

    async def release_margins(self, items: Sequence[tuple[int, int]],
                              answers: Sequence[tuple[IdemKey, object]] = ()) -> None:
        await self.serial.run(self.core.release_margins, items, answers)

    async def abandon_locks(self, request_ids: Sequence[int]) -> list[tuple[int, int, int]]:
        return await self.serial.run(self.core.abandon_locks, request_ids)

    async def begin(self, keys: Sequence[IdemKey]) -> list[IdemHit | None]:
        return await self.serial.run(self.core.begin, keys)

    async def remember(self, answers: Sequence[tuple[IdemKey, object]]) -> None:
        await self.serial.run(self.core.remember, answers)

    async def forget(self, keys: Sequence[IdemKey]) -> None:
        await self.serial.run(self.core.forget, keys)

    async def apply_settlements(self, shard_name: str, items: Sequence[SettlementItem],
                                answers: Sequence[tuple[IdemKey, object]] = ()) -> int:
        return await self.serial.run(self.core.apply_settlements, shard_name, items, answers)

    async def history(self, user: int, limit: int,
                      before: int | None) -> list[ClosedPosition] | Rejected:
        return await self.serial.run(self.core.history, user, limit, before)

    async def audit(self, open_margins_by_user: Mapping[int, int],
                    unsettled: Mapping[str, Sequence[SettlementItem]]) -> list[str]:
        return await self.serial.run(self.core.audit, open_margins_by_user, unsettled)

    async def totals(self) -> dict[str, object]:
        return await self.serial.run(self.core.totals)

    async def ping(self) -> bool:
        return True


class LocalShardPort:
    """The ShardPort over a ShardCore in this process.

    Like the shard actor, it reads the clock, and after ``apply_ticks`` pushes the outbox to
    ``ledger`` (when given) and acknowledges what the ledger applied.
    """

    def __init__(self, core: ShardCore, ledger: LocalLedgerPort | None = None,
                 clock_us: Callable[[], int] = now_us) -> None:
        self.core = core
        self.name = core.spec.name
        self.ledger = ledger
        self.clock_us = clock_us
        self.serial = _Serial(self.name)

    async def open_many(self, requests: Sequence[ShardOpen]) -> list[OpenPosition | Rejected]:
        return await self.serial.run(self.core.open_many, requests, self.clock_us())

    async def resolve_opens(self, request_ids: Sequence[int]
                            ) -> list[OpenPosition | Rejected | None]:
        return await self.serial.run(self.core.resolve_opens, request_ids)

    async def close_many(self, requests: Sequence[ShardClose]) -> list[SettlementItem | Rejected]:
        return await self.serial.run(self.core.close_many, requests, self.clock_us())

    async def positions_of_many(self, owners: Sequence[int]) -> list[list[OpenPosition]]:
        return await self.serial.run(self.core.positions_of_many, owners)

    async def last_tick(self) -> Tick | None:
        return self.core.last_tick  # one attribute read: atomic, no need for the worker

    async def apply_ticks(self, ticks: Sequence[Tick]) -> int:
        closed = await self.serial.run(self.core.apply_ticks, ticks, self.clock_us())
        if self.ledger is not None:
            items = await self.serial.run(self.core.outbox)
            if items:
                upto = await self.ledger.apply_settlements(self.name, items)
                await self.serial.run(self.core.ack_outbox, upto)
        return closed

    def apply_ticks_blocking(self, ticks: Sequence[Tick]) -> int:
        """``apply_ticks`` from a thread that is not running an event loop (tests, fixtures)."""
        closed = self.serial.run_blocking(self.core.apply_ticks, ticks, self.clock_us())
        if self.ledger is not None:
            items = self.serial.run_blocking(self.core.outbox)
            if items:
                upto = self.ledger.serial.run_blocking(self.ledger.core.apply_settlements,
                                                       self.name, items, ())
                self.serial.run_blocking(self.core.ack_outbox, upto)
        return closed

    async def outbox(self) -> list[SettlementItem]:
        return await self.serial.run(self.core.outbox)

    async def ack_outbox(self, upto_seq: int) -> int:
        return await self.serial.run(self.core.ack_outbox, upto_seq)

    async def open_margins_by_user(self) -> dict[int, int]:
        return await self.serial.run(self.core.open_margins_by_user)

    async def audit_view(self) -> tuple[dict[int, int], list[SettlementItem]]:
        return await self.serial.run(self.core.audit_view)

    async def stats(self) -> ShardStats:
        return await self.serial.run(self.core.stats)


# --------------------------------------------------------------------------- Ray
async def _remote(component: str, ref: Any, timeout_s: float | None) -> Any:
    """Await an ObjectRef; Ray's actor/system failures become ``Unavailable(component)``."""
    import ray.exceptions

    try:
        if timeout_s is None:
            return await ref
        return await asyncio.wait_for(ref, timeout_s)
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError,
            ray.exceptions.ObjectLostError, ray.exceptions.RaySystemError,
            ray.exceptions.WorkerCrashedError, ray.exceptions.GetTimeoutError,
            TimeoutError) as exc:
        raise Unavailable(component, type(exc).__name__) from exc


class RayLedgerPort:
    """The LedgerPort over a LedgerActor handle."""

    def __init__(self, handle: Any, timeout_s: float | None = 30.0) -> None:
        self.handle = handle
        self.timeout_s = timeout_s

    async def _call(self, method: str, *args: Any) -> Any:
        return await _remote("ledger", getattr(self.handle, method).remote(*args), self.timeout_s)

    async def create_account(self) -> NewAccount:
        return await self._call("create_account")

    async def principals_of_key_hashes(self, key_hashes: Sequence[str]) -> list[Principal | None]:
        return await self._call("principals_of_key_hashes", list(key_hashes))

    async def balances_many(self, users: Sequence[int]) -> list[tuple[int, int]]:
        return await self._call("balances_many", list(users))

    async def lock_margins(self, items: Sequence[MarginLock]) -> list[Rejected | IdemHit | None]:
        return await self._call("lock_margins", list(items))

    async def release_margins(self, items: Sequence[tuple[int, int]],
                              answers: Sequence[tuple[IdemKey, object]] = ()) -> None:
        await self._call("release_margins", list(items), list(answers))

    async def abandon_locks(self, request_ids: Sequence[int]) -> list[tuple[int, int, int]]:
        return await self._call("abandon_locks", list(request_ids))

    async def begin(self, keys: Sequence[IdemKey]) -> list[IdemHit | None]:
        return await self._call("begin", list(keys))

    async def remember(self, answers: Sequence[tuple[IdemKey, object]]) -> None:
        await self._call("remember", list(answers))

    async def forget(self, keys: Sequence[IdemKey]) -> None:
        await self._call("forget", list(keys))

    async def apply_settlements(self, shard_name: str, items: Sequence[SettlementItem],
                                answers: Sequence[tuple[IdemKey, object]] = ()) -> int:
        return await self._call("apply_settlements", shard_name, list(items), list(answers))

    async def history(self, user: int, limit: int,
                      before: int | None) -> list[ClosedPosition] | Rejected:
        return await self._call("history", user, limit, before)

    async def audit(self, open_margins_by_user: Mapping[int, int],
                    unsettled: Mapping[str, Sequence[SettlementItem]]) -> list[str]:
        return await self._call("audit", dict(open_margins_by_user),
                                {k: list(v) for k, v in unsettled.items()})

    async def totals(self) -> dict[str, object]:
        return await self._call("totals")

    async def ping(self) -> bool:
        return bool(await _remote("ledger", self.handle.ping.remote(), 5.0))


class RayShardPort:
    """The ShardPort over a ShardActor handle."""

    def __init__(self, name: str, handle: Any, timeout_s: float | None = 30.0) -> None:
        self.name = name
        self.handle = handle
        self.timeout_s = timeout_s

    async def _call(self, method: str, *args: Any) -> Any:
        return await _remote(self.name, getattr(self.handle, method).remote(*args), self.timeout_s)

    async def open_many(self, requests: Sequence[ShardOpen]) -> list[OpenPosition | Rejected]:
        return await self._call("open_many", list(requests))

    async def resolve_opens(self, request_ids: Sequence[int]
                            ) -> list[OpenPosition | Rejected | None]:
        return await self._call("resolve_opens", list(request_ids))

    async def close_many(self, requests: Sequence[ShardClose]) -> list[SettlementItem | Rejected]:
        return await self._call("close_many", list(requests))

    async def positions_of_many(self, owners: Sequence[int]) -> list[list[OpenPosition]]:
        return await self._call("positions_of_many", list(owners))

    async def last_tick(self) -> Tick | None:
        return await self._call("last_tick")

    async def apply_ticks(self, ticks: Sequence[Tick]) -> int:
        return await self._call("apply_ticks", list(ticks))

    async def outbox(self) -> list[SettlementItem]:
        return await self._call("outbox")

    async def ack_outbox(self, upto_seq: int) -> int:
        return await self._call("ack_outbox", upto_seq)

    async def open_margins_by_user(self) -> dict[int, int]:
        return await self._call("open_margins_by_user")

    async def audit_view(self) -> tuple[dict[int, int], list[SettlementItem]]:
        return await self._call("audit_view")

    async def stats(self) -> ShardStats:
        return await self._call("stats")

    async def flush_outbox(self) -> int:
        """Have the actor push its outbox to the ledger and wait; returns what remains."""
        return await self._call("flush_outbox")
