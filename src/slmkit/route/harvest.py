"""The flywheel's first half: an escalation log (serve --escalation-log: the requests a router sent to the large
model, with its answers) turned into training rows for the next student, which `slmkit finetune` (or a recipe's
finetune step) reads as they are. Pure: log lines in, rows out."""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any


def harvest(lines: Iterable[str], route: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """(training rows, lines skipped): each escalation's row ({"messages": [...]} or {"text": ...}) once (the same
    request answered again keeps its latest answer), only `route`'s where given; a line that is not a logged
    escalation with a non-empty answer is skipped."""
    rows: dict[str, dict[str, Any]] = {}
    skipped = 0
    for line in lines:
        if not line.strip():
            continue
        try:
            entry = json.loads(line)
            row = entry["row"]
            answer = row["messages"][-1]["content"] if "messages" in row else row["text"]
            ok = isinstance(row, dict) and isinstance(answer, str) and answer.strip()
        except (ValueError, KeyError, TypeError, IndexError):
            ok = False
        if not ok:
            skipped += 1
            continue
        if route is not None and entry.get("route") != route:
            continue
        request = row["messages"][:-1] if "messages" in row else row["text"]
        rows[json.dumps(request, sort_keys=True)] = row
    return list(rows.values()), skipped
