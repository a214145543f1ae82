"""Row readers: one pure function per data layout, turning a raw row into what is scored. No I/O.

Each reader mirrors lm-evaluation-harness's task code for its dataset (doc_to_text / doc_to_choice / doc_to_target
and any process_docs), and takes the Hub dataset's own schema as well as the JSON-lines layouts people already have
on disk (llm-foundry's `{query, choices, gold}`). A reader returns one of three shapes:

- choice:  {"query": context text, "choices": [str], "gold": int, ...raw fields kept for user prompts}
- partial: {"context_options": [str], "continuation": str, "gold": int}  (one continuation after several contexts)
- loglikelihood: {"context": str, "continuation": str}  (is the continuation the greedy one; its log-likelihood)
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from slmkit.errors import SlmkitError


class TaskError(SlmkitError):
    pass


def need(row: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in row:
        raise TaskError(f"{where}: missing field {key!r}", "Fix the row, or pick the format that matches the file.")
    value = row[key]
    if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise TaskError(f"{where}: field {key!r} should be {names}, got {type(value).__name__}", "Fix the row.")
    return value


def check_gold(gold: int, n: int, where: str) -> int:
    if not 0 <= gold < n:
        raise TaskError(f"{where}: gold/label {gold} is out of range for {n} choices", "Fix the row.")
    return gold


def strings(row: dict, key: str, where: str, *, at_least: int = 2) -> list[str]:
    """A list of at least two strings (the choices, endings or context options of one row)."""
    values = need(row, key, list, where)
    if len(values) < at_least or not all(isinstance(v, str) for v in values):
        raise TaskError(f"{where}: {key!r} must be a list of at least {at_least} strings", "Fix the row.")
    return values


def _labelled_choices(row: dict, where: str, answer_key: str) -> tuple[list[str], int]:
    """The Hub's `choices: {text: [...], label: [...]}` with `answerKey` naming the right label."""
    choices = need(row, "choices", dict, where)
    texts = strings(choices, "text", where)
    labels = strings(choices, "label", where, at_least=len(texts))
    key = need(row, answer_key, str, where).lstrip()
    if key not in labels:
        raise TaskError(f"{where}: {answer_key} {key!r} is not one of the labels {labels}", "Fix the row.")
    return texts, labels.index(key)


def _query_choices_gold(row: dict, where: str) -> dict:
    choices = strings(row, "choices", where)
    return {**row, "query": need(row, "query", str, where), "choices": choices,
            "gold": check_gold(need(row, "gold", int, where), len(choices), where)}


def _arc(row: dict, where: str) -> dict:
    """lm-eval arc_easy / arc_challenge: "Question: {question}\\nAnswer:" (llm-foundry's query already has "Question: ")."""
    if "question" in row:
        texts, gold = _labelled_choices(row, where, "answerKey")
        return {"query": f"Question: {need(row, 'question', str, where)}\nAnswer:", "choices": texts, "gold": gold}
    doc = _query_choices_gold(row, where)
    return {**doc, "query": doc["query"] + "\nAnswer:"}


def hellaswag_preprocess(text: str) -> str:
    """lm-eval's hellaswag `preprocess`: strip, and drop WikiHow's bracketed artifacts."""
    text = text.strip()
    text = text.replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag(row: dict, where: str) -> dict:
    if "ctx_a" in row:  # the Hub's schema, through lm-eval's process_docs
        ctx = need(row, "ctx_a", str, where) + " " + need(row, "ctx_b", str, where).capitalize()
        endings = strings(row, "endings", where)
        return {"query": hellaswag_preprocess(need(row, "activity_label", str, where) + ": " + ctx),
                "choices": [hellaswag_preprocess(e) for e in endings],
                "gold": check_gold(need(row, "label", int, where), len(endings), where)}
    if "endings" in row:  # {query, endings, label}
        endings = strings(row, "endings", where)
        return {"query": need(row, "query", str, where), "choices": endings,
                "gold": check_gold(need(row, "label", int, where), len(endings), where)}
    return _query_choices_gold(row, where)  # already processed, as lm-eval's docs and llm-foundry's file


def _piqa(row: dict, where: str) -> dict:
    """lm-eval piqa: "Question: {goal}\\nAnswer:" with [sol1, sol2]; the label may come from a labels file."""
    goal = need(row, "goal", str, where)
    sols = [need(row, "sol1", str, where), need(row, "sol2", str, where)]
    return {"query": f"Question: {goal}\nAnswer:", "goal": goal, "choices": sols,
            "gold": check_gold(need(row, "label", int, where), 2, where)}


