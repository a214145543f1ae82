"""JSON lines as people write them: one object per line, blank lines skipped, and an error that names the file and
line (in the caller's error class, so each command's errors stay its own)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from slmkit.errors import SlmkitError


def json_objects(lines: Iterable[str], path: Path | str, error: type[SlmkitError] = SlmkitError) -> Iterator[tuple[str, dict]]:
    """(where, row) for every non-blank line: where is "PATH:LINE"."""
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise error(f"{where}: not valid JSON ({exc.msg})", "Each line must be one JSON object.") from exc
        if not isinstance(row, dict):
            raise error(f"{where}: expected a JSON object, got {type(row).__name__}", "Each line must be one JSON object.")
        yield where, row
