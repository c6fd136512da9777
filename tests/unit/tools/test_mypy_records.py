"""tools/mypy_records.py: mypy sees engine.schema.record's classes as the NamedTuples they are
at run time (their fields, types and defaults from the schema), not as Any, and
cluster.http.api.api_model's as the pydantic models they are."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest
from mypy import api

ROOT = Path(__file__).resolve().parents[3]

SNIPPET = '''\
from engine.events import SettlementApplied
from engine.messages import OpenPosition
from engine.orders import Side

def side_of(p: OpenPosition) -> Side:
    return p.side

def asset_of(p: OpenPosition) -> int:
    return p.asset

p = OpenPosition(1, 2, "SOL", Side.LONG, 3, 4, 5, 6, 7, 0, 0, 8, None)
reveal_type(p.unrealized_pnl_micros)
reveal_type(p._replace(owner=3))
SettlementApplied("SOL-0", 1)
p.no_such_field

from engine import schema
NAMES = ("owner",)
Odd = schema.record("Odd", schema.IDENTITY, __name__, "", zero_default=NAMES)
'''


API_SNIPPET = '''\
from pydantic import BaseModel
from cluster.http.api import PositionOut, api_model
from engine import schema

class Page(BaseModel):
    positions: list[PositionOut]

Mine = api_model("Mine", schema.API_ORDER)
reveal_type(Mine.model_fields)
model: type[BaseModel] = Mine
count: int = PositionOut
'''


@pytest.fixture(scope="module")
def messages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[list[str], int]]:
    """mypy's messages about each snippet (with this project's plugin) and the exit status of
    its run: one run over both, as analysing what they import takes most of its time."""
    tmp_path = tmp_path_factory.mktemp("mypy")
    (tmp_path / "mypy.ini").write_text(textwrap.dedent(f"""\
        [mypy]
        plugins = {ROOT / "tools" / "mypy_records.py"}
        mypy_path = {ROOT}
        ignore_missing_imports = true
        follow_imports = silent
        """))
    snippets = {"records": SNIPPET, "models": API_SNIPPET}
    for name, snippet in snippets.items():
        (tmp_path / f"{name}.py").write_text(snippet)
    out, err, status = api.run([*(str(tmp_path / f"{name}.py") for name in snippets),
                                "--config-file", str(tmp_path / "mypy.ini"), "--cache-dir",
                                str(tmp_path / "cache"), "--no-error-summary"])
    assert err == "", err
    return {name: ([line.removeprefix(f"{tmp_path / name}.py:") for line in out.splitlines()
                    if line.startswith(f"{tmp_path / name}.py:")], status)
            for name in snippets}


def test_mypy_types_a_record_from_its_schema_group(
        messages: dict[str, tuple[list[str], int]]) -> None:
    lines, status = messages["records"]
    assert status == 1
    assert lines == [
        '9: error: Incompatible return value type (got "str", expected "int")  [return-value]',
        '12: note: Revealed type is "int | None"',
        '13: note: Revealed type is "tuple[int, int, str, engine.orders.Side, int, int, int, '
        'int, int, int, int, int, int | None, fallback=engine.messages.OpenPosition]"',
        '14: error: Missing positional arguments "position_id", "owner", "asset", "side", '
        '"entry_ticks", "qty_steps", "margin_micros", "leverage", "liq_ticks", "tp_ticks", '
        '"sl_ticks", "opened_ts_us", "exit_ticks", "pnl_micros", "payout_micros", '
        '"house_micros", "insurance_micros", "reason", "closed_ts_us" in call to '
        '"SettlementApplied"  [call-arg]',
        '15: error: "OpenPosition" has no attribute "no_such_field"  [attr-defined]',
        # options it cannot read from the source are refused, not guessed
        "19: error: schema.record's zero_default must be a tuple of field names  [misc]",
    ], lines


def test_mypy_takes_an_api_model_as_a_pydantic_model(
        messages: dict[str, tuple[list[str], int]]) -> None:
    lines, status = messages["models"]
    assert status == 1
    assert lines == [  # a model in an annotation is valid; a model is not an int
        '9: note: Revealed type is "dict[str, pydantic.fields.FieldInfo]"',
        '11: error: Incompatible types in assignment (expression has type '
        '"type[PositionOut]", variable has type "int")  [assignment]',
    ], lines
