"""Answers to held-out prompts, scored against their reference responses: what fine-tuning is for.

Rows are what `slmkit finetune` reads (chat `{messages}`, Alpaca `{instruction, input, output}`, CSV with a prompt and
a response column): the last assistant turn is the reference, the turns before it the prompt. For each row the model
answers greedily with its chat template; the answer is scored by ROUGE-L F1 (free responses) or exact match after
normalization (labels such as intents); and the reference itself is scored under the model: the perplexity of the
responses given their prompts (the quantity fine-tuning lowers)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

from slmkit import progress
from slmkit.data.classify import task_of
from slmkit.errors import SlmkitError
from slmkit.evaluate.metrics import classification_report, exact_match, mean_stderr, rouge_l
from slmkit.model import Model, encode_chat

METRICS = {"rouge_l": rouge_l, "exact_match": exact_match}
LABEL_METRIC = "accuracy"  # the references are labels: the answer is the likeliest of them (always a valid label)
MAX_TOKENS = 128


def response_items(path: Path, read: dict[str, Any] | None = None) -> list[tuple[list[dict[str, str]], str]]:
    """(prompt messages, reference response) per row."""
    from slmkit.train.data import read_examples

    items = []
    for ex in read_examples(Path(path), **(read or {})):
        last = max((i for i, (role, _) in enumerate(ex.messages) if role == "assistant"), default=None)
        if last is None:
            raise SlmkitError(f"{path}: a row has no response to compare with (plain text?)",
                              "Give chat {messages}, Alpaca {instruction, input, output} rows, or CSV with --prompt-column and --response-column.")
        items.append(([{"role": r, "content": c} for r, c in ex.messages[:last]], ex.messages[last][1]))
    return items


def evaluate_labels(model: Model, items: list[tuple[list[dict[str, str]], str]], labels: list[str] | None = None,
                    prompt_format: str | None = None) -> dict[str, Any]:
    """Classification: each row's answer is the likeliest label (Model.classify) of `labels` (default: the labels the
    model was fine-tuned on, else every reference in the file); accuracy, macro-F1, per-class precision/recall/F1,
    the confusion matrix, and classifications per second."""
    references = {ref for _, ref in items}
    is_classifier = task_of(model.card.settings if model.card else None) is not None
    labels, fmt = model.label_task(labels or (None if is_classifier else sorted(references)), prompt_format)
    unknown = sorted(references - set(labels))
    if unknown:
        raise SlmkitError(f"references outside the label set: {', '.join(unknown[:5])}",
                          "Give --labels with every label, or a file whose references are the model's labels.")
    predicted = []
    start = time.perf_counter()
    with progress.bar(f"labels on {model.name}", len(items)) as advance:
        for prompt, _ in items:
            predicted.append(model.classify(prompt, labels, fmt).label)
            advance(1)
    seconds = time.perf_counter() - start
    return {"n": len(items), "metric": LABEL_METRIC, "prompt_format": fmt, "seconds": seconds,
            "classifications_per_s": len(items) / seconds if seconds > 0 else None,
            **classification_report(predicted, [ref for _, ref in items], labels),
            "predicted": predicted, "gold": [ref for _, ref in items]}  # per row, in the file's order


def evaluate_responses(model: Model, path: Path, *, metric: str = "rouge_l", limit: int | None = None,
                       max_tokens: int = MAX_TOKENS, read: dict[str, Any] | None = None,
                       labels: list[str] | None = None, prompt_format: str | None = None) -> dict[str, Any]:
    if metric not in (*METRICS, LABEL_METRIC):
        raise SlmkitError(f"unknown response metric {metric!r}", f"Metrics: {', '.join((*METRICS, LABEL_METRIC))}")
    items = response_items(path, read)[: limit or None]
    if metric == LABEL_METRIC:
        return {"file": str(path), **evaluate_labels(model, items, labels, prompt_format)}
    b = model.backend
    scores, nll, n_tokens = [], 0.0, 0
    with progress.bar(f"responses on {model.name}", len(items)) as advance:
        for prompt, reference in items:
            answer = model.chat(prompt, temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.0)
            scores.append(METRICS[metric](answer, reference))
            ids = encode_chat(b, prompt)
            ref = b.encode(reference, add_special_tokens=False)[: max(1, b.context_length - len(ids))]
            lps = b.score_batch([(ids + ref, len(ids))])[0]
            nll -= sum(lps)
            n_tokens += len(lps)
            advance(1)
    return {"file": str(path), "n": len(items), "metric": metric, metric: sum(scores) / len(scores),
            f"{metric}_stderr": mean_stderr(scores), "response_perplexity": math.exp(nll / max(1, n_tokens)),
            "response_tokens": n_tokens, "max_tokens": max_tokens}
