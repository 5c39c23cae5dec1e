"""What benchmarks write: Markdown tables (the docs quote them) and results JSON, one way for all."""
from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from common import atomic_write


def table(headers: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """A Markdown table, cells already formatted by the caller: header, `|---|` rule, one line per row;
    no trailing newline."""
    lines = [_line(headers), "|" + "---|" * len(headers)]
    lines += [_line(row) for row in rows]
    return "\n".join(lines)


def _line(cells: Sequence[object]) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def write_json(path: Path, obj: object) -> Path:
    """`obj` as indented JSON at `path` (its folder made if missing); returns `path`.

    Written to a temporary file first and renamed over `path`: a bench interrupted while writing
    leaves the previous file whole, and benches reuse what they find there on their next run.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write.write_text(path, json.dumps(obj, indent=2) + "\n")
    return path
