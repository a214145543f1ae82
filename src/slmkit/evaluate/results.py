"""Evaluation results as versioned JSON: model, lineage, settings, environment, and the numbers."""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import asdict
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmkit.errors import SlmkitError
from slmkit.version import __version__

SCHEMA = "slmkit.eval/1"


def environment() -> dict[str, Any]:
    import torch
    import transformers

    return {
        "slmkit": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
        "transformers": transformers.__version__, "platform": platform.platform(), "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }


def new_result(model: Any, settings: dict[str, Any]) -> dict[str, Any]:
    card = model.card
    return {
        "schema": SCHEMA,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "model": {"name": model.name, "backend": model.backend.name, "card": asdict(card) if card else None},
        "settings": settings,
        "environment": environment(),
        "results": {},
    }


def save_result(result: dict[str, Any], path: Path) -> Path:
    """Write atomically (temporary file, then rename), so a crash never leaves half a results file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(result, indent=2, default=float) + "\n")
    os.replace(tmp, path)
    return path


def load_result(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise SlmkitError(f"cannot read results file {path}: {exc}", "Give a JSON file written by slmkit eval.") from exc
    if not isinstance(data, dict) or data.get("schema", "").split("/")[0] != SCHEMA.split("/")[0]:
        raise SlmkitError(f"{path} is not an slmkit eval result (schema {data.get('schema') if isinstance(data, dict) else None!r})",
                          "Give a JSON file written by slmkit eval.")
    return data