def _winogrande(row: dict, where: str) -> dict:
    """lm-eval winogrande (partial scoring): contexts are the sentence up to the blank with each option filled in;
    the scored continuation is the rest of the sentence, stripped (the target delimiter " " goes in front)."""
    if "sentence" in row:
        sentence = need(row, "sentence", str, where)
        if "_" not in sentence:
            raise TaskError(f"{where}: the sentence has no blank '_'", "Fix the row.")
        idx = sentence.index("_")
        answer = str(need(row, "answer", (str, int), where)).strip()  # the Hub's "1" / "2"
        if answer not in ("1", "2"):
            raise TaskError(f"{where}: answer must be '1' or '2', got {answer!r}", "Fix the row.")
        options = [need(row, "option1", str, where), need(row, "option2", str, where)]
        return {"context_options": [sentence[:idx] + o for o in options], "continuation": sentence[idx + 1:].strip(),
                "gold": int(answer) - 1}
    options = strings(row, "context_options", where)
    return {"context_options": options, "continuation": need(row, "continuation", str, where).strip(),
            "gold": check_gold(need(row, "gold", int, where), len(options), where)}


def _openbookqa(row: dict, where: str) -> dict:
    """lm-eval openbookqa: the question stem alone, the choices' texts."""
    if "question_stem" in row:
        texts, gold = _labelled_choices(row, where, "answerKey")
        return {"query": need(row, "question_stem", str, where), "choices": texts, "gold": gold}
    return _query_choices_gold(row, where)


def _boolq(row: dict, where: str) -> dict:
    """lm-eval boolq: "{passage}\\nQuestion: {question}?\\nAnswer:" with choices no / yes."""
    return {"query": f"{need(row, 'passage', str, where)}\nQuestion: {need(row, 'question', str, where)}?\nAnswer:",
            "choices": ["no", "yes"], "gold": check_gold(need(row, "label", int, where), 2, where)}


def _sciq(row: dict, where: str) -> dict:
    """lm-eval sciq: "{support.lstrip()}\\nQuestion: {question}\\nAnswer:", the right answer last of four."""
    choices = [need(row, k, str, where) for k in ("distractor1", "distractor2", "distractor3", "correct_answer")]
    return {"query": f"{need(row, 'support', str, where).lstrip()}\nQuestion: {need(row, 'question', str, where)}\nAnswer:",
            "choices": choices, "gold": 3}


MMLU_LETTERS = ["A", "B", "C", "D"]


def _mmlu(row: dict, where: str) -> dict:
    """lm-eval mmlu (default): the question, four lettered options, "Answer:", and the letters as choices."""
    options = strings(row, "choices", where, at_least=4)
    if len(options) != 4:
        raise TaskError(f"{where}: MMLU rows have exactly 4 choices, got {len(options)}", "Fix the row.")
    subject = need(row, "subject", str, where)
    lines = [need(row, "question", str, where).strip()] + [f"{k}. {c}" for k, c in zip(MMLU_LETTERS, options)]
    return {"query": "\n".join(lines) + "\nAnswer:", "choices": list(MMLU_LETTERS),
            "gold": check_gold(need(row, "answer", int, where), 4, where), "subject": subject,
            "subject_text": " ".join(subject.split("_"))}


def _lambada(row: dict, where: str) -> dict:
    """lm-eval lambada_openai: everything up to the last space-separated word, then " " + that word."""
    if "text" in row:
        words = need(row, "text", str, where).split(" ")
        if len(words) < 2:
            raise TaskError(f"{where}: the text needs at least two words", "Fix the row.")
        return {"context": " ".join(words[:-1]), "continuation": " " + words[-1]}
    return {"context": need(row, "context", str, where), "continuation": need(row, "continuation", str, where)}


# name -> (reader, shape)
FORMATS: dict[str, tuple[Callable[[dict, str], dict], str]] = {
    "query_choices_gold": (_query_choices_gold, "choice"),  # generic {query, choices, gold}; the task's prompt applies
    "arc": (_arc, "choice"),
    "hellaswag": (_hellaswag, "choice"),
    "piqa": (_piqa, "choice"),  # {goal, sol1, sol2, label}, or a labels file (one 0/1 per line)
    "winogrande": (_winogrande, "partial"),
    "openbookqa": (_openbookqa, "choice"),
    "boolq": (_boolq, "choice"),
    "sciq": (_sciq, "choice"),
    "mmlu": (_mmlu, "choice"),
    "lambada": (_lambada, "loglikelihood"),
}


def reader(fmt: str) -> tuple[Callable[[dict, str], dict], str]:
    try:
        return FORMATS[fmt]
    except KeyError:
        raise TaskError(f"unknown format {fmt!r}", f"Formats: {', '.join(FORMATS)}") from None
