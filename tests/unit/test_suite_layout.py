"""The suite's own layout: pyproject's ``testpaths`` names the test directories one by one (so
that ``tests/unit`` runs first), and a directory left out of that list would never run."""

from __future__ import annotations

import tomllib
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]
ROOT = TESTS.parent


def _testpaths() -> list[str]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    paths: list[str] = config["tool"]["pytest"]["ini_options"]["testpaths"]
    return paths


def test_every_test_file_lies_under_a_directory_pytest_collects() -> None:
    paths = _testpaths()
    collected = {(ROOT / p).resolve() for p in paths}
    files = sorted(TESTS.rglob("test_*.py"))
    assert files, "no test files found"
    missed = [f.relative_to(ROOT) for f in files
              if not any(parent in collected for parent in f.parents)]
    assert missed == [], f"test files outside testpaths {paths}: {missed}"


def test_the_unit_tests_run_first() -> None:
    assert _testpaths()[0] == "tests/unit"
