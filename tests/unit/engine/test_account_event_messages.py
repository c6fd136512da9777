"""Account events as Kafka messages (engine.ledger_machine.encode_account_events /
decode_account_events): every kind survives the round trip exactly, an account's events stay
under one key in order, and what is not an account event is counted, never decoded."""

from __future__ import annotations

import json

import pytest
from engine.account_events import AccountEvent
from engine.account_events import Balance
from engine.ledger_machine import ACCOUNT_KEYS
from engine.ledger_machine import decode_account_events
from engine.ledger_machine import encode_account_events
from engine.messages import EndedOrder
from engine.messages import PendingOrder
from engine.order_book import OrderKind
from engine.order_book import OrderStatus
from engine.orders import Side
from tests.unit.engine.recorded_ledger import NOW
from tests.unit.engine.recorded_ledger import closed
from tests.unit.engine.recorded_ledger import opened

ORDER = PendingOrder(2**34 + 9, 3, "SOL", Side.SHORT, OrderKind.STOP, 9_500, 5_000_000, 7,
                     9_000, 10_000, 0, NOW)
FILLED = EndedOrder(*ORDER, int(OrderStatus.FILLED), 2**34 + 11, NOW + 5, "")


def events() -> list[AccountEvent]:
    """Every kind, for users on different keys (3 and 3 + ACCOUNT_KEYS share one)."""
    bodies = [("balance", Balance(9_990_000_000, 10_000_000)),
              ("positionOpened", opened(3, 2**34 + 5, 10_000_000)),
              ("positionUpdated", opened(3, 2**34 + 5, 12_000_000)),
              ("positionClosed", closed(3, 2**34 + 5, 12_000_000, -1_500_000)),
              ("orderPlaced", ORDER), ("orderFilled", FILLED)]
    out = []
    version = 0
    for user in (3, 4, 3 + ACCOUNT_KEYS):
        for seq, (kind, body) in enumerate(bodies, start=1):
            version += 1
            owned = body if isinstance(body, Balance) else body._replace(owner=user)
            out.append(AccountEvent(user, seq, version, kind, owned))
    return out


def test_every_kind_round_trips_exactly_under_its_accounts_key() -> None:
    sent = events()
    messages = encode_account_events(sent)
    assert {key for key, _ in messages} == {b"accounts-3", b"accounts-4"}
    received = []
    for key, value in messages:
        decoded, malformed = decode_account_events(value)
        assert malformed == 0
        assert {e.user % ACCOUNT_KEYS for e in decoded} == {int(key.split(b"-")[1])}
        received.extend(decoded)
    # per account: the same events in the same order
    for user in (3, 4, 3 + ACCOUNT_KEYS):
        assert [e for e in received if e.user == user] == [e for e in sent if e.user == user]


def test_no_message_passes_kafkas_default_size_limit() -> None:
    """What a restarted ledger publishes, every kept event at once, when one account made them
    all (one key): several messages in order, each under Kafka's default message.max.bytes
    (1 MiB; a larger one is refused by the broker, and the publisher drops it)."""
    sent = [AccountEvent(5, seq, seq, "balance", Balance(10**15 + seq, 10**12))
            for seq in range(1, 20_001)]
    messages = encode_account_events(sent)
    assert all(len(value) < 1 << 20 for _, value in messages)
    assert {key for key, _ in messages} == {b"accounts-5"}
    assert [e for _, value in messages for e in decode_account_events(value)[0]] == sent


def test_nothing_to_send_is_no_message() -> None:
    assert encode_account_events([]) == []


@pytest.mark.parametrize(("value", "malformed"), [
    (b"not json", 1), (b"{}", 1), (b"7", 1), (b"[]", 0),
    (b'[{"kind":"balance","user":1,"seq":1,"version":1,"body":[5,6]}, 3]', 1),
    (b'[{"kind":"boom","user":1,"seq":1,"version":1,"body":[5,6]}]', 1),
    (b'[{"kind":"balance","user":-1,"seq":1,"version":1,"body":[5,6]}]', 1),
    (b'[{"kind":"balance","user":1,"seq":true,"version":1,"body":[5,6]}]', 1),
    (b'[{"kind":"balance","user":1,"seq":1,"version":1,"body":"[5,6]"}]', 1),
    (b'[{"kind":"balance","user":1,"seq":1,"version":1,"body":["x",6]}]', 1),
    (b'[{"kind":"positionOpened","user":1,"seq":1,"version":1,"body":["open",1]}]', 1),
    (b'[{"kind":"balance","user":1,"seq":1,"version":1,"body":[1e400,6]}, 3]', 2),
    (b'[{"kind":"balance","user":1,"seq":1,"version":1,"body":[Infinity,6]}]', 1),
    (b'[{"kind":"balance","user":1,"seq":1,"version":1,"body":[5.5,6]}]', 1),
])
def test_what_is_not_an_account_event_is_counted_and_the_rest_kept(value: bytes,
                                                                   malformed: int) -> None:
    decoded, dropped = decode_account_events(value)
    assert dropped == malformed
    valid = len(json.loads(value)) - malformed if value.startswith(b"[") else 0
    assert len(decoded) == valid
    if valid:
        assert decoded == [AccountEvent(1, 1, 1, "balance", Balance(5, 6))]


def test_nesting_deeper_than_the_parser_recurses_is_counted_not_raised() -> None:
    assert decode_account_events(b"[" * 5_000 + b"]" * 5_000) == ([], 1)
