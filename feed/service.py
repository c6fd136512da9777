"""``shardex feed``: the market data service alone (source -> Kafka), no Ray.

Starts the embedded broker unless ``KAFKA_BROKERS`` is set or a platform running from DATA_DIR
records one (then it produces into that one), creates the topic (one partition per asset), runs
the FEED_SOURCE source until Ctrl-C / SIGTERM, then stops everything in order. When a finite
source (a replay without loop) ends, a run on a broker it did not start exits; with its own
embedded broker the process stays up (the broker holds the messages in memory) until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
from pathlib import Path

from feed.broker import BROKER_RECORD, BrokerError, EmbeddedBroker, recorded_broker
from feed.settings import EMBEDDED_BROKER, FeedSettings, HasFeedSettings, feed_settings
from feed.source import Source, make_source, parse_source, run_source

log = logging.getLogger(__name__)


def embedded_broker_for(settings: FeedSettings | HasFeedSettings) -> EmbeddedBroker | None:
    """The broker to start for ``settings``: None when ``KAFKA_BROKERS`` names an external one."""
    if feed_settings(settings).kafka_brokers:
        return None
    host, _, port = EMBEDDED_BROKER.rpartition(":")
    return EmbeddedBroker(host, int(port))


async def _serve(settings: FeedSettings, source: Source | None, bootstrap: str,
                 keep_broker: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    stats = await run_source(settings, stop, bootstrap=bootstrap, source=source)
    log.info("feed: source finished: %s", stats)
    if keep_broker and not stop.is_set():
        # The embedded broker keeps messages in memory only: stopping it when a finite source
        # (a replay) ends would take the published prices away from the consumers.
        log.info("feed: the embedded broker stays up for consumers; Ctrl-C stops it")
        await stop.wait()


def run_feed_service(settings: FeedSettings | HasFeedSettings,
                     data_dir: Path | None = None) -> int:
    """Run the market data service in the foreground; returns the process exit code.

    ``data_dir``: where a platform (``shardex engine`` or ``up``) records its embedded broker;
    while one runs there, the feed produces into it (the broker its feed actor reads) instead
    of starting its own, and its own is recorded there otherwise."""
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
    broker = embedded_broker_for(settings)
    bootstrap = settings.bootstrap_servers
    if broker is not None and data_dir is not None:
        broker.record_path = data_dir / BROKER_RECORD
        broker.source = parse_source(settings.feed_source).kind if source else None
        if running := recorded_broker(broker.record_path):
            if running.source is not None:
                # two sources on one topic: the shards would take each one's prices in turn
                print(f"shardex feed: pid {running.owner.pid} "
                      f"({' '.join(running.owner.cmdline)}) plays market data "
                      f"({running.source}) into the embedded broker recorded in "
                      f"{broker.record_path}; a second source there would mix two sources' "
                      "prices: run `shardex engine` (or FEED_SOURCE=none) beside a feed",
                      file=sys.stderr)
                return 1
            log.info("feed: producing into the embedded broker on %s recorded in %s",
                     running.bootstrap, broker.record_path)
            broker, bootstrap = None, running.bootstrap
    try:
        if broker is not None:
            bootstrap = broker.start().bootstrap
    except BrokerError as exc:
        print(f"shardex feed: {exc}", file=sys.stderr)
        return 1
    try:
        asyncio.run(_serve(settings, source, bootstrap, keep_broker=broker is not None))
    except KeyboardInterrupt:
        pass
    finally:
        if broker is not None:
            broker.stop()
    return 0
