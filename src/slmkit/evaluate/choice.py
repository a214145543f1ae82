"""Run a multiple-choice task: every (context, choice) pair scored in batches, acc and acc_norm with stderr."""

from __future__ import annotations

from typing import Any

from slmkit.engine.scoring import encode_pair
from slmkit.evaluate.batching import score_requests
from slmkit.evaluate.metrics import choice_correct, mean_stderr
from slmkit.evaluate.tasks import build_items, load_task, read_rows
from slmkit.model import Model


def evaluate_task(model: Model, task: str, *, limit: int | None = None) -> dict[str, Any]:
    """Score task `task` (built-in name or YAML file) on `model`; the first `limit` items when given."""
    spec = load_task(task)
    rows = read_rows(spec)
    items = build_items(spec, rows, limit)
    requests, owners = [], []
    for n, item in enumerate(items):
        for ctx, cont in zip(item.contexts, item.continuations):
            requests.append(encode_pair(model.backend, ctx, cont))
            owners.append(n)
    scores = score_requests(model.backend, requests, description=f"{spec.name}")
    lls: list[list[float]] = [[] for _ in items]
    for n, s in zip(owners, scores):
        lls[n].append(sum(s))
    accs, norms = zip(*(choice_correct(ll, item.choice_lengths, item.gold) for ll, item in zip(lls, items)))
    return {
        "task": spec.name,
        "source": str(spec.source),
        "data": str(spec.data),
        "format": spec.format,
        "fewshot": spec.fewshot,
        "n": len(items),
        "of": len(rows),
        "acc": sum(accs) / len(accs),
        "acc_stderr": mean_stderr(accs),
        "acc_norm": sum(norms) / len(norms),
        "acc_norm_stderr": mean_stderr(norms),
    }
