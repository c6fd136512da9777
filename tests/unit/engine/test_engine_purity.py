"""The engine package stays pure: numpy and the standard library only, no clock reads, and
unit tests cannot start Ray."""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ENGINE = Path(__file__).resolve().parents[3] / "engine"
CLOCK_CALLS = {"time", "monotonic", "perf_counter", "time_ns", "monotonic_ns", "now", "utcnow",
               "today", "perf_counter_ns"}


def engine_modules() -> list[Path]:
    return sorted(ENGINE.glob("*.py"))


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: p.name)
def test_engine_imports_only_numpy_and_the_standard_library(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            roots = [alias.name.split(".")[0] for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots = [node.module.split(".")[0]]
        else:
            continue
        for root in roots:
            assert root in sys.stdlib_module_names or root in ("numpy", "engine"), \
                f"{path.name} imports {root}"
            assert root not in ("time", "datetime"), f"{path.name} imports a clock ({root})"


@pytest.mark.parametrize("path", engine_modules(), ids=lambda p: p.name)
def test_engine_reads_no_clock(path: Path) -> None:
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                and node.value.id in ("time", "datetime", "date") and node.attr in CLOCK_CALLS:
            raise AssertionError(f"{path.name}:{node.lineno} reads a clock")


def test_ray_init_raises_in_unit_tests() -> None:
    import ray

    with pytest.raises(RuntimeError, match="unit test"):
        ray.init()
