"""``shardex feed``: the market data service alone (source -> Kafka), no Ray.

Starts the embedded broker unless ``KAFKA_BROKERS`` is set or a platform running from DATA_DIR
records one (then it produces into that one), creates the topic (one partition per asset), runs
the FEED_SOURCE source until Ctrl-C / SIGTERM, then stops everything in order. When a finite
source (a replay without loop) ends, a run on a broker it did not start exits; with its own
embedded broker the process stays up (the broker holds the messages in memory) until Ctrl-C.
One feed plays a source into a DATA_DIR's embedded broker at a time (:data:`FEED_LOCK`), and
none into the broker of an ``up``, which plays its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import signal
import sys
from pathlib import Path

from feed.broker import (
    BROKER_RECORD,
    BrokerError,
    EmbeddedBroker,
    ProcessIdentity,
    RecordedBroker,
    recorded_broker,
)
from feed.settings import EMBEDDED_BROKER, FeedSettings, HasFeedSettings, feed_settings
from feed.source import Source, make_source, parse_source, run_source

log = logging.getLogger(__name__)

FEED_LOCK = "feed.lock"  # in DATA_DIR: held by the `shardex feed` that plays a source there


def embedded_broker_for(settings: FeedSettings | HasFeedSettings,
                        port: int | None = None) -> EmbeddedBroker | None:
    """The broker to start for ``settings``, on ``port`` (None: the default's, ``--broker-port``
    unset): None when ``KAFKA_BROKERS`` names an external one."""
    if feed_settings(settings).kafka_brokers:
        return None
    host, _, default = EMBEDDED_BROKER.rpartition(":")
    return EmbeddedBroker(host, int(default) if port is None else port)


async def _serve(settings: FeedSettings, source: Source | None, bootstrap: str,
                 keep_broker: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    stats = await run_source(settings, stop, bootstrap=bootstrap, source=source)
    # a stop (Ctrl-C, SIGTERM) or the end of a finite source (a replay without loop)
    log.info("feed: %s: %s", "stopped" if stop.is_set() else "source finished", stats)
    if keep_broker and not stop.is_set():
        # The embedded broker keeps messages in memory only: stopping it when a finite source
        # (a replay) ends would take the published prices away from the consumers.
        log.info("feed: the embedded broker stays up for consumers; Ctrl-C stops it")
        await stop.wait()


def run_feed_service(settings: FeedSettings | HasFeedSettings,
                     data_dir: Path | None = None, broker_port: int | None = None) -> int:
    """Run the market data service in the foreground; returns the process exit code.

    ``data_dir``: where a platform (``shardex engine`` or ``up``) records its embedded broker;
    while one runs there, the feed produces into it (the broker its feed actor reads) instead
    of starting its own, and its own is recorded there otherwise, on ``broker_port`` (None:
    the default)."""
    settings = feed_settings(settings)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        # fails on a bad FEED_SOURCE before anything starts; the source checked is the one
        # played (a replay made again would read its recording again, changed or gone by then)
        source = make_source(settings)
    except (ValueError, OSError) as exc:
        print(f"shardex feed: {exc}", file=sys.stderr)
        return 2
    broker = embedded_broker_for(settings, broker_port)
    bootstrap = settings.bootstrap_servers
    held: int | None = None  # DATA_DIR's FEED_LOCK, while this feed plays a source there
    if broker is not None and data_dir is not None:
        broker.record_path = data_dir / BROKER_RECORD
        running = recorded_broker(broker.record_path)
        if source is not None:
            broker.source = parse_source(settings.feed_source).kind
            alone = _play_alone(data_dir, broker.source, running)
            if isinstance(alone, str):
                print(f"shardex feed: {alone}", file=sys.stderr)
                return 1
            held = alone
        if running:
            log.info("feed: producing into the embedded broker on %s recorded in %s",
                     running.bootstrap, broker.record_path)
            broker, bootstrap = None, running.bootstrap
    try:
        if broker is not None:
            bootstrap = broker.start().bootstrap
        asyncio.run(_serve(settings, source, bootstrap, keep_broker=broker is not None))
    except BrokerError as exc:
        print(f"shardex feed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        if broker is not None:
            broker.stop()
        if held is not None:
            os.close(held)
    return 0


def _play_alone(data_dir: Path, kind: str, running: RecordedBroker | None) -> int | str:
    """Take DATA_DIR's :data:`FEED_LOCK` for this process's life (the descriptor), after
    checking that the broker recorded there (``running``) has no source of its own (``up``'s);
    else why not. Two sources on one topic: the shards would take each one's prices in turn
    (two simulated walks: jumps no market made)."""
    def refused(who: str, played: str) -> str:
        return (f"{who} already plays market data ({played}) into the embedded broker of "
                f"DATA_DIR={data_dir}; a second source there would mix two sources' prices: "
                "one source per platform (README, `engine` and `feed` in two terminals)")

    def named(who: ProcessIdentity) -> str:
        return f"pid {who.pid} ({' '.join(who.cmdline)})"

    if running is not None and running.source is not None:
        return refused(named(running.owner), running.source)
    path = data_dir / FEED_LOCK
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        return f"cannot write to DATA_DIR={data_dir}: {exc.strerror or exc}"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        try:
            record = json.loads(path.read_text())
            return refused(named(ProcessIdentity.from_json(record["owner"])),
                           str(record["source"]))
        except (OSError, ValueError, KeyError, TypeError):  # taken a moment ago, not written yet
            return refused(f"the feed holding {path}", "its FEED_SOURCE")
    me = ProcessIdentity.of(os.getpid())
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"owner": me.to_json() if me else None, "source": kind}).encode())
    return fd
