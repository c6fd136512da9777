"""MachineHost: the one Ray actor class that hosts any state machine (the ledger, a shard).

A host differs from another only by its :class:`HostSpec`: which machine it builds and where it
keeps its journal. It has no method per operation: ``execute(commands)`` runs a batch through
its :class:`cluster.durability.runner.Runner` and answers only what is durable. A sync actor:
its calls run one at a time, which is what a state machine needs. With ``HostSpec.publish``
it also produces what its machine offers to others (``outbound``: the ledger's account events)
to a Kafka topic after every batch, signed (cluster.actors.publisher, cluster.live.topic_auth).
"""

from __future__ import annotations

import os
import pickle
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cluster.actors.names import LEDGER
from cluster.config import Settings
from cluster.durability.runner import ExecuteTiming, Runner
from cluster.durability.snapshot import Snapshot
from cluster.durability.store import JOURNAL_DIR
from cluster.live.topic_auth import SECRET_BYTES, SignedTopic
from cluster.trading.placement import shard_layout

if TYPE_CHECKING:
    from cluster.actors.publisher import Publisher


class JournalMissing(RuntimeError):
    """A host finds no journal where it must have one, or runs where ``DATA_DIR`` is not
    the platform's: it would begin empty."""


class HostClosed(RuntimeError):
    """A command reached a host after its :meth:`MachineHost.close` (a clean stop)."""


@dataclass(frozen=True, slots=True)
class HostSpec:
    """A machine to host: ``machine_cls(*args, **keywords)`` fresh, or
    ``machine_cls.from_snapshot(*args, arrays, meta, **keywords)`` from a snapshot; journaled
    in ``data_dir/name`` when ``data_dir`` is set.

    Only plain values: a restarted actor rebuilds itself from the spec alone.
    """

    name: str
    machine_cls: type
    args: tuple[Any, ...]
    data_dir: str | None = None
    store_options: dict[str, Any] = field(default_factory=dict)
    publish: SignedTopic | None = None  # where machine.outbound goes, signed with what
    keywords: dict[str, Any] = field(default_factory=dict)  # the machine's keyword arguments
    # a file the start wrote under data_dir on its own node: a host that does not find it
    # runs where DATA_DIR is another disk than the start's (None: not checked; a pinned host)
    shared_mark: str | None = None
    # DATA_DIR's layout record says an earlier start's hosts made their journals: this host
    # is refused without one, as after a restart (False: a first start, which makes it)
    made: bool = False

    def build(self, snapshot: Snapshot | None) -> Any:
        cls: Any = self.machine_cls
        if snapshot is None:
            return cls(*self.args, **self.keywords)
        return cls.from_snapshot(*self.args, snapshot.arrays, snapshot.meta, **self.keywords)

    def runner(self, *, exit_on_failure: bool = False, restarted: bool = False) -> Runner[Any]:
        """The machine with its journal recovered (or in memory without ``data_dir``).

        :class:`JournalMissing` when ``shared_mark`` is not under ``data_dir`` here;
        ``restarted``: this host ran before (Ray starts it again), so its first start made
        its journal; :class:`JournalMissing`, creating nothing, when it is not there: the
        host runs on a node that does not hold its directory (``DATA_DIR`` is that node's
        own disk), where it would begin empty and serve without every change it had
        acknowledged."""
        if self.data_dir is None:
            return Runner(self.build(None))
        directory = os.path.join(self.data_dir, self.name)
        journal = os.path.join(directory, JOURNAL_DIR)
        mark = None if self.shared_mark is None else os.path.join(self.data_dir,
                                                                   self.shared_mark)
        if mark is not None and not os.path.exists(mark):
            raise JournalMissing(
                f"{self.name} runs on a node whose DATA_DIR is not the platform's ({mark} "
                "is not on this node): refused rather than begin empty. Mount one "
                "filesystem at DATA_DIR on every node, or pin each host to the node that "
                "holds its directory")
        if restarted and not os.path.isdir(journal):
            raise JournalMissing(
                f"{self.name} was started again without its journal ({journal} is not "
                "on this node): refused rather than begin empty. Give this node the "
                "directory (one filesystem mounted at DATA_DIR on every node, or the host "
                "pinned to the node that holds it), then start the platform again")
        if self.made and not os.path.isdir(journal):
            raise JournalMissing(
                f"{self.name} has no journal ({journal}), which an earlier start of this "
                "DATA_DIR made: refused rather than begin empty, without what it acknowledged "
                "(and release the margin of its positions). Restore the directory from the "
                "backup that holds it, or start with a new DATA_DIR")
        return Runner.open(directory, self.build, exit_on_failure=exit_on_failure,
                           **self.store_options)


