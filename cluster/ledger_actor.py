"""LedgerActor: the thin Ray shell around one LedgerCore (a sync actor: measured cheaper than an
async one, and its calls run one at a time, which is what the core needs)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import ray

from cluster.config import Settings
from cluster.ledger_core import LedgerCore
from engine.messages import (
    ClosedPosition,
    IdemHit,
    IdemKey,
    MarginLock,
    NewAccount,
    Principal,
    SettlementItem,
)
from engine.results import Rejected

LEDGER_ACTOR_NAME = "ledger"


@ray.remote
class LedgerActor:
    """Every method forwards to LedgerCore (see there for the semantics).

    With ``data_dir`` the core is the journaled ``cluster.ledger_store.DurableLedger`` in
    ``data_dir/ledger`` (recovered before the first call; ``store_options`` go to it);
    without, the ledger lives in memory only.
    """

    def __init__(self, signup_balance_micros: int, data_dir: str | None = None,
                 **store_options: Any) -> None:
        if data_dir is None:
            self.core = LedgerCore(signup_balance_micros)
        else:
            from cluster.ledger_store import DurableLedger

            self.core = DurableLedger(signup_balance_micros,
                                      os.path.join(data_dir, LEDGER_ACTOR_NAME),
                                      **store_options)

    def ping(self) -> bool:
        return True

    def create_account(self) -> NewAccount:
        return self.core.create_account()

    def principals_of_key_hashes(self, key_hashes: Sequence[str]) -> list[Principal | None]:
        return self.core.principals_of_key_hashes(key_hashes)

    def balances_many(self, users: Sequence[int]) -> list[tuple[int, int]]:
        return self.core.balances_many(users)

    def lock_margins(self, items: Sequence[MarginLock]) -> list[Rejected | IdemHit | None]:
        return self.core.lock_margins(items)

    def release_margins(self, items: Sequence[tuple[int, int]],
                        answers: Sequence[tuple[IdemKey, object]] = ()) -> None:
        self.core.release_margins(items, answers)

    def abandon_locks(self, request_ids: Sequence[int]) -> list[tuple[int, int, int]]:
        return self.core.abandon_locks(request_ids)

    def begin(self, keys: Sequence[IdemKey]) -> list[IdemHit | None]:
        return self.core.begin(keys)

    def remember(self, answers: Sequence[tuple[IdemKey, object]]) -> None:
        self.core.remember(answers)

    def forget(self, keys: Sequence[IdemKey]) -> None:
        self.core.forget(keys)

    def applied_seq(self, shard_name: str) -> int:
        return self.core.applied_seq(shard_name)

    def apply_settlements(self, shard_name: str, items: Sequence[SettlementItem],
                          answers: Sequence[tuple[IdemKey, object]] = ()) -> int:
        return self.core.apply_settlements(shard_name, items, answers)

    def history(self, user: int, limit: int,
                before: int | None) -> list[ClosedPosition] | Rejected:
        return self.core.history(user, limit, before)

    def audit(self, open_margins_by_user: Mapping[int, int],
              unsettled: Mapping[str, Sequence[SettlementItem]]) -> list[str]:
        return self.core.audit(open_margins_by_user, unsettled)

    def totals(self) -> dict[str, object]:
        return self.core.totals()

    def reconcile_at_start(self, open_margins_by_user: Mapping[int, int],
                           unsettled: Mapping[str, Sequence[SettlementItem]]) -> dict[int, int]:
        """Release locks left by requests a crash cut off (durable ledger only; call before
        the API serves). Returns the released micros per user."""
        reconcile = getattr(self.core, "reconcile_at_start", None)
        return {} if reconcile is None else dict(reconcile(open_margins_by_user, unsettled))


def create_ledger_actor(settings: Settings, name: str = LEDGER_ACTOR_NAME,
                        data_dir: str | None = None, **options: Any) -> Any:
    """Start the (named) ledger actor; ``options`` go to ``.options()`` (namespace, lifetime,
    scheduling...); ``data_dir`` makes it durable. Returns its handle."""
    return LedgerActor.options(name=name, **options).remote(  # type: ignore[attr-defined]
        settings.signup_balance_micros, data_dir)
