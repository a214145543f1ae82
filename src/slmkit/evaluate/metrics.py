"""Pure math for evaluation: no models, no I/O."""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence


def mean_stderr(values: Sequence[float]) -> float:
    """Standard error of the mean with the sample (n-1) deviation, as lm-evaluation-harness reports it."""
    n = len(values)
    if n < 2:
        return float("nan")
    mu = sum(values) / n
    var = sum((v - mu) ** 2 for v in values) / (n - 1)
    return math.sqrt(var / n)


def argmax(values: Sequence[float]) -> int:
    """Index of the largest value; the first one on ties (numpy's rule, which lm-evaluation-harness uses)."""
    best = 0
    for i, v in enumerate(values):
        if v > values[best]:
            best = i
    return best


def choice_correct(loglikelihoods: Sequence[float], choice_lengths: Sequence[int], gold: int) -> tuple[float, float]:
    """(acc, acc_norm) for one multiple-choice item: acc_norm divides each log-likelihood by the choice's
    length in characters, as lm-evaluation-harness does."""
    acc = float(argmax(loglikelihoods) == gold)
    normed = [ll / max(n, 1) for ll, n in zip(loglikelihoods, choice_lengths)]
    return acc, float(argmax(normed) == gold)


def sliding_windows(n_tokens: int, context: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows (begin, end, start) over positions 1..n_tokens-1 of a sequence whose position 0 is a prefix.

    Each window feeds ids[begin:end] (at most `context` tokens) and scores positions start..end-1; every
    position from 1 on is scored exactly once, each with up to context-stride tokens of earlier context.
    """
    if context < 2 or not 0 < stride <= context - 1:
        raise ValueError(f"need context >= 2 and 0 < stride < context (got context={context}, stride={stride})")
    windows = []
    scored_to = 1  # next position to score
    while scored_to < n_tokens:
        end = min(scored_to + stride, n_tokens) if windows else min(context, n_tokens)
        begin = max(0, end - context)
        windows.append((begin, end, scored_to))
        scored_to = end
    return windows


def perplexity_from_nll(total_nll: float, n_tokens: int) -> float:
    return math.exp(total_nll / n_tokens) if n_tokens else float("nan")


def bits_per_byte(total_nll: float, n_bytes: int) -> float:
    """Nats over the text converted to bits, per UTF-8 byte: comparable across tokenizers."""
    return total_nll / math.log(2) / n_bytes if n_bytes else float("nan")


def pareto_front(points: Sequence[tuple[float, float]], *, lower_x_better: bool, lower_y_better: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (ties kept)."""

    def better_or_equal(a: float, b: float, lower: bool) -> bool:
        return a <= b if lower else a >= b

    front = []
    for i, (xi, yi) in enumerate(points):
        dominated = any(
            better_or_equal(xj, xi, lower_x_better) and better_or_equal(yj, yi, lower_y_better) and (xj, yj) != (xi, yi)
            for j, (xj, yj) in enumerate(points)
            if j != i
        )
        if not dominated:
            front.append(i)
    return front


_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    return " ".join(_PUNCT.sub(" ", text.lower()).split())


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the answer, normalized (case, punctuation, spaces), is the reference or starts with it as a whole
    word sequence (a model that says "cancel order. ..." for the label cancel_order)."""
    a, r = normalize(answer), normalize(reference)
    return float(bool(r) and (a == r or a.startswith(r + " ")))


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F1 (Google's rouge-score, with stemming)."""
    from rouge_score import rouge_scorer

    return float(rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True).score(reference, answer)["rougeL"].fmeasure)


def classification_report(predicted: Sequence[str], gold: Sequence[str], labels: Sequence[str] | None = None) -> dict:
    """Accuracy, macro-F1 (the mean of per-class F1 over the classes that occur as gold or predicted, as
    scikit-learn's default does), and per class of `labels` (default: those classes) precision, recall, F1 and
    support; `confusion[gold][predicted]` counts. A class never predicted has precision 0 (zero_division=0)."""
    labels = list(labels) if labels is not None else sorted(set(gold) | set(predicted))
    confusion = {g: {p: 0 for p in labels} for g in labels}
    for p, g in zip(predicted, gold, strict=True):
        confusion.setdefault(g, {q: 0 for q in labels})
        confusion[g][p] = confusion[g].get(p, 0) + 1
    per_class = {}
    for c in labels:
        tp = confusion.get(c, {}).get(c, 0)
        predicted_c = sum(row.get(c, 0) for row in confusion.values())
        support = sum(confusion.get(c, {}).values())
        precision = tp / predicted_c if predicted_c else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[c] = {"precision": precision, "recall": recall, "f1": f1, "support": support}
    correct = [float(p == g) for p, g in zip(predicted, gold)]
    occurring = [c for c in labels if c in set(gold) | set(predicted)]
    return {"accuracy": sum(correct) / len(correct) if correct else float("nan"), "accuracy_stderr": mean_stderr(correct),
            "macro_f1": sum(per_class[c]["f1"] for c in occurring) / len(occurring) if occurring else float("nan"),
            "per_class": per_class, "confusion": confusion, "labels": labels}
