"""`evaluate()`: the one typed entry point behind `slmkit eval` -- runs what was asked and saves the results."""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from slmkit.compress.prune import measured_sparsity
from slmkit.config import settings
from slmkit.evaluate.choice import evaluate_task
from slmkit.evaluate.divergence import divergence
from slmkit.evaluate.perplexity import CONTEXT_LENGTH, STRIDE, perplexity, resolve_text
from slmkit.evaluate.responses import evaluate_responses, response_items
from slmkit.evaluate.results import new_result, save_result
from slmkit.evaluate.speed import measure_speed
from slmkit.evaluate.tasks import data_path, load_task, suite_tasks
from slmkit.model import Model


def evaluate(
    model: Model,
    *,
    ppl: str | None = None,
    tasks: list[str] | None = None,
    suites: list[str] | None = None,
    speed: bool = False,
    kl: Model | None = None,
    kl_text: str | None = None,
    limit: int | None = None,
    context_length: int = CONTEXT_LENGTH,
    stride: int = STRIDE,
    out: Path | None = None,
    data_dir: Path | None = None,
    responses: Path | None = None,
    response_metric: str = "rouge_l",
    response_read: dict[str, Any] | None = None,
    response_labels: list[str] | None = None,
    response_prompt_format: str | None = None,
) -> tuple[dict[str, Any], Path]:
    """Run the requested measurements on `model`; save the result JSON (to `out` and the store's evals folder).

    `suites` add their tasks and a per-suite average of each task's primary metric; `data_dir` is a folder of
    evaluation data to look in first (slmkit.data.locate says where else data comes from)."""
    suites = suites or []
    tasks = list(tasks or [])
    for name in suites:
        tasks += [t for t in suite_tasks(name) if t not in tasks]
    specs = {t: load_task(t, data_dir=data_dir) for t in tasks}  # fail on a bad task name or file before any slow work
    for spec in specs.values():  # ... and on data that is not on this machine (or fetch it now)
        data_path(spec, data_dir=data_dir)
        if spec.fewshot_split:
            data_path(spec, split=spec.fewshot_split, data_dir=data_dir)
    ppl_path = resolve_text(ppl, data_dir=data_dir) if ppl else None
    kl_path = resolve_text(kl_text or ppl or "wikitext2", data_dir=data_dir) if kl is not None else None
    result = new_result(model, {
        "ppl": str(ppl_path) if ppl_path else None, "tasks": tasks, "suites": suites, "speed": speed,
        "kl": kl.name if kl else None,
        "kl_text": str(kl_path) if kl_path else None, "limit": limit, "context_length": context_length, "stride": stride,
        "responses": str(responses) if responses else None, "response_metric": response_metric if responses else None,
    })
    if responses is not None:  # a bad file fails before slow work
        response_items(responses, response_read)
    r = result["results"]
    if ppl_path:
        r["perplexity"] = {"file": str(ppl_path), **perplexity(
            model, ppl_path.read_text(encoding="utf-8"), context_length=context_length, stride=stride, limit=limit)}
    if tasks:
        r["tasks"] = {}
        for spec in specs.values():
            r["tasks"][spec.name] = evaluate_task(model, spec, limit=limit, data_dir=data_dir)
    if suites:
        r["suites"] = {name: suite_summary(r["tasks"], suite_tasks(name)) for name in suites}
    if kl is not None and kl_path is not None:
        r["kl"] = {"file": str(kl_path), **divergence(model, kl, kl_path.read_text(encoding="utf-8"), limit=limit)}
    if responses is not None:
        r["responses"] = evaluate_responses(model, responses, metric=response_metric, limit=limit, read=response_read,
                                            labels=response_labels, prompt_format=response_prompt_format)
    if speed:
        r["speed"] = measure_speed(model)
    if model.backend.name == "torch":  # the real share of zero weights, where pruning left any
        found = measured_sparsity(model.backend.model)
        if found["linear_sparsity"] > 0.001:
            r["sparsity"] = found
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    archived = save_result(result, settings().evals_dir / f"{model.name}-{stamp}.json")
    if out:
        save_result(result, out)
    return result, archived


def primary_metric(task_result: dict[str, Any]) -> str:
    """The metric a suite averages for one task: its primary one, or acc where the task lacks that metric."""
    primary = task_result.get("primary", "acc")
    return primary if primary in task_result else "acc"


def suite_summary(task_results: dict[str, dict[str, Any]], names: tuple[str, ...]) -> dict[str, Any]:
    """Each task's primary metric and their plain average, the way model cards tabulate a suite."""
    per_task = {t: {"metric": primary_metric(task_results[t]), "value": task_results[t][primary_metric(task_results[t])],
                    "n": task_results[t]["n"]} for t in names}
    return {"tasks": per_task, "average": sum(v["value"] for v in per_task.values()) / len(per_task)}


def latest_result_for(name: str) -> Path | None:
    """The newest archived result of model `name`, for `slmkit compare NAME ...`."""
    folder = settings().evals_dir
    if not folder.is_dir():
        return None
    pattern = re.compile(re.escape(name) + r"-\d{8}T\d{6}Z\.json$")
    found = sorted(p for p in folder.iterdir() if pattern.match(p.name))
    return found[-1] if found else None
