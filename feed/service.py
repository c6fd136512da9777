"""``shardex feed``: the market data service alone (source -> Kafka), no Ray.

Starts the embedded broker unless ``KAFKA_BROKERS`` is set, creates the topic (one partition per
asset), runs the FEED_SOURCE source until Ctrl-C / SIGTERM, then stops everything in order. When a
finite source (a replay without loop) ends, an external Kafka run exits; with the embedded
broker the process stays up (the broker holds the messages in memory) until Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys

from feed.broker import BrokerError, EmbeddedBroker
from feed.settings import EMBEDDED_BROKER, FeedSettings, HasFeedSettings, feed_settings
from feed.source import make_source, run_source

log = logging.getLogger(__name__)


def embedded_broker_for(settings: FeedSettings | HasFeedSettings) -> EmbeddedBroker | None:
    """The broker to start for ``settings``: None when ``KAFKA_BROKERS`` names an external one."""
    if feed_settings(settings).kafka_brokers:
        return None
    host, _, port = EMBEDDED_BROKER.rpartition(":")
    return EmbeddedBroker(host, int(port))


async def _serve(settings: FeedSettings, bootstrap: str, keep_broker: bool) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    source = make_source(settings)
    stats = await run_source(settings, stop, bootstrap=bootstrap, source=source)
    log.info("feed: source finished: %s", stats)
    if keep_broker and not stop.is_set():
        # The embedded broker keeps messages in memory only: stopping it when a finite source
        # (a replay) ends would take the published prices away from the consumers.
        log.info("feed: the embedded broker stays up for consumers; Ctrl-C stops it")
        await stop.wait()


def run_feed_service(settings: FeedSettings | HasFeedSettings) -> int:
    """Run the market data service in the foreground; returns the process exit code."""
    settings = feed_settings(settings)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO,
                            format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        make_source(settings)  # fail on a bad FEED_SOURCE before starting anything
    except (ValueError, OSError) as exc:
        print(f"shardex feed: {exc}", file=sys.stderr)
        return 2
    broker = embedded_broker_for(settings)
    try:
        if broker is not None:
            broker.start()
    except BrokerError as exc:
        print(f"shardex feed: {exc}", file=sys.stderr)
        return 1
    bootstrap = broker.bootstrap if broker is not None else settings.bootstrap_servers
    try:
        asyncio.run(_serve(settings, bootstrap, keep_broker=broker is not None))
    except KeyboardInterrupt:
        pass
    finally:
        if broker is not None:
            broker.stop()
    return 0
