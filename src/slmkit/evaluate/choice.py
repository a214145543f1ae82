"""Run a task: every (context, continuation) pair scored in batches, then lm-evaluation-harness's metrics:
acc and acc_norm for multiple choice, acc and perplexity for LAMBADA-style last-word tasks, each with its stderr,
and accuracy per group (MMLU's subjects) where the task has groups."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from slmkit.engine.backend import TokenScores
from slmkit.engine.scoring import encode_pair
from slmkit.evaluate.batching import score_requests
from slmkit.evaluate.metrics import choice_correct, mean_stderr
from slmkit.evaluate.tasks import Item, TaskSpec, build_items, fewshot_rows, load_task, read_rows
from slmkit.model import Model


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def score_items(model: Model, items: list[Item], description: str) -> tuple[list[TokenScores], list[int]]:
    """Every (context, continuation) pair of every item scored in batches; owners[i] is the item of scores[i]."""
    requests, owners = [], []
    for n, item in enumerate(items):
        for ctx, cont in zip(item.contexts, item.continuations):
            requests.append(encode_pair(model.backend, ctx, cont))
            owners.append(n)
    return score_requests(model.backend, requests, description=description), owners


def evaluate_task(model: Model, task: str | TaskSpec, *, limit: int | None = None, data_dir: Path | None = None) -> dict[str, Any]:
    """Score task `task` (built-in name, YAML file or spec) on `model`; the first `limit` items when given."""
    spec = task if isinstance(task, TaskSpec) else load_task(task, data_dir=data_dir)
    rows = read_rows(spec, data_dir=data_dir)
    items = build_items(spec, rows, limit, fewshot_rows(spec, data_dir=data_dir))
    scores, owners = score_items(model, items, spec.name)
    result: dict[str, Any] = {
        "task": spec.name, "title": spec.title, "source": spec.source,
        "data": str(spec.data) if spec.data else f"dataset {spec.dataset}" + (f" ({spec.split})" if spec.split else ""),
        "format": spec.format, "fewshot": spec.fewshot, "n": len(items), "of": len(rows), "primary": spec.primary,
    }
    if spec.shape == "loglikelihood":  # one continuation per item: is it the greedy one, and its log-likelihood
        accs = [float(s.greedy) for s in scores]
        lls = [sum(s) for s in scores]
        result |= {"acc": _mean(accs), "acc_stderr": mean_stderr(accs),
                   "perplexity": math.exp(-_mean(lls))}  # lm-eval's: exp of the mean per-item negative log-likelihood
        return result
    lls_by_item: list[list[float]] = [[] for _ in items]
    for n, s in zip(owners, scores):
        lls_by_item[n].append(sum(s))
    accs, norms = map(list, zip(*(choice_correct(ll, item.choice_lengths, item.gold) for ll, item in zip(lls_by_item, items))))
    result |= {"acc": _mean(accs), "acc_stderr": mean_stderr(accs)}
    if spec.shape == "choice":  # partial scoring's choices are its contexts; lm-eval reports acc alone there
        result |= {"acc_norm": _mean(norms), "acc_norm_stderr": mean_stderr(norms)}
    if spec.group_by:
        groups: dict[str, list[float]] = defaultdict(list)
        for item, a in zip(items, accs):
            groups[item.group or ""].append(a)
        result["groups"] = {g: {"n": len(v), "acc": _mean(v)} for g, v in sorted(groups.items())}
    return result
