"""Classification as a prompt and an answer: how a row's text is shown to the model and its label given as the
answer, written once for training (train/data.py), scoring (evaluate/responses.py) and the server.

Two prompt formats: `chat` (the text is the user's turn in the model's chat template, the label the assistant's
whole answer, then the end of the turn) and `plain` (for base models without a template: "TEXT\\nLabel:" and the
label after a space, then the end-of-sequence token). Everything here is pure text; the callers tokenize.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from slmkit.errors import SlmkitError

PROMPT_FORMATS = ("chat", "plain")
CARD_KEY = "classify"  # a classifier's card settings hold {"labels": [...], "prompt_format": ...} under this key
PLAIN_CUE = "Label:"


def plain_prompt(text: str) -> str:
    return f"{text.strip()}\n{PLAIN_CUE}"


def plain_answer(label: str) -> str:
    return f" {label}"


def check_format(prompt_format: str) -> str:
    if prompt_format not in PROMPT_FORMATS:
        raise SlmkitError(f"unknown prompt format {prompt_format!r}", f"Formats: {', '.join(PROMPT_FORMATS)}")
    return prompt_format


def check_labels(labels: list[str]) -> list[str]:
    """The label set in first-seen order, without repeats; at least two, none empty."""
    out = list(dict.fromkeys(str(x).strip() for x in labels))
    if "" in out:
        raise SlmkitError("a label is empty", "Every row needs a non-empty label.")
    if len(out) < 2:
        raise SlmkitError(f"classification needs at least two labels, got {len(out)}: {out}",
                          "Give two or more different labels (rows with them, or --labels a,b).")
    return out


def task_of(settings: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A model card's classification task ({labels, prompt_format}), or None for a generative model."""
    task = (settings or {}).get(CARD_KEY)
    return task if isinstance(task, dict) and task.get("labels") else None


def label_schema(labels: list[str]) -> dict[str, Any]:
    """The JSON schema whose only values are the labels (a json_schema response_format that constrains an answer)."""
    return {"type": "string", "enum": list(labels)}
