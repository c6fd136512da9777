"""The tags of the account topic's messages (cluster.live.topic_auth): only a message signed
with the run's secret, unchanged, verifies; a forged value, another secret, the key and value
swapped or their boundary moved, a cut tag, a missing header all fail."""

from __future__ import annotations

import pytest
from cluster.actors.host import host_specs
from cluster.config import Settings
from cluster.live.topic_auth import MAC_HEADER
from cluster.live.topic_auth import SECRET_BYTES
from cluster.live.topic_auth import TAG_BYTES
from cluster.live.topic_auth import SignedTopic
from cluster.live.topic_auth import authentic
from cluster.live.topic_auth import new_secret
from cluster.live.topic_auth import sign
from cluster.live.topic_auth import verify
from engine.account_events import BALANCE
from engine.account_events import AccountEvent
from engine.account_events import Balance
from engine.ledger_machine import encode_account_events

SECRET = bytes(range(SECRET_BYTES))
[(KEY, VALUE)] = encode_account_events([AccountEvent(17, 3, 40, BALANCE, Balance(5, 0))])
TAG = sign(SECRET, KEY, VALUE)


def test_a_message_signed_with_the_secret_verifies() -> None:
    assert len(TAG) == TAG_BYTES
    assert verify(SECRET, KEY, VALUE, TAG)
    assert authentic(SECRET, KEY, VALUE, [("other", b"x"), (MAC_HEADER, TAG)])


@pytest.mark.parametrize(("key", "value", "tag"), [
    (KEY, VALUE.replace(b'"seq":3', b'"seq":4'), TAG),  # a forged value under a real tag
    (KEY.replace(b"-1", b"-2"), VALUE, TAG),  # another key
    (VALUE, KEY, TAG),  # key and value swapped
    (KEY + VALUE[:1], VALUE[1:], TAG),  # the same bytes, split elsewhere
    (KEY, VALUE, TAG[:16]),  # a cut tag
    (KEY, VALUE, TAG[:-1]),
    (KEY, VALUE, TAG + b"\0"),
    (KEY, VALUE, b""),
    (KEY, VALUE, bytes(TAG_BYTES)),
], ids=["forged value", "other key", "swapped", "boundary moved", "tag cut in half",
        "tag a byte short", "tag a byte long", "no tag", "zero tag"])
def test_a_changed_message_or_tag_fails(key: bytes, value: bytes, tag: bytes) -> None:
    assert not verify(SECRET, key, value, tag)
    assert not authentic(SECRET, key, value, [(MAC_HEADER, tag)])


def test_a_tag_made_with_another_secret_fails() -> None:
    other = new_secret()
    assert len(other) == SECRET_BYTES and other != SECRET
    assert not verify(SECRET, KEY, VALUE, sign(other, KEY, VALUE))
    assert not verify(other, KEY, VALUE, TAG)


@pytest.mark.parametrize("headers", [None, [], [("shardex-mac2", TAG)],
                                     [(MAC_HEADER.upper(), TAG)]],
                         ids=["none", "empty", "another name", "name in capitals"])
def test_a_record_without_the_tag_header_fails(headers: list[tuple[str, bytes]] | None) -> None:
    assert not authentic(SECRET, KEY, VALUE, headers)


def test_a_missing_key_or_value_reads_as_empty() -> None:
    assert authentic(SECRET, None, VALUE, [(MAC_HEADER, sign(SECRET, b"", VALUE))])
    assert authentic(SECRET, KEY, None, [(MAC_HEADER, sign(SECRET, KEY, b""))])
    assert not authentic(SECRET, KEY, None, [(MAC_HEADER, TAG)])


def test_the_ledger_publishes_only_signed_and_its_spec_shows_no_secret() -> None:
    """The ledger's host is built with the secret (Ray restarts it with the same spec); a
    bootstrap without one is refused, and the spec's repr, which logs may show, leaves it out."""
    settings = Settings()
    with pytest.raises(ValueError, match="secret"):
        host_specs(settings, bootstrap="127.0.0.1:9092")
    ledger, shards = host_specs(settings, bootstrap="127.0.0.1:9092", secret=SECRET)
    assert ledger.publish == SignedTopic("127.0.0.1:9092", settings.account_topic, SECRET)
    assert all(spec.publish is None for spec in shards.values())
    assert repr(SECRET) not in repr(ledger) and "secret" not in repr(ledger)


@pytest.mark.parametrize("secret", [b"", bytes(SECRET_BYTES - 1)], ids=["empty", "a byte short"])
def test_a_topic_without_a_whole_secret_is_refused(secret: bytes) -> None:
    """A reader given no secret (the launcher's default before its start makes one) would take
    as the ledger's whatever anyone tagged with that same empty key: no reader or writer of a
    signed topic is built without a secret of SECRET_BYTES."""
    [(_, forged)] = encode_account_events([AccountEvent(17, 3, 40, BALANCE, Balance(10**12, 0))])
    assert authentic(b"", KEY, forged, [(MAC_HEADER, sign(b"", KEY, forged))])
    with pytest.raises(ValueError, match="secret"):
        SignedTopic("127.0.0.1:9092", "shardex-account-events", secret)
    assert SignedTopic("127.0.0.1:9092", "shardex-account-events", SECRET).secret == SECRET
