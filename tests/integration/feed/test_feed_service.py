"""``shardex feed`` as a real process: source -> external Kafka, stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from feed.broker import EmbeddedBroker
from feed.broker import ProcessIdentity
from feed.broker import accepts_connections
from feed.broker import free_port
from feed.broker import recorded_broker
from feed.settings import MARKET_TOPIC

ROOT = Path(__file__).resolve().parents[3]
FIXTURE = ROOT / "tests" / "fixtures" / "backpack" / "recorded_ws_frames.jsonl"


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_feed_service_replays_to_kafka_and_stops_on_sigterm(kafka_broker: str) -> None:
    # what an earlier test on the shared session broker produced is not the service's (once
    # seen: ticks of source "test" from the start of the topic)
    await _delete_market_topic(kafka_broker)
    consumer = AIOKafkaConsumer(MARKET_TOPIC, bootstrap_servers=kafka_broker,
                                group_id="service-test", auto_offset_reset="earliest",
                                metadata_max_age_ms=500)
    await consumer.start()
    env = {**os.environ, "KAFKA_BROKERS": kafka_broker, "PYTHONPATH": str(ROOT),
           "FEED_SOURCE": f"replay:{FIXTURE}?speed=0&loop=1"}
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "feed"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        values: list[dict[str, object]] = []
        deadline = asyncio.get_running_loop().time() + 30
        while len(values) < 30 and asyncio.get_running_loop().time() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                values.extend(json.loads(r.value) for r in records)
        assert len(values) >= 30
        assert {v["source"] for v in values} == {"replay"}
        assert {(v["symbol"], v["bid"], v["ask"]) for v in values} == {
            ("SOL_USDC", "98.96", "98.97")}
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        await consumer.stop()
        await _delete_market_topic(kafka_broker)  # later tests on the real topic start empty


async def _delete_market_topic(bootstrap: str) -> None:
    """Delete the market data topic (if it is there) and wait until the broker lists it no
    more."""
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        if MARKET_TOPIC in await admin.list_topics():
            await admin.delete_topics([MARKET_TOPIC])
        # the broker may list a deleted topic for a moment after answering the deletion
        deadline = asyncio.get_running_loop().time() + 5
        while MARKET_TOPIC in await admin.list_topics() \
                and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.1)
        assert MARKET_TOPIC not in await admin.list_topics()
    finally:
        await admin.close()


def test_feed_service_rejects_a_bad_source() -> None:
    env = {**os.environ, "KAFKA_BROKERS": "127.0.0.1:1", "PYTHONPATH": str(ROOT),
           "FEED_SOURCE": "carrier-pigeon"}
    proc = subprocess.run([sys.executable, "-m", "cluster.cli", "feed"], cwd=ROOT, env=env,
                          capture_output=True, timeout=30)
    assert proc.returncode == 2
    lines = proc.stderr.decode().strip().splitlines()
    assert len(lines) == 1 and "FEED_SOURCE must be backpack | sim" in lines[0]
    assert lines[0].endswith("(got carrier-pigeon)")


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_feed_service_produces_into_the_broker_of_the_platform_in_its_data_dir(
        tmp_path: Path) -> None:
    """``shardex engine`` in one terminal, ``shardex feed`` in another (no KAFKA_BROKERS): the
    feed started a broker of its own (or failed on the engine's port) and produced where the
    engine's feed actor never reads. It finds the broker the platform recorded in DATA_DIR
    (here one this process runs, as the launcher does), produces into it, and leaves it
    running when it stops. A second feed beside it is refused: it produced there too."""
    record = tmp_path / "embedded-broker.json"
    with EmbeddedBroker("127.0.0.1", free_port(), record_path=record) as broker:
        consumer = AIOKafkaConsumer(MARKET_TOPIC, bootstrap_servers=broker.bootstrap,
                                    group_id="service-test", auto_offset_reset="earliest",
                                    metadata_max_age_ms=500)
        await consumer.start()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path),
               "FEED_SOURCE": f"replay:{FIXTURE}?speed=0&loop=1"}
        env.pop("KAFKA_BROKERS", None)
        proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "feed"], cwd=ROOT,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            values: list[dict[str, object]] = []
            deadline = asyncio.get_running_loop().time() + 30
            while len(values) < 30 and asyncio.get_running_loop().time() < deadline:
                assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
                batch = await consumer.getmany(timeout_ms=500)
                for records in batch.values():
                    values.extend(json.loads(r.value) for r in records)
            assert len(values) >= 30
            # a second feed there would mix its prices with the first's: refused, naming it
            second = subprocess.run([sys.executable, "-m", "cluster.cli", "feed"], cwd=ROOT,
                                    env=env, capture_output=True, text=True, timeout=30)
            assert second.returncode == 1, second.stderr
            assert f"pid {proc.pid} " in second.stderr and "(replay)" in second.stderr, \
                second.stderr
            assert proc.poll() is None
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=15)
            assert proc.returncode == 0, out.decode(errors="replace")
            assert b"feed: stopped: {" in out, out.decode(errors="replace")  # not "finished"
            assert broker.running
            assert recorded_broker(record) == (broker.bootstrap, ProcessIdentity.of(os.getpid()),
                                               None)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            await consumer.stop()


@pytest.mark.timeout(60)
def test_feed_service_refuses_to_be_a_second_source_in_a_platforms_broker(
        tmp_path: Path) -> None:
    """Beside ``shardex up``, which plays a source of its own (or another ``shardex feed``),
    the feed produced its prices into the same broker: the shards took the two sources'
    prices in turn (two simulated walks: jumps no market made). The broker's record says
    what its owner plays; the feed then stops before it publishes anything."""
    record = tmp_path / "embedded-broker.json"
    # no trimmer: its metadata reads make the market topic of their own accord, which would
    # hide a feed's publishing into it
    broker = EmbeddedBroker("127.0.0.1", free_port(), record_path=record, trim={})
    broker.source = "sim"  # as the launcher of `up` records it
    with broker:
        before = record.read_bytes()
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path),
               "FEED_SOURCE": f"replay:{FIXTURE}?speed=0&loop=1"}
        env.pop("KAFKA_BROKERS", None)
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "feed"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=30)
        assert done.returncode == 1, done.stderr
        assert f"pid {os.getpid()} " in done.stderr and "(sim)" in done.stderr, done.stderr
        assert "one source per platform" in done.stderr and "Traceback" not in done.stderr
        assert broker.running and record.read_bytes() == before
        assert recorded_broker(record) == (broker.bootstrap, ProcessIdentity.of(os.getpid()),
                                           "sim")

        async def topics() -> set[str]:
            admin = AIOKafkaAdminClient(bootstrap_servers=broker.bootstrap)
            await admin.start()
            try:
                return set(await admin.list_topics())
            finally:
                await admin.close()

        assert MARKET_TOPIC not in asyncio.run(topics())  # nothing was published


@pytest.mark.timeout(60)
def test_a_feed_lock_taken_before_its_record_was_written_is_named_by_its_file(
        tmp_path: Path) -> None:
    """Two feeds started together: the second may find the lock held before the first wrote
    who it is; the refusal names the lock's file (it named "pid 0")."""
    import fcntl

    lock = tmp_path / "feed.lock"
    with lock.open("w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path),
               "FEED_SOURCE": f"replay:{FIXTURE}?speed=0"}
        env.pop("KAFKA_BROKERS", None)
        done = subprocess.run([sys.executable, "-m", "cluster.cli", "feed", "--broker-port",
                               str(free_port())], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=30)
    assert done.returncode == 1, done.stderr
    assert done.stderr == (
        f"shardex feed: the feed holding {lock} already plays market data (its FEED_SOURCE) "
        f"into the embedded broker of DATA_DIR={tmp_path}; a second source there would mix "
        "two sources' prices: one source per platform (README, `engine` and `feed` in two "
        "terminals)\n"), done.stderr
    assert not (tmp_path / "embedded-broker.json").exists()  # it started nothing


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_feed_service_starts_its_own_broker_on_the_port_given(tmp_path: Path) -> None:
    """``shardex feed --broker-port P`` with no platform in DATA_DIR: its own broker listens on
    P and is recorded there (a feed started first always took 9092), and its prices are
    on it; the broker stops with the feed."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "DATA_DIR": str(tmp_path),
           "FEED_SOURCE": f"replay:{FIXTURE}?speed=0&loop=1"}
    env.pop("KAFKA_BROKERS", None)
    proc = subprocess.Popen([sys.executable, "-m", "cluster.cli", "feed", "--broker-port",
                             str(port)], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    record = tmp_path / "embedded-broker.json"
    try:
        deadline = asyncio.get_running_loop().time() + 30
        while (found := recorded_broker(record)) is None:
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
            assert asyncio.get_running_loop().time() < deadline, "no broker recorded"
            await asyncio.sleep(0.2)
        assert found.bootstrap == f"127.0.0.1:{port}" and found.owner.pid == proc.pid
        assert found.source == "replay"
        # the record is written as the broker is spawned (a start cut short leaves it for the
        # next one to stop), before it listens
        while not accepts_connections("127.0.0.1", port):
            assert proc.poll() is None, proc.communicate()[0].decode(errors="replace")
            assert asyncio.get_running_loop().time() < deadline, "the broker never listened"
            await asyncio.sleep(0.05)
        consumer = AIOKafkaConsumer(MARKET_TOPIC, bootstrap_servers=found.bootstrap,
                                    group_id=None, auto_offset_reset="earliest",
                                    metadata_max_age_ms=500)
        await consumer.start()
        try:
            values = 0
            while values < 10:
                assert asyncio.get_running_loop().time() < deadline, values
                batch = await consumer.getmany(timeout_ms=500)
                values += sum(len(records) for records in batch.values())
        finally:
            await consumer.stop()
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
        assert proc.returncode == 0, out.decode(errors="replace")
        assert not record.exists() and recorded_broker(record) is None
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# ``shardex feed`` with the recording rewritten (no valid frame left) the moment anything opens
# it a second time: another writer changing the file between two reads of it
_REWRITTEN_ON_A_SECOND_OPEN = """
import sys
path = sys.argv[1]
opened = []
def hook(event, args):
    if event == "open" and args and str(args[0]) == path:
        opened.append(1)
        if len(opened) == 2:
            with open(path, "w") as fh:
                fh.write("not a frame\\n")
sys.addaudithook(hook)
from cluster.cli import main
sys.exit(main(["feed"]))
"""


@pytest.mark.timeout(60)
def test_feed_service_reads_the_recording_once(tmp_path: Path) -> None:
    """``shardex feed`` made its source twice: once to check FEED_SOURCE, once to play it, each
    reading the whole recording. A recording changed in between (here: no valid frame left)
    ended the run in a traceback. The source checked is the one played, from one open of the
    file: every frame of the recording as it was is published and the run ends cleanly."""
    recording = tmp_path / "rec.jsonl"
    recording.write_bytes(FIXTURE.read_bytes())
    with EmbeddedBroker("127.0.0.1", free_port(), trim={}) as broker:
        env = {**os.environ, "KAFKA_BROKERS": broker.bootstrap, "PYTHONPATH": str(ROOT),
               "FEED_SOURCE": f"replay:{recording}?speed=0", "DATA_DIR": str(tmp_path)}
        done = subprocess.run([sys.executable, "-c", _REWRITTEN_ON_A_SECOND_OPEN,
                               str(recording)], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=45)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert "'published': 13," in done.stderr, done.stderr
    assert recording.read_bytes() == FIXTURE.read_bytes()  # opened once: never rewritten
