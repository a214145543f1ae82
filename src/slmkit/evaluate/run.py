"""`evaluate()`: the one typed entry point behind `slmkit eval` -- runs what was asked and saves the results."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmkit.config import settings
from slmkit.evaluate.choice import evaluate_task
from slmkit.evaluate.divergence import divergence
from slmkit.evaluate.perplexity import perplexity, resolve_text
from slmkit.evaluate.results import new_result, save_result
from slmkit.evaluate.speed import measure_speed
from slmkit.evaluate.tasks import load_task
from slmkit.model import Model


def evaluate(
    model: Model,
    *,
    ppl: str | None = None,
    tasks: list[str] | None = None,
    speed: bool = False,
    kl: Model | None = None,
    kl_text: str | None = None,
    limit: int | None = None,
    context_length: int = 1024,
    stride: int = 512,
    out: Path | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the requested measurements on `model`; save the result JSON (to `out` and the store's evals folder)."""
    tasks = tasks or []
    for t in tasks:  # fail on a bad task name or file before any slow work
        load_task(t)
    ppl_path = resolve_text(ppl) if ppl else None
    kl_path = resolve_text(kl_text or ppl or "wikitext2") if kl is not None else None
    result = new_result(model, {
        "ppl": str(ppl_path) if ppl_path else None, "tasks": tasks, "speed": speed, "kl": kl.name if kl else None,
        "kl_text": str(kl_path) if kl_path else None, "limit": limit, "context_length": context_length, "stride": stride,
    })
    r = result["results"]
    if ppl_path:
        r["perplexity"] = {"file": str(ppl_path), **perplexity(
            model, ppl_path.read_text(encoding="utf-8"), context_length=context_length, stride=stride, limit=limit)}
    if tasks:
        r["tasks"] = {}
        for t in tasks:
            res = evaluate_task(model, t, limit=limit)
            r["tasks"][res["task"]] = res
    if kl is not None and kl_path is not None:
        r["kl"] = {"file": str(kl_path), **divergence(model, kl, kl_path.read_text(encoding="utf-8"), limit=limit)}
    if speed:
        r["speed"] = measure_speed(model)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    archived = save_result(result, settings().evals_dir / f"{model.name}-{stamp}.json")
    if out:
        save_result(result, out)
    return result, archived


def latest_result_for(name: str) -> Path | None:
    """The newest archived result of model `name`, for `slmkit compare NAME ...`."""
    folder = settings().evals_dir
    if not folder.is_dir():
        return None
    pattern = re.compile(re.escape(name) + r"-\d{8}T\d{6}Z\.json$")
    found = sorted(p for p in folder.iterdir() if pattern.match(p.name))
    return found[-1] if found else None
