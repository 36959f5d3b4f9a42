"""The one Markdown table writer of the benchmark scripts (each script keeps its own number format).

    markdown_table(rows, cell=lambda key, value: f"{value:.1f}")

Scripts run as ``python benchmarks/x.py``, so this folder is on ``sys.path`` and ``from _markdown import``
works without installing anything (also in the peer's own virtual environment).
"""
from __future__ import annotations

from typing import Any, Callable


def markdown_table(rows: list[dict], cell: Callable[[str, Any], str], right_align: bool = False) -> str:
    """Rows (dicts; the columns are every key, in first-seen order; a missing value is blank) -> a Markdown
    table. ``cell(key, value)`` formats a value; ``right_align`` right-aligns every column but the first."""
    keys = list(dict.fromkeys(k for row in rows for k in row))
    rule = "|---|" + "---:|" * (len(keys) - 1) if right_align else "|" + "---|" * len(keys)
    lines = ["| " + " | ".join(keys) + " |", rule]
    for row in rows:
        lines.append("| " + " | ".join(cell(k, row[k]) if k in row else "" for k in keys) + " |")
    return "\n".join(lines)
