"""A WebSocket connection's queue of unsent frames (cluster.live.streams.Connection): a
stream's newest value replaces its unsent one in place, so a client that falls behind gets the
newest top of book and candle, never a backlog; frames that are events (a closed candle, an
account event, an error) are each sent once, in order, and are what can fill the queue."""

from __future__ import annotations

import asyncio

from cluster.live.streams import Connection


def connection(limit: int) -> Connection:
    return Connection(socket=None, address="127.0.0.1", limit=limit)  # type: ignore[arg-type]


def unsent(conn: Connection) -> list[str]:
    async def drain() -> list[str]:
        return [await conn.next_frame() for _ in range(conn.queue.qsize())]

    return asyncio.run(drain())


def test_a_slow_reader_gets_each_streams_newest_value_in_the_place_of_its_first_unsent() -> None:
    conn = connection(limit=3)
    for i in range(1_000):  # far more than the limit: no backlog, the connection stays
        conn.offer(f"sol {i}", newest_of="bookTicker.SOL")
        conn.offer(f"btc {i}", newest_of="bookTicker.BTC")
    conn.offer("an error", None)
    assert conn.closing is None
    assert unsent(conn) == ["sol 999", "btc 999", "an error"]
    conn.offer("sol 1000", newest_of="bookTicker.SOL")  # sent: a new place at the end
    assert unsent(conn) == ["sol 1000"]


def test_a_closed_candle_comes_after_the_value_it_closes_and_before_the_next() -> None:
    conn = connection(limit=10)
    stream = "kline.1m.SOL"
    conn.offer("12:00 at 100", newest_of=stream)
    conn.offer("12:00 at 101", newest_of=stream)
    conn.offer("12:00 closed at 101", ends=stream)
    conn.offer("12:01 at 102", newest_of=stream)
    conn.offer("12:01 at 103", newest_of=stream)
    assert unsent(conn) == ["12:00 at 101", "12:00 closed at 101", "12:01 at 103"]


def test_events_fill_the_queue_and_close_the_connection_as_too_slow() -> None:
    conn = connection(limit=2)
    conn.offer("event 1")
    conn.offer("price", newest_of="bookTicker.SOL")
    conn.offer("price again", newest_of="bookTicker.SOL")  # in place: still room for none
    assert conn.closing is None
    conn.offer("event 2")
    assert conn.closing == "slow"
    conn.offer("event 3")  # a closing connection takes nothing more
    assert conn.queue.qsize() == 2


def test_a_stopping_connection_sends_what_is_queued_then_ends_with_1001() -> None:
    conn = connection(limit=2)
    conn.offer("event 1")
    conn.offer("price", newest_of="bookTicker.SOL")
    conn.finish()  # the end goes after them, past the queue's bound
    conn.offer("event 2")  # a stopping connection takes nothing more
    conn.close("slow")  # and stays a stop: its close frame says the server is going away
    assert conn.closing == "stopping" and conn.close_code == 1001
    assert unsent(conn) == ["event 1", "price", None]
