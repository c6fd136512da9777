"""The publisher's queue (cluster.actors.publisher.ProduceQueue): a produce round removes the
messages it produced, never others, even when the queue overflowed while the round was under
way; ``dropped`` counts exactly the messages given up without being produced."""

from __future__ import annotations

from cluster.actors.publisher import ProduceQueue
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st


def _messages(first: int, count: int) -> list[tuple[bytes, bytes]]:
    return [(b"k", str(n).encode()) for n in range(first, first + count)]


def test_a_round_that_overlapped_an_overflow_removes_only_what_it_produced() -> None:
    queue = ProduceQueue(limit=10)
    assert queue.add(_messages(0, 8)) is True  # nothing was waiting: the producer is woken
    first, batch = queue.take(5)
    assert (first, batch) == (0, _messages(0, 5))
    # while 0..4 are produced, 12 more come: the oldest 10 (0..9) are dropped
    assert queue.add(_messages(8, 12)) is False
    assert len(queue) == 10 and queue.dropped == 10
    queue.remove(first, len(batch))
    # 0..4 were produced after all; 5..9 are lost; 10..19 still wait, none taken for produced
    assert queue.dropped == 5
    assert queue.take(100) == (10, _messages(10, 10))


def test_a_failed_round_leaves_its_messages_to_the_next() -> None:
    queue = ProduceQueue(limit=4)
    queue.add(_messages(0, 3))
    assert queue.take(3) == (0, _messages(0, 3))  # a round that fails: nothing is removed
    queue.add(_messages(3, 3))  # 0 and 1 are dropped, never produced
    assert queue.dropped == 2
    assert queue.take(10) == (2, _messages(2, 4))
    queue.remove(2, 4)
    assert len(queue) == 0 and queue.dropped == 2
    assert queue.add(_messages(6, 1)) is True


OPS = st.lists(st.one_of(
    st.tuples(st.just("add"), st.integers(1, 7)),
    st.tuples(st.just("take"), st.integers(1, 6)),
    st.tuples(st.just("produced"), st.just(0)),
    st.tuples(st.just("failed"), st.just(0)),
), max_size=60)


@settings(max_examples=300, deadline=None)
@given(limit=st.integers(1, 8), ops=OPS)
def test_every_message_is_produced_waiting_or_counted_dropped(
        limit: int, ops: list[tuple[str, int]]) -> None:
    """One producer's rounds (take, then produced or failed) among offers of any size, against
    a model of what must wait: every offered message that overflow did not push out waits until
    a round produces it, in the order offered; ``dropped`` counts the ones pushed out and never
    produced."""
    queue = ProduceQueue(limit=limit)
    offered = 0
    waiting: list[int] = []  # the model: numbers waiting, oldest first
    pushed_out: set[int] = set()  # dropped by an overflow, produced or not
    produced: set[int] = set()
    round_: tuple[int, list[tuple[bytes, bytes]]] | None = None
    for op, n in ops:
        if op == "add":
            queue.add(_messages(offered, n))
            waiting += range(offered, offered + n)
            offered += n
            pushed_out.update(waiting[:-limit])
            del waiting[:-limit]
        elif op == "take" and round_ is None:
            round_ = queue.take(n)
            assert [int(v) for _, v in round_[1]] == waiting[:n]
        elif round_ is not None and op in ("produced", "failed"):
            first, batch = round_
            if op == "produced":
                numbers = {int(value) for _, value in batch}
                produced |= numbers
                queue.remove(first, len(batch))
                waiting = [m for m in waiting if m not in numbers]
            round_ = None
        first_waiting, now = queue.take(offered + 1)
        assert [int(value) for _, value in now] == waiting
        assert waiting == [] or first_waiting == waiting[0]
        assert queue.dropped == len(pushed_out - produced)
