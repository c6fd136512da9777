"""Messages on a Kafka topic that only the platform may write: each carries an HMAC-SHA256 of
its key and value, keyed with a secret only the platform's processes hold.

Anyone who can produce to the Kafka the platform uses can write to its topics, and an account
event that names an account's next ``seq`` would otherwise be taken as durable (and the real one
dropped as already seen). So the launcher makes a secret of :data:`SECRET_BYTES` at each start
(:func:`new_secret`) and hands it to the ledger's host, which signs what it publishes
(cluster.actors.publisher), and to every API replica, which drops what does not verify
(cluster.live.account_topic): it travels only in Ray's own channels (an actor's and a Serve
deployment's arguments, kept for their restarts), never on the topic. A replayed message of this
run is one the ledger did publish: readers already drop what they have. One HMAC per message,
not per event.
"""

from __future__ import annotations

import hmac
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

SECRET_BYTES = 32
MAC_HEADER = "shardex-mac"  # the Kafka record header that holds a message's tag
TAG_BYTES = 32  # an HMAC-SHA256


@dataclass(frozen=True, slots=True)
class SignedTopic:
    """Where signed messages go: Kafka ``bootstrap``, ``topic``, and the ``secret`` their tags
    are keyed with (left out of the repr: it must not reach a log). A secret shorter than
    :data:`SECRET_BYTES` is refused: a reader keyed with none (b"") would verify any tag that
    anyone made with the same empty key."""

    bootstrap: str
    topic: str
    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes) or len(self.secret) < SECRET_BYTES:
            raise ValueError(f"a signed topic needs a secret of at least {SECRET_BYTES} bytes")


def new_secret() -> bytes:
    """A fresh secret of :data:`SECRET_BYTES` random bytes."""
    return secrets.token_bytes(SECRET_BYTES)


def sign(secret: bytes, key: bytes, value: bytes) -> bytes:
    """The tag of a message: HMAC-SHA256 (32 bytes) over ``key``'s length (4 bytes, big
    endian), ``key`` and ``value``, so no two (key, value) pairs share their signed bytes."""
    return hmac.digest(secret, len(key).to_bytes(4, "big") + key + value, "sha256")


def verify(secret: bytes, key: bytes, value: bytes, tag: bytes) -> bool:
    """Whether ``tag`` is :func:`sign`'s for this message (compared in constant time)."""
    return len(tag) == TAG_BYTES and hmac.compare_digest(sign(secret, key, value), tag)


def authentic(secret: bytes, key: bytes | None, value: bytes | None,
              headers: Iterable[tuple[str, bytes]] | None) -> bool:
    """Whether a Kafka record (its key, value and headers; a missing key or value read as
    empty) carries, as its first :data:`MAC_HEADER`, a valid tag."""
    tag = next((v for name, v in headers or () if name == MAC_HEADER), None)
    return isinstance(tag, bytes) and verify(secret, key or b"", value or b"", tag)


__all__ = ["MAC_HEADER", "SECRET_BYTES", "TAG_BYTES", "SignedTopic", "authentic", "new_secret",
           "sign", "verify"]
