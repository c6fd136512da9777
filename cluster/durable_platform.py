"""DurablePlatform: the launcher's Platform with journaled actors that Ray restarts.

Differences from ``cluster.launcher.Platform`` (everything else is inherited):

* the ledger and every shard are created with ``data_dir = settings.data_dir``, so their cores
  are the journaled ``DurableLedger``/``DurableShard`` (``DATA_DIR/ledger``,
  ``DATA_DIR/<shard name>``) and rebuild their state when (re)started;
* every actor has ``max_restarts=-1``: Ray restarts a killed process and its ``__init__``
  recovers from disk (a journal write that fails ends the process the same way).
  ``max_task_retries=0`` for the ledger and the shards: a call that was running when the
  process died fails (the API answers 503) instead of being silently run a second time (a
  lock or a manual close is not idempotent); calls made while the actor recovers fail fast
  with ``ActorUnavailableError`` (503) too. The feed actor's calls are harmless to repeat,
  so it retries them;
* before the API serves, the opens whose clientOrderId the ledger still holds as pending are
  resolved against every shard (``resolve_opens``: the position if it opened, else fenced),
  and ``DurableLedger.reconcile_at_start`` stores those answers and releases margin locked by
  requests a crash cut off;
* the same resolution runs every ``pending_check_interval_s`` for opens pending longer than
  ``STALE_PENDING_S`` (a ledger crash between a lock and its answer, or while the answer was
  being stored, would otherwise leave the clientOrderId answering "in progress" until the
  next platform start);
* a supervisor thread pings the feed actor every ``supervise_interval_s``: a restarted feed
  actor resumes consuming on its first call, from the newest offsets, so the shards get the
  newest prices again within about a second of a feed crash.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cluster.actor_names import FEED, LEDGER
from cluster.launcher import READY_TIMEOUT_S, LaunchError, Platform, placement_nodes
from engine.messages import OpenPosition, SettlementItem
from cluster.shard_core import merge_margins

RESTART = {"max_restarts": -1, "max_task_retries": 0}  # ledger and shards
STORE_OPTIONS = {"exit_on_failure": True}  # a failed fdatasync ends the process (Ray restarts)
FEED_RESTART = {"max_restarts": -1, "max_task_retries": -1}
STALE_PENDING_S = 30.0  # longer than any live request keeps a clientOrderId pending


@dataclass
class DurablePlatform(Platform):
    """``Platform`` whose state lives in ``settings.data_dir`` (see the module docstring).

    ``released_at_start``: what the start-time reconciliation released (user -> micros).
    """

    supervise_interval_s: float = 1.0
    pending_check_interval_s: float = 10.0
    settled_pending: int = 0  # stale pending clientOrderIds settled while running
    released_at_start: dict[int, int] = field(default_factory=dict)
    resolved_at_start: int = 0  # pending clientOrderIds answered with the position they opened
    _supervisor: threading.Thread | None = None
    _supervising: threading.Event = field(default_factory=threading.Event)

    def _start_actors(self) -> None:
        import ray
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from cluster.feed_actor import FeedActor
        from cluster.ledger_actor import LedgerActor
        from cluster.shard_actor import ShardActor

        settings = self.settings
        data_dir = str(settings.data_dir.resolve())
        self.ledger = LedgerActor.options(  # type: ignore[attr-defined]
            name=LEDGER, namespace=self.namespace, **RESTART,
        ).remote(settings.signup_balance_micros, data_dir, **STORE_OPTIONS)
        ray.get(self.ledger.ping.remote(), timeout=READY_TIMEOUT_S)
        nodes = placement_nodes()
        for i, spec in enumerate(self.layout):
            strategy = NodeAffinitySchedulingStrategy(nodes[i % len(nodes)], soft=True)
            self.shards[spec.name] = ShardActor.options(  # type: ignore[attr-defined]
                name=spec.name, namespace=self.namespace, scheduling_strategy=strategy,
                **RESTART,
            ).remote(spec, settings.assets[spec.asset], settings.maintenance_margin_ppm,
                     settings.max_price_age_us, self.ledger, data_dir, **STORE_OPTIONS)
        names = list(self.shards)
        pending = ray.get(self.ledger.__ray_call__.remote(_pending_open_requests),
                          timeout=READY_TIMEOUT_S)
        resolved: dict[int, Any] = {}
        if pending:
            for answers in ray.get([self.shards[n].resolve_opens.remote(pending) for n in names],
                                   timeout=READY_TIMEOUT_S):
                for request_id, answer in zip(pending, answers, strict=True):
                    if isinstance(answer, OpenPosition):
                        resolved[request_id] = answer
        views = ray.get([self.shards[n].audit_view.remote() for n in names],
                        timeout=READY_TIMEOUT_S)
        self.released_at_start = ray.get(self.ledger.__ray_call__.remote(
            _reconcile_at_start, merge_margins(margins for margins, _ in views),
            {n: outbox for n, (_, outbox) in zip(names, views, strict=True)}, resolved),
            timeout=READY_TIMEOUT_S)
        self.resolved_at_start = len(resolved)
        self.feed = FeedActor.options(
            name=FEED, namespace=self.namespace, **FEED_RESTART).remote(
            settings, self.bootstrap, namespace=self.namespace, topic=self.topic)
        if not ray.get(self.feed.start.remote(), timeout=READY_TIMEOUT_S):
            raise LaunchError(f"the feed actor could not consume {self.topic} on "
                              f"{self.bootstrap}")
        self._supervising.clear()
        self._supervisor = threading.Thread(target=self._supervise, name="feed-supervisor",
                                            daemon=True)
        self._supervisor.start()

    def _supervise(self) -> None:
        import ray

        pending: Any = None
        next_check = time.monotonic() + self.pending_check_interval_s
        while not self._supervising.wait(self.supervise_interval_s):
            if time.monotonic() >= next_check:
                next_check = time.monotonic() + self.pending_check_interval_s
                with contextlib.suppress(Exception):
                    self.settled_pending += self._settle_stale_pending()
            feed = self.feed
            if feed is None:
                continue
            if pending is not None:
                ready, _ = ray.wait([pending], timeout=0)
                if not ready:
                    continue
                with contextlib.suppress(Exception):
                    ray.get(pending)
            with contextlib.suppress(Exception):
                pending = feed.stats.remote()

    def _settle_stale_pending(self) -> int:
        """Resolve opens pending longer than STALE_PENDING_S against every shard (a shard
        that does not answer makes this round skip them: where it is, is unknown)."""
        import ray

        ledger, shards = self.ledger, dict(self.shards)
        if ledger is None or not shards:
            return 0
        stale = ray.get(ledger.__ray_call__.remote(_pending_open_requests, STALE_PENDING_S),
                        timeout=10.0)
        if not stale:
            return 0
        opened: dict[int, Any] = {}
        for answers in ray.get([h.resolve_opens.remote(stale) for h in shards.values()],
                               timeout=10.0):
            for request_id, answer in zip(stale, answers, strict=True):
                if isinstance(answer, OpenPosition):
                    opened[request_id] = answer
        absent = [r for r in stale if r not in opened]
        return int(ray.get(ledger.__ray_call__.remote(_settle_pending_opens, opened, absent),
                           timeout=10.0))

    def stop(self) -> None:
        self._supervising.set()
        if self._supervisor is not None:
            self._supervisor.join(5.0)
            self._supervisor = None
        super().stop()


# Run inside the ledger actor (``__ray_call__``) on its durable core: the shell need not know.
def _pending_open_requests(actor: Any, older_than_s: float = 0.0) -> list[int]:
    core = actor.core
    if not hasattr(core, "pending_open_requests"):
        return []
    return list(core.pending_open_requests(older_than_s))


def _settle_pending_opens(actor: Any, opened: Mapping[int, OpenPosition],
                          absent: Sequence[int]) -> int:
    settle = getattr(actor.core, "settle_pending_opens", None)
    return 0 if settle is None else int(settle(opened, absent))


def _reconcile_at_start(actor: Any, open_margins_by_user: Mapping[int, int],
                        unsettled: Mapping[str, Sequence[SettlementItem]],
                        resolved_opens: Mapping[int, OpenPosition]) -> dict[int, int]:
    reconcile = getattr(actor.core, "reconcile_at_start", None)
    if reconcile is None:
        return {}
    return dict(reconcile(open_margins_by_user, unsettled, resolved_opens))
