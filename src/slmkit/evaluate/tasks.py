"""Multiple-choice tasks: a small YAML spec (data file, format, prompt, few-shot) and a reader per format.

Every reader turns rows into Items: one context per choice (partial scoring gives several contexts and one
continuation; the usual case gives one context and several continuations). Bad rows fail with their line.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from slmkit.config import settings
from slmkit.errors import SlmkitError

BUILTIN_DIR = Path(__file__).parent / "tasks"


@dataclass(frozen=True)
class Item:
    """One question: score continuations[i] after contexts[i]; `gold` is the right index."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    choice_lengths: list[int]  # characters of each choice, for acc_norm


@dataclass
class TaskSpec:
    """A task as written in its YAML file."""

    name: str
    data: Path
    format: str
    prompt: str = "{query}"
    target_delimiter: str = " "
    fewshot: int = 0
    fewshot_separator: str = "\n\n"
    fewshot_seed: int = 1234
    labels: Path | None = None
    source: Path | None = None  # the YAML file
    extra: dict[str, Any] = field(default_factory=dict)


class TaskError(SlmkitError):
    pass


# ---- readers: raw row -> (query text, choices, gold) or partial form -------------------------------------
def _need(row: dict, key: str, kind: type, where: str) -> Any:
    if key not in row:
        raise TaskError(f"{where}: missing field {key!r}", "Fix the row, or pick the format that matches the file.")
    value = row[key]
    if kind is int and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        value = int(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TaskError(f"{where}: field {key!r} should be {kind.__name__}, got {type(value).__name__}", "Fix the row.")
    return value


def _check_gold(gold: int, n: int, where: str) -> int:
    if not 0 <= gold < n:
        raise TaskError(f"{where}: gold/label {gold} is out of range for {n} choices", "Fix the row.")
    return gold


def _strings(row: dict, key: str, where: str) -> list[str]:
    """A list of at least two strings (the choices, endings or context options of one row)."""
    values = _need(row, key, list, where)
    if len(values) < 2 or not all(isinstance(v, str) for v in values):
        raise TaskError(f"{where}: {key!r} must be a list of at least 2 strings", "Fix the row.")
    return values


def _read_query_choices_gold(row: dict, where: str) -> dict:
    choices = _strings(row, "choices", where)
    return {"query": _need(row, "query", str, where), "choices": choices,
            "gold": _check_gold(_need(row, "gold", int, where), len(choices), where)}


def _read_hellaswag(row: dict, where: str) -> dict:
    endings = _strings(row, "endings", where)
    return {"query": _need(row, "query", str, where), "choices": endings,
            "gold": _check_gold(_need(row, "label", int, where), len(endings), where)}


def _read_piqa(row: dict, where: str) -> dict:
    sols = [_need(row, "sol1", str, where), _need(row, "sol2", str, where)]
    return {"query": _need(row, "goal", str, where), "goal": row["goal"], "choices": sols,
            "gold": _check_gold(_need(row, "label", int, where), 2, where)}


def _read_winogrande(row: dict, where: str) -> dict:
    options = _strings(row, "context_options", where)
    return {"context_options": options, "continuation": _need(row, "continuation", str, where),
            "gold": _check_gold(_need(row, "gold", int, where), len(options), where)}


FORMATS: dict[str, Callable[[dict, str], dict]] = {
    "query_choices_gold": _read_query_choices_gold,  # ARC as shipped in shared/data/arc
    "hellaswag": _read_hellaswag,  # {query, endings, label}
    "piqa": _read_piqa,  # {goal, sol1, sol2} + a labels file (one 0/1 per line)
    "winogrande": _read_winogrande,  # partial scoring {context_options, continuation, gold}
}
PARTIAL_FORMATS = {"winogrande"}


# ---- loading ---------------------------------------------------------------------------------------------
def builtin_tasks() -> dict[str, Path]:
    return {p.stem: p for p in sorted(BUILTIN_DIR.glob("*.yaml"))}


def _resolve(path_text: str, base: Path) -> Path:
    data_dir = settings().data_dir
    if "${data}" in path_text:
        if data_dir is None:
            raise TaskError(
                f"the task data path {path_text!r} needs the shared data folder, which was not found",
                "Set SLMKIT_DATA to the folder holding arc/, wikitext2/, ... (the project's ../shared/data).",
            )
        path_text = path_text.replace("${data}", str(data_dir))
    p = Path(path_text).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


def load_task(name_or_file: str) -> TaskSpec:
    """A built-in task by name (see builtin_tasks()) or a YAML file."""
    path = builtin_tasks().get(name_or_file) or Path(name_or_file).expanduser()
    if not path.is_file():
        raise TaskError(
            f"no task named {name_or_file!r} and no such YAML file",
            f"Built-in tasks: {', '.join(builtin_tasks())}; or give the path of a task YAML file.",
        )
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaskError(f"{path} is not valid YAML: {exc}", "Fix the file.") from exc
    if not isinstance(raw, dict) or "data" not in raw or "format" not in raw:
        raise TaskError(f"{path}: a task needs at least 'data' and 'format'", "See docs/evaluation.md for the fields.")
    if raw["format"] not in FORMATS:
        raise TaskError(f"{path}: unknown format {raw['format']!r}", f"Formats: {', '.join(FORMATS)}")
    known = {"name", "data", "format", "prompt", "target_delimiter", "fewshot", "fewshot_separator", "fewshot_seed", "labels"}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise TaskError(f"{path}: unknown field(s) {', '.join(unknown)}", f"Fields: {', '.join(sorted(known))}")
    base = path.parent
    return TaskSpec(
        name=str(raw.get("name") or path.stem), data=_resolve(str(raw["data"]), base), format=raw["format"],
        prompt=str(raw.get("prompt", "{query}")), target_delimiter=str(raw.get("target_delimiter", " ")),
        fewshot=int(raw.get("fewshot", 0)), fewshot_separator=str(raw.get("fewshot_separator", "\n\n")),
        fewshot_seed=int(raw.get("fewshot_seed", 1234)),
        labels=_resolve(str(raw["labels"]), base) if raw.get("labels") else None, source=path,
    )


def read_rows(spec: TaskSpec) -> list[dict]:
    """Parse and check every row (JSON lines); a bad row fails with its line number and the reason."""
    if not spec.data.is_file():
        raise TaskError(f"task {spec.name}: data file {spec.data} not found", "Fix 'data' in the task file.")
    reader = FORMATS[spec.format]
    lines = spec.data.read_text(encoding="utf-8").splitlines()
    labels: list[str] | None = None
    if spec.format == "piqa":
        if spec.labels is None or not spec.labels.is_file():
            raise TaskError(f"task {spec.name}: the piqa format needs a 'labels' file (one 0/1 per line)", "Add 'labels:'.")
        labels = [x.strip() for x in spec.labels.read_text().splitlines() if x.strip()]
    rows = []
    n = 0
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{spec.data}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise TaskError(f"{where}: not valid JSON ({exc.msg})", "Each line must be one JSON object.") from exc
        if not isinstance(row, dict):
            raise TaskError(f"{where}: expected a JSON object, got {type(row).__name__}", "Each line must be one JSON object.")
        if labels is not None:
            if n >= len(labels):
                raise TaskError(f"{where}: no label for this row ({spec.labels} has {len(labels)} lines)", "Fix the labels file.")
            row = {**row, "label": labels[n]}
        rows.append(reader(row, where))
        n += 1
    if labels is not None and len(labels) != n:
        raise TaskError(f"{spec.labels} has {len(labels)} labels for {n} rows", "Give exactly one label per row.")
    if not rows:
        raise TaskError(f"task {spec.name}: {spec.data} has no rows", "Point 'data' at a non-empty JSON-lines file.")
    return rows


def _render(spec: TaskSpec, row: dict) -> str:
    try:
        return spec.prompt.format(**row)
    except (KeyError, IndexError) as exc:
        raise TaskError(
            f"task {spec.name}: the prompt {spec.prompt!r} uses a field the rows lack: {exc}",
            f"Fields available: {', '.join(k for k in row if isinstance(row[k], str))}",
        ) from exc


def _example(spec: TaskSpec, row: dict) -> str:
    """A solved example for few-shot prompts."""
    if spec.format in PARTIAL_FORMATS:
        return row["context_options"][row["gold"]] + row["continuation"]
    return _render(spec, row) + spec.target_delimiter + row["choices"][row["gold"]]


def build_items(spec: TaskSpec, rows: list[dict], limit: int | None = None) -> list[Item]:
    """Turn rows into scoring items, with `fewshot` solved examples (other rows, fixed seed) in front."""
    chosen = rows[:limit] if limit else rows
    rng = random.Random(spec.fewshot_seed)
    items = []
    for i, row in enumerate(chosen):
        prefix = ""
        if spec.fewshot:
            pool = [j for j in range(len(rows)) if j != i]
            shots = rng.sample(pool, min(spec.fewshot, len(pool)))
            prefix = spec.fewshot_separator.join(_example(spec, rows[j]) for j in shots) + spec.fewshot_separator
        if spec.format in PARTIAL_FORMATS:
            contexts = [prefix + c for c in row["context_options"]]
            conts = [row["continuation"]] * len(contexts)
            lengths = [len(row["continuation"])] * len(contexts)
        else:
            question = prefix + _render(spec, row)
            contexts = [question] * len(row["choices"])
            conts = [spec.target_delimiter + c for c in row["choices"]]
            lengths = [len(c) for c in row["choices"]]
        items.append(Item(contexts=contexts, continuations=conts, gold=row["gold"], choice_lengths=lengths))
    return items
