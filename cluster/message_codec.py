"""JSON-ready forms of the cluster messages, for snapshots (no pickle on disk).

Every value is a list or dict of ints and strings; ``*_from_json`` rebuilds the exact
NamedTuple. Sides are stored as their int values.
"""

from __future__ import annotations

from typing import Any

from cluster.messages import ClosedPosition, OpenPosition, SettlementItem
from engine.market import Tick
from engine.orders import Side
from engine.results import Code, Rejected


def open_to_json(p: OpenPosition) -> list[Any]:
    return [*p[:3], int(p.side), *p[4:]]


def open_from_json(v: list[Any]) -> OpenPosition:
    return OpenPosition._make([int(v[0]), int(v[1]), str(v[2]), Side(int(v[3])),
                               *(int(x) for x in v[4:12]),
                               None if v[12] is None else int(v[12])])


def closed_to_json(c: ClosedPosition) -> list[Any]:
    return [*c[:3], int(c.side), *c[4:]]


def closed_from_json(v: list[Any]) -> ClosedPosition:
    return ClosedPosition._make([int(v[0]), int(v[1]), str(v[2]), Side(int(v[3])),
                                 *(int(x) for x in v[4:])])


def item_to_json(item: SettlementItem) -> list[Any]:
    return [item.seq, closed_to_json(item.closed)]


def item_from_json(v: list[Any]) -> SettlementItem:
    return SettlementItem(int(v[0]), closed_from_json(v[1]))


def tick_to_json(t: Tick | None) -> list[Any] | None:
    return None if t is None else list(t)


def tick_from_json(v: list[Any] | None) -> Tick | None:
    return None if v is None else Tick(str(v[0]), int(v[1]), int(v[2]), int(v[3]), int(v[4]),
                                       str(v[5]))


def answer_to_json(answer: object) -> dict[str, Any]:
    """A stored clientOrderId answer (or a remembered open result)."""
    if isinstance(answer, OpenPosition):
        return {"open": open_to_json(answer)}
    if isinstance(answer, ClosedPosition):
        return {"closed": closed_to_json(answer)}
    if isinstance(answer, Rejected):
        return {"rejected": [answer.code.value, answer.message]}
    raise TypeError(f"cannot store an answer of type {type(answer).__name__}")


def answer_from_json(v: dict[str, Any]) -> OpenPosition | ClosedPosition | Rejected:
    if "open" in v:
        return open_from_json(v["open"])
    if "closed" in v:
        return closed_from_json(v["closed"])
    code, message = v["rejected"]
    return Rejected(Code(code), str(message))
