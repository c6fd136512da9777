"""A LedgerMachine stepped the way the durable runner steps it, and the SOL longs the ledger
tests open and settle; shared by the ledger machine's tests. Amounts are in micros."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from engine.events import encode_batch
from engine.ledger import AuditDifference
from engine.ledger_machine import DEFAULT_MAX_OPEN_POSITIONS
from engine.ledger_machine import Audit
from engine.ledger_machine import Balances
from engine.ledger_machine import CreateAccount
from engine.ledger_machine import CreatedAccount
from engine.ledger_machine import LedgerMachine
from engine.ledger_machine import hash_api_key
from engine.machine import step
from engine.messages import ClosedPosition
from engine.messages import OpenPosition
from engine.messages import SettlementItem
from engine.orders import CloseReason
from engine.orders import Side

USD = 10**6
SIGNUP = 10_000 * USD
NOW = 1_800_000_000_000_000
SHARD = "shard-SOL-0"


def closed(owner: int, position_id: int, margin: int, pnl: int,
           reason: CloseReason = CloseReason.MANUAL) -> ClosedPosition:
    """A SOL long closed with ``pnl``; a liquidation pays nothing out."""
    payout = 0 if reason == CloseReason.LIQUIDATION else max(0, margin + pnl)
    return ClosedPosition(position_id, owner, "SOL", Side.LONG, 10000, 100, margin, 10, 9000, 0,
                          0, 1, 10000, pnl, payout, -pnl, margin + pnl - payout, int(reason), 2,
                          position_id, 0)


def opened(owner: int, position_id: int, margin: int) -> OpenPosition:
    return OpenPosition(position_id, owner, "SOL", Side.LONG, 10001, 299, margin, 10, 9000, 0, 0,
                        NOW, None)


class Recorded:
    """A LedgerMachine stepped like the durable runner does it: every command's events are
    one journal record (``records``); ``check()`` holds after every step."""

    def __init__(self, max_open_positions: int = DEFAULT_MAX_OPEN_POSITIONS,
                 **config: int) -> None:
        self.config = config  # LedgerMachine's keyword arguments
        self.m = LedgerMachine(SIGNUP, max_open_positions, **config)
        self.records: list[bytes] = []
        self.now_us = NOW
        self.accounts = 0

    def __call__(self, command: Any, now_us: int | None = None) -> Any:
        stepped = step(self.m, command, self.now_us if now_us is None else now_us)
        if stepped.encoded:
            self.records.append(encode_batch(stepped.encoded))
        assert self.m.check() == []
        return stepped.answer

    def account(self) -> CreatedAccount:
        """A new account; the n-th one's API key is ``key-n``."""
        self.accounts += 1
        created = self(CreateAccount(f"acc_{self.accounts:024x}",
                                     hash_api_key(f"key-{self.accounts}")))
        assert isinstance(created, CreatedAccount)
        return created

    def balances(self, user: int) -> tuple[int, int]:
        answer: tuple[int, int] = self(Balances(user))
        return answer

    def audit(self, open_margins: dict[int, int],
              unsettled: dict[str, list[SettlementItem]] | None = None
              ) -> list[AuditDifference]:
        problems: list[AuditDifference] = self(Audit(open_margins, unsettled))
        return problems

    def replayed(self, base: LedgerMachine | None = None, start: int = 0) -> LedgerMachine:
        """A machine rebuilt from ``base`` (fresh when None) plus ``records[start:]``."""
        again = base if base is not None else LedgerMachine(SIGNUP, self.m.max_open_positions,
                                                            **self.config)
        for record in self.records[start:]:
            again.apply_batch(again.decode_record(record))
        return again

    def restarted(self) -> LedgerMachine:
        """What a restart recovers (from the journal alone); equal to the live state."""
        again = self.replayed()
        assert again.fingerprint() == self.m.fingerprint()
        self.m = again
        return again


def one_account(max_open_positions: int = DEFAULT_MAX_OPEN_POSITIONS) -> tuple[Recorded, int]:
    """A fresh Recorded ledger with one account, and that account's user id."""
    led = Recorded(max_open_positions)
    return led, led.account().user


def snapshot_round_trip(m: LedgerMachine) -> LedgerMachine:
    """snapshot -> (JSON meta, as a snapshot file stores it) -> from_snapshot."""
    arrays, meta = m.snapshot()
    meta = json.loads(json.dumps(meta))
    return LedgerMachine.from_snapshot(SIGNUP, m.max_open_positions,
                                       {k: v.copy() for k, v in arrays.items()}, meta)


def older_answers_layout(arrays: dict[str, np.ndarray], meta: dict[str, Any]
                         ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """A snapshot as releases before the answers table wrote it: every answer in the meta's
    ``answers`` (the pending, then the answered in answer order, each with its text)."""
    lines = bytes(arrays["answers"]).decode().split("\n")[:-1]
    entries = [json.loads(line) for line in lines[0::2]]
    answered = [[u, kind, c, text, ts_us, asked] for (u, kind, c, ts_us, asked), text
                in zip(entries, lines[1::2], strict=True)][meta["answer_log"]["dropped"]:]
    older = {k: v for k, v in meta.items() if k not in ("answer_log", "pending_answers")}
    older["answers"] = [*meta["pending_answers"], *answered]
    return {k: v for k, v in arrays.items() if k != "answers"}, json.loads(json.dumps(older))
