"""Prometheus text exposition (format 0.0.4) of ``GET /metrics``.

Each family is written as one group: its ``# HELP`` and ``# TYPE`` lines, then all its samples,
whatever order they were added in (a parser takes a family's later group as another family, of
unknown type). Label values are escaped as the format says (backslash, double quote, newline).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def label_value(value: object) -> str:
    """``value`` as a quoted label value's text: ``\\``, ``"`` and newlines escaped."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _help_text(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


@dataclass
class _Family:
    kind: Literal["counter", "gauge"]
    help: str
    samples: list[str] = field(default_factory=list)


class Exposition:
    """``family(name, kind, help)`` declares a family (its HELP and TYPE lines are written
    even while it has no sample); ``add(name, value, **labels)`` adds one of its samples;
    ``text()`` is the exposition. A counter's name ends in ``_total``."""

    def __init__(self) -> None:
        self._families: dict[str, _Family] = {}

    def family(self, name: str, kind: Literal["counter", "gauge"], help: str) -> None:
        if kind == "counter" and not name.endswith("_total"):
            raise ValueError(f"counter {name} does not end in _total")
        if name in self._families:
            raise ValueError(f"family {name} declared twice")
        self._families[name] = _Family(kind, help)

    def add(self, name: str, value: int | float, **labels: object) -> None:
        shown = ",".join(f'{k}="{label_value(v)}"' for k, v in labels.items())
        self._families[name].samples.append(
            f"{name}{{{shown}}} {value}" if shown else f"{name} {value}")

    def text(self) -> str:
        lines: list[str] = []
        for name, f in self._families.items():
            lines.append(f"# HELP {name} {_help_text(f.help)}")
            lines.append(f"# TYPE {name} {f.kind}")
            lines.extend(f.samples)
        return "\n".join(lines) + "\n"


__all__ = ["CONTENT_TYPE", "Exposition", "label_value"]
