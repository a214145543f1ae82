"""Labelled dev sets for calibration, and how right an answer is.

- Multiple choice: any evaluation task (`arc_easy`, a YAML task): each model picks the choice with the best
  length-normalized log-likelihood (acc_norm); right or wrong. The small model's confidence is the probability of
  its pick among the choices (softmax of their log-likelihoods).
- Question answering: JSON lines or CSV rows of a prompt and a reference answer (`{prompt|question|instruction,
  answer|reference|label|response|output}`, or chosen CSV columns); both models answer with their chat template,
  greedily; quality is exact match after normalization (labels such as intents) or ROUGE-L F1 (free answers).
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from slmkit.data.jsonl import json_objects
from slmkit.evaluate.metrics import exact_match, rouge_l
from slmkit.errors import SlmkitError

PROMPT_FIELDS = ("prompt", "question", "instruction", "input", "query")
ANSWER_FIELDS = ("answer", "reference", "label", "response", "output", "intent")
METRICS = ("exact", "rouge")


class DevSetError(SlmkitError):
    pass


@dataclass(frozen=True)
class QAItem:
    prompt: str
    reference: str


def _pick(row: dict, names: tuple[str, ...], chosen: str | None, what: str, where: str) -> str:
    if chosen:
        value = row.get(chosen)
        if not isinstance(value, str) or not value.strip():
            raise DevSetError(f"{where}: no {what} in column {chosen!r}", f"Columns here: {', '.join(map(str, row))}.")
        return value
    for n in names:
        if isinstance(row.get(n), str) and row[n].strip():
            return row[n]
    if what == "answer":
        raise DevSetError(f"{where}: the row has no reference answer or label ({', '.join(names)}): a dev set needs labels",
                          "Add the expected answer to every row, or name its column with --answer-column.")
    raise DevSetError(f"{where}: the row has no prompt ({', '.join(names)})", "Name its column with --prompt-column.")


def read_qa(path: Path, *, prompt_column: str | None = None, answer_column: str | None = None, limit: int | None = None) -> list[QAItem]:
    path = Path(path)
    if not path.is_file():
        raise DevSetError(f"dev set {path} not found", "Give a JSON lines or CSV file of prompts with reference answers.")
    rows: list[tuple[str, dict]] = []
    if path.suffix.lower() == ".csv":
        with path.open(encoding="utf-8", newline="") as f:
            rows = [(f"{path}:{i + 2}", r) for i, r in enumerate(csv.DictReader(f))]
    else:
        rows = list(json_objects(path.read_text(encoding="utf-8").splitlines(), path, DevSetError))
    items = [QAItem(_pick(r, PROMPT_FIELDS, prompt_column, "prompt", w), _pick(r, ANSWER_FIELDS, answer_column, "answer", w))
             for w, r in rows[: limit or None]]
    if len(items) < 2:
        raise DevSetError(f"{path} holds {len(items)} usable rows", "Calibration needs a dev set of at least a few dozen labelled prompts.")
    return items


def quality(metric: str, answer: str, reference: str) -> float:
    if metric not in METRICS:
        raise DevSetError(f"unknown quality metric {metric!r}", f"Metrics: {', '.join(METRICS)}.")
    return exact_match(answer, reference) if metric == "exact" else rouge_l(answer, reference)