class MachineHost:
    """The actor body (:func:`host_class` gives its Ray class)."""

    def __init__(self, spec: HostSpec) -> None:
        self.spec = spec
        # a failed commit or apply ends the process: Ray restarts it, recovery reads the disk;
        # a restart that finds no journal raises, which ends the actor for good
        self.runner = spec.runner(exit_on_failure=True, restarted=restarted_by_ray())
        self.publisher: Publisher | None = None
        self._closed = False
        self._published = -1  # what outbound gave up to (-1: everything still kept, first)
        if spec.publish is not None:
            # imported here: a host that publishes nothing (a shard) starts, and restarts,
            # without loading the Kafka client
            from cluster.actors.publisher import Publisher

            topic = spec.publish
            self.publisher = Publisher(topic.bootstrap, topic.topic, topic.secret)
            self._publish()

    def __repr__(self) -> str:
        # Ray heads the actor's log files with it (":actor_name:MachineHost(shard-SOL-0)"),
        # so that a host's worker-*.err is found by its name
        return f"MachineHost({self.spec.name})"

    def execute(self, commands: list[Any]) -> list[Any]:
        self._refuse_closed()
        answers = self.runner.execute(commands)
        if self.publisher is not None:
            started_ns = time.time_ns()
            self._publish()  # after the answers are durable: only journaled state goes out
            self.runner.note_after_us((time.time_ns() - started_ns) // 1000)
        return answers

    def execute_pickled(self, payload: bytes) -> bytes:
        """:meth:`execute` of a batch pickled by the caller (cluster.actors.port.RayPort),
        its answers pickled the same way: Ray then moves bytes, where a list of command
        objects would go through its cloudpickle on both sides, at about twice the cost of
        the standard pickler for these module-level types."""
        answers = self.execute(pickle.loads(payload))
        return pickle.dumps(answers, protocol=pickle.HIGHEST_PROTOCOL)

    def _publish(self) -> None:
        assert self.publisher is not None
        self._published, messages = self.runner.machine.outbound(self._published)
        self.publisher.offer(messages)

    def ping(self) -> bool | str:
        """True, or why this host may not take writes (cluster.durability.runner.Runner.problem)."""
        if self._closed:
            return "closed: the platform stops"
        return self.runner.problem() or True

    def info(self) -> dict[str, Any]:
        """Operational facts: pid, recovery time, journal size, commands and batches run."""
        return {"pid": os.getpid(), "recovery_s": self.runner.recovery_s(),
                "journal_bytes": self.runner.journal_bytes(),
                "commands": self.runner.commands, "batches": self.runner.batches,
                "published": None if self.publisher is None else self.publisher.stats()}

    def timings(self, since: int = 0) -> tuple[int, list[ExecuteTiming]]:
        """Where the newest executes spent their time (Runner.timings_since): ``(count,
        timings)``; pass ``count`` back as ``since`` to get only the executes after it."""
        return self.runner.timings_since(since)

    def checkpoint(self) -> int:
        self._refuse_closed()
        return self.runner.checkpoint()

    def close(self) -> None:
        """A clean stop: final snapshot (none when the runner failed or is read-only: see
        Runner.close) and journal release, then the publisher's end. The host takes no command
        after it (:class:`HostClosed`): a late tick was answered from memory and never journaled,
        and the next commit met the released journal, which ends the process (Ray starts it
        again mid-stop). Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        try:
            self.runner.close()
        finally:  # a final snapshot that fails (a full disk) still ends the publisher
            if self.publisher is not None:
                self.publisher.close()

    def _refuse_closed(self) -> None:
        if self._closed:
            raise HostClosed(f"{self.spec.name} is closed: the platform stops")


def restarted_by_ray() -> bool:
    """Whether this process is a Ray actor started again (not its first start); False
    outside an actor, such as a host built in-process."""
    ray: Any = sys.modules.get("ray")  # an actor's process has it; nothing else needs it
    if ray is None or not ray.is_initialized():
        return False
    context = ray.get_runtime_context()
    if context.get_actor_id() is None:
        return False
    with warnings.catch_warnings():  # the property reads Ray's own deprecated actor_id
        warnings.simplefilter("ignore", DeprecationWarning)
        return bool(context.was_current_actor_reconstructed)


def host_class() -> Any:
    """The Ray actor class of :class:`MachineHost` (imports Ray only when asked).

    Without Ray's task events (as Serve runs its replicas): Ray would otherwise record every
    call's state changes in both processes and report them to its control store, for a task
    list no part of the platform reads, at a cost per call on the hottest path."""
    import ray

    remote: Any = ray.remote  # Ray's overloads do not model its actor options
    return remote(enable_task_events=False)(MachineHost)


def host_specs(settings: Settings, data_dir: str | None = None,
               store_options: dict[str, Any] | None = None, bootstrap: str | None = None,
               secret: bytes | None = None,
               made: bool = False) -> tuple[HostSpec, dict[str, HostSpec]]:
    """The ledger's spec and each shard's (by ShardSpec.name) for ``settings``' layout; with
    ``bootstrap``, the ledger publishes its account events to ``settings.account_topic``,
    signed with ``secret`` (cluster.live.topic_auth: one of its secrets, required then).
    ``made``: an earlier start's hosts made their journals (:attr:`HostSpec.made`)."""
    from engine.ledger_machine import LedgerMachine
    from engine.shard_machine import ShardMachine

    publish = None
    if bootstrap is not None:
        if secret is None or len(secret) < SECRET_BYTES:
            raise ValueError("account events are published only signed: a secret is needed")
        publish = SignedTopic(bootstrap, settings.account_topic, secret)
    # a journal's disk with less free space than this makes /healthz answer 503
    options = {"min_free_bytes": settings.min_free_disk_mb << 20, **(store_options or {})}
    ledger = HostSpec(LEDGER, LedgerMachine, (settings.signup_balance_micros,
                                              settings.max_open_positions,
                                              settings.max_open_orders), data_dir, options,
                      publish, {"max_client_order_ids": settings.max_client_order_ids},
                      made=made)
    shards = {
        spec.name: HostSpec(spec.name, ShardMachine,
                            (spec.name, spec.book_tag, settings.assets[spec.asset],
                             settings.maintenance_margin_ppm, settings.max_price_age_us),
                            data_dir, options,
                            keywords={"max_clock_skew_us": settings.max_clock_skew_us},
                            made=made)
        for spec in shard_layout(settings)}
    return ledger, shards
