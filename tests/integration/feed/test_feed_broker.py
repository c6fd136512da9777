"""The embedded broker: start/stop, a clear error on a busy port, topic creation."""

from __future__ import annotations

import asyncio
import logging
import socket
import tempfile
import time
from pathlib import Path

import pytest
from aiokafka import AIOKafkaProducer
from feed.broker import BrokerError
from feed.broker import EmbeddedBroker
from feed.broker import accepts_connections
from feed.broker import ensure_topic
from feed.broker import free_port


def test_busy_port_is_a_clear_error_not_a_hang() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        t0 = time.monotonic()
        with pytest.raises(BrokerError, match="already in use"):
            EmbeddedBroker("127.0.0.1", port).start()
        assert time.monotonic() - t0 < 2.0


def test_start_stop_and_context_manager() -> None:
    port = free_port()
    with EmbeddedBroker("127.0.0.1", port) as broker:
        assert broker.running and accepts_connections("127.0.0.1", port)
        assert broker.bootstrap == f"127.0.0.1:{port}"
        with pytest.raises(BrokerError):  # a second broker on the same port
            EmbeddedBroker("127.0.0.1", port).start()
    assert not broker.running
    assert not accepts_connections("127.0.0.1", port)


def test_missing_binary_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                         ) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where its temp log goes
    with pytest.raises(BrokerError, match="cannot run the broker binary"):
        EmbeddedBroker("127.0.0.1", free_port(), binary="/nonexistent/tansu").start()
    assert list(tmp_path.iterdir()) == []  # its temp log removed


def test_broker_that_exits_at_start_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                                ) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    with pytest.raises(BrokerError, match="exited at start"):
        EmbeddedBroker("127.0.0.1", free_port(), binary="/bin/false").start()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.asyncio
async def test_ensure_topic_one_partition_per_asset_idempotent(kafka_broker: str) -> None:
    topic = f"topic-{free_port()}"
    assert await ensure_topic(kafka_broker, 3, topic) is True
    assert await ensure_topic(kafka_broker, 3, topic) is False
    results = await asyncio.gather(*(ensure_topic(kafka_broker, 3, f"{topic}-x") for _ in range(3)))
    assert sorted(results) in ([False, False, True], [False, False, False])
    producer = AIOKafkaProducer(bootstrap_servers=kafka_broker)
    await producer.start()
    try:
        assert await producer.partitions_for(topic) == {0, 1, 2}
    finally:
        await producer.stop()


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_producer_that_reaches_its_broker_late_says_so(
        caplog: pytest.LogCaptureFixture) -> None:
    """`shardex feed` started before its broker (an engine stopped, or started after it)
    logs a warning per failed try; the one that succeeds said nothing, so the last line left
    in its terminal was "cannot reach ..." while prices flowed. Each failed try is told once:
    aiokafka's own error line for the connection refused was printed beside each warning."""
    from engine.assets import DEFAULT_ASSETS
    from feed.producer import MarketDataProducer

    port = free_port()
    producer = MarketDataProducer(f"127.0.0.1:{port}", DEFAULT_ASSETS)
    caplog.set_level("WARNING")
    starting = asyncio.create_task(producer.start())
    deadline = time.monotonic() + 20
    while not any("cannot reach" in r.getMessage() for r in caplog.records):
        assert time.monotonic() < deadline and not starting.done()
        await asyncio.sleep(0.05)
    with EmbeddedBroker("127.0.0.1", port):
        try:
            await asyncio.wait_for(starting, 30)
        finally:
            await producer.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "feed.producer"]
    tries = sum("cannot reach" in line for line in said)
    assert said[-1] == (f"producer: 127.0.0.1:{port} reached after {tries} failed tries; "
                        "publishing"), said
    assert [r.getMessage() for r in caplog.records if r.name.startswith("aiokafka")] == []
    assert logging.getLogger("aiokafka").level == logging.NOTSET  # as it was
