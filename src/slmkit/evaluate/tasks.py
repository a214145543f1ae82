"""Tasks: the built-in suite (lm-evaluation-harness's prompts on the datasets of slmkit.data), task YAML files of
the user's own, and how rows become scoring items (few-shot examples and descriptions in front).

Every item is one context per choice (partial scoring gives several contexts and one continuation; the usual case
one context and several continuations). Bad rows fail with their line.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import yaml

from slmkit.config import settings
from slmkit.data.catalog import get_dataset
from slmkit.data.locate import locate
from slmkit.data.jsonl import json_objects
from slmkit.evaluate.formats import TaskError, reader

__all__ = ["Item", "TaskSpec", "TaskError", "BUILTIN", "SUITES", "MMLU_SUBJECTS", "load_task", "read_rows",
           "fewshot_rows", "build_items", "suite_tasks", "task_names"]


@dataclass(frozen=True)
class Item:
    """One question: score continuations[i] after contexts[i]; `gold` is the right index."""

    contexts: list[str]
    continuations: list[str]
    gold: int
    choice_lengths: list[int]  # characters of each choice, for acc_norm
    group: str | None = None  # the row's value of TaskSpec.group_by (an MMLU subject)


@dataclass(frozen=True)
class TaskSpec:
    """A task: where its rows come from, how they read, and how they are prompted."""

    name: str
    format: str  # a reader in evaluate/formats.py
    data: Path | None = None  # an explicit JSON-lines file ...
    dataset: str | None = None  # ... or a dataset of slmkit.data.catalog, found by slmkit.data.locate
    split: str | None = None  # the dataset's split (default: its first)
    prompt: str = "{query}"  # formatted with the read row (the built-in readers already give lm-eval's text as query)
    target_delimiter: str = " "
    fewshot: int = 0
    fewshot_separator: str = "\n\n"
    fewshot_seed: int = 1234  # few-shot examples drawn at random from the other rows ...
    fewshot_split: str | None = None  # ... or the first n of this split, of the same group (lm-eval's first_n)
    description: str = ""  # in front of everything, formatted with the row (MMLU: "... about {subject_text}.\n\n")
    subset: tuple[tuple[str, str], ...] = ()  # keep only rows whose field equals the value
    group_by: str | None = None  # also report accuracy per value of this field (MMLU: subject)
    primary: str = "acc_norm"  # the metric a suite averages
    labels: Path | None = None
    source: str = "built-in"  # the YAML file, or built-in
    title: str = ""

    @property
    def shape(self) -> str:
        return reader(self.format)[1]


MMLU_SUBJECTS = (
    "abstract_algebra anatomy astronomy business_ethics clinical_knowledge college_biology college_chemistry "
    "college_computer_science college_mathematics college_medicine college_physics computer_security conceptual_physics "
    "econometrics electrical_engineering elementary_mathematics formal_logic global_facts high_school_biology "
    "high_school_chemistry high_school_computer_science high_school_european_history high_school_geography "
    "high_school_government_and_politics high_school_macroeconomics high_school_mathematics high_school_microeconomics "
    "high_school_physics high_school_psychology high_school_statistics high_school_us_history high_school_world_history "
    "human_aging human_sexuality international_law jurisprudence logical_fallacies machine_learning management marketing "
    "medical_genetics miscellaneous moral_disputes moral_scenarios nutrition philosophy prehistory professional_accounting "
    "professional_law professional_medicine professional_psychology public_relations security_studies sociology "
    "us_foreign_policy virology world_religions"
).split()

_MMLU = TaskSpec("mmlu", "mmlu", dataset="mmlu", split="test", group_by="subject", primary="acc",
                 description="The following are multiple choice questions (with answers) about {subject_text}.\n\n",
                 title="MMLU, 57 subjects, 0-shot")

BUILTIN: dict[str, TaskSpec] = {t.name: t for t in (
    TaskSpec("arc_easy", "arc", dataset="arc_easy", title="ARC-Easy"),
    TaskSpec("arc_challenge", "arc", dataset="arc_challenge", title="ARC-Challenge"),
    TaskSpec("hellaswag", "hellaswag", dataset="hellaswag", title="HellaSwag"),
    TaskSpec("piqa", "piqa", dataset="piqa", title="PIQA"),
    TaskSpec("winogrande", "winogrande", dataset="winogrande", primary="acc", title="WinoGrande (partial scoring)"),
    TaskSpec("openbookqa", "openbookqa", dataset="openbookqa", title="OpenBookQA"),
    TaskSpec("boolq", "boolq", dataset="boolq", primary="acc", title="BoolQ"),
    TaskSpec("sciq", "sciq", dataset="sciq", title="SciQ"),
    TaskSpec("lambada_openai", "lambada", dataset="lambada_openai", primary="acc",
             title="LAMBADA (OpenAI): last word"),
    _MMLU,
    replace(_MMLU, name="mmlu_5shot", fewshot=5, fewshot_split="dev", title="MMLU, 57 subjects, 5-shot"),
)}

SUITES: dict[str, tuple[str, ...]] = {
    # the zero-shot tasks small-model cards report (SmolLM2's, Qwen's, Gemma's), lm-eval's prompts
    "small": ("arc_easy", "arc_challenge", "hellaswag", "piqa", "winogrande", "openbookqa", "boolq", "sciq", "lambada_openai"),
    "arc": ("arc_easy", "arc_challenge"),  # shipped inside slmkit: runs offline anywhere
    "mmlu": ("mmlu", "mmlu_5shot"),
}


def task_names() -> list[str]:
    return list(BUILTIN) + ["mmlu_<subject>", "mmlu_<subject>_5shot"]


def suite_tasks(suite: str) -> tuple[str, ...]:
    try:
        return SUITES[suite]
    except KeyError:
        raise TaskError(f"no suite named {suite!r}", f"Suites: {', '.join(f'{k} ({len(v)} tasks)' for k, v in SUITES.items())}") from None


def _mmlu_subject(name: str) -> TaskSpec | None:
    """mmlu_<subject> and mmlu_<subject>_5shot: one subject of MMLU."""
    base, five = (name[: -len("_5shot")], True) if name.endswith("_5shot") else (name, False)
    subject = base[len("mmlu_"):] if base.startswith("mmlu_") else ""
    if subject not in MMLU_SUBJECTS:
        return None
    spec = BUILTIN["mmlu_5shot" if five else "mmlu"]
    return replace(spec, name=name, subset=(("subject", subject),), group_by=None,
                   title=f"MMLU {subject.replace('_', ' ')}, {'5' if five else '0'}-shot")


def _resolve(path_text: str, base: Path, data_dir: Path | None) -> Path:
    if "${data}" in path_text:
        folder = data_dir or settings().data_dir
        if folder is None:
            raise TaskError(f"the task data path {path_text!r} names ${{data}}, and no data folder is set",
                            "Pass --data-dir DATA or set SLMKIT_DATA, or write the path out.")
        path_text = path_text.replace("${data}", str(folder))
    p = Path(path_text).expanduser()
    return p if p.is_absolute() else (base / p).resolve()


YAML_FIELDS = {"name", "data", "dataset", "split", "format", "prompt", "target_delimiter", "fewshot", "fewshot_separator",
               "fewshot_seed", "fewshot_split", "description", "labels", "primary"}


def load_task(name_or_file: str, *, data_dir: Path | None = None) -> TaskSpec:
    """A built-in task by name (task_names()) or a task YAML file."""
    if name_or_file in BUILTIN:
        return BUILTIN[name_or_file]
    subject = _mmlu_subject(name_or_file)
    if subject is not None:
        return subject
    path = Path(name_or_file).expanduser()
    if not path.is_file():
        raise TaskError(f"no task named {name_or_file!r} and no such YAML file",
                        f"Built-in tasks: {', '.join(task_names())} (slmkit eval --list-tasks); or give a task YAML file.")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise TaskError(f"{path} is not valid YAML: {exc}", "Fix the file.") from exc
    if not isinstance(raw, dict) or not ("data" in raw or "dataset" in raw) or "format" not in raw:
        raise TaskError(f"{path}: a task needs 'format' and one of 'data' (a file) or 'dataset' (a known dataset)",
                        "See docs/evaluation.md for the fields.")
    reader(str(raw["format"]))  # fails with the list of formats
    unknown = sorted(set(raw) - YAML_FIELDS)
    if unknown:
        raise TaskError(f"{path}: unknown field(s) {', '.join(unknown)}", f"Fields: {', '.join(sorted(YAML_FIELDS))}")
    if raw.get("dataset"):
        get_dataset(str(raw["dataset"]))  # fails with the known names
    base = path.parent
    return TaskSpec(
        name=str(raw.get("name") or path.stem), format=str(raw["format"]),
        data=_resolve(str(raw["data"]), base, data_dir) if raw.get("data") else None,
        dataset=str(raw["dataset"]) if raw.get("dataset") else None, split=raw.get("split"),
        prompt=str(raw.get("prompt", "{query}")), target_delimiter=str(raw.get("target_delimiter", " ")),
        fewshot=int(raw.get("fewshot", 0)), fewshot_separator=str(raw.get("fewshot_separator", "\n\n")),
        fewshot_seed=int(raw.get("fewshot_seed", 1234)), fewshot_split=raw.get("fewshot_split"),
        description=str(raw.get("description", "")), primary=str(raw.get("primary", "acc_norm")),
        labels=_resolve(str(raw["labels"]), base, data_dir) if raw.get("labels") else None, source=str(path),
    )


def data_path(spec: TaskSpec, *, split: str | None = None, data_dir: Path | None = None) -> Path:
    if spec.data is not None and split is None:
        return spec.data
    if spec.dataset is None:
        raise TaskError(f"task {spec.name}: few-shot examples from a split need 'dataset'", "Name a dataset, or drop fewshot_split.")
    return locate(spec.dataset, split or spec.split, data_dir=data_dir)


def _read_file(spec: TaskSpec, path: Path) -> list[dict]:
    """Parse and check every row (JSON lines); a bad row fails with its line number and the reason."""
    if not path.is_file():
        raise TaskError(f"task {spec.name}: data file {path} not found", "Fix 'data' in the task file.")
    read, _ = reader(spec.format)
    labels: list[str] | None = None
    if spec.labels is not None:
        if not spec.labels.is_file():
            raise TaskError(f"task {spec.name}: labels file {spec.labels} not found", "Fix 'labels' in the task file.")
        labels = [x.strip() for x in spec.labels.read_text().splitlines() if x.strip()]
    rows = []
    with path.open(encoding="utf-8") as fh:
        for where, row in json_objects(fh, path, TaskError):
            if labels is not None:
                if len(rows) >= len(labels):
                    raise TaskError(f"{where}: no label for this row ({spec.labels} has {len(labels)} lines)", "Fix the labels file.")
                row = {**row, "label": labels[len(rows)]}
            rows.append(read(row, where))
    if labels is not None and len(labels) != len(rows):
        raise TaskError(f"{spec.labels} has {len(labels)} labels for {len(rows)} rows", "Give exactly one label per row.")
    return rows


def _keep(spec: TaskSpec, rows: list[dict]) -> list[dict]:
    return [r for r in rows if all(str(r.get(k)) == v for k, v in spec.subset)]


def read_rows(spec: TaskSpec, *, data_dir: Path | None = None) -> list[dict]:
    """The task's rows, read and checked (and narrowed to its subset)."""
    path = data_path(spec, data_dir=data_dir)
    rows = _keep(spec, _read_file(spec, path))
    if not rows:
        raise TaskError(f"task {spec.name}: {path} has no rows" + (f" for {dict(spec.subset)}" if spec.subset else ""),
                        "Point the task at a non-empty JSON-lines file.")
    return rows


def fewshot_rows(spec: TaskSpec, *, data_dir: Path | None = None) -> list[dict] | None:
    """The rows few-shot examples come from when the task names a split for them; None: the task's own rows."""
    if not spec.fewshot or not spec.fewshot_split:
        return None
    return _keep(spec, _read_file(spec, data_path(spec, split=spec.fewshot_split, data_dir=data_dir)))


def _render(spec: TaskSpec, template: str, row: dict) -> str:
    try:
        return template.format(**row)
    except (KeyError, IndexError) as exc:
        raise TaskError(
            f"task {spec.name}: the template {template!r} uses a field the rows lack: {exc}",
            f"Fields available: {', '.join(k for k in row if isinstance(row[k], str))}",
        ) from exc


def _example(spec: TaskSpec, row: dict) -> str:
    """A solved example for few-shot prompts, as lm-evaluation-harness writes one."""
    if spec.shape == "partial":
        return row["context_options"][row["gold"]] + spec.target_delimiter + row["continuation"]
    if spec.shape == "loglikelihood":
        return row["context"] + row["continuation"]
    return _render(spec, spec.prompt, row) + spec.target_delimiter + row["choices"][row["gold"]]


def build_items(spec: TaskSpec, rows: list[dict], limit: int | None = None, shots_from: list[dict] | None = None) -> list[Item]:
    """Turn rows into scoring items: the description, then `fewshot` solved examples (the first of `shots_from` in the
    row's group, or other rows drawn with a fixed seed), then the question."""
    chosen = rows[:limit] if limit else rows
    rng = random.Random(spec.fewshot_seed)
    items = []
    for i, row in enumerate(chosen):
        group = str(row.get(spec.group_by)) if spec.group_by else None
        prefix = _render(spec, spec.description, row) if spec.description else ""
        if spec.fewshot:
            if shots_from is not None:
                same = [r for r in shots_from if not spec.group_by or str(r.get(spec.group_by)) == group]
                shots = same[: spec.fewshot]
            else:
                pool = [j for j in range(len(rows)) if j != i]
                shots = [rows[j] for j in rng.sample(pool, min(spec.fewshot, len(pool)))]
            if shots:
                prefix += spec.fewshot_separator.join(_example(spec, s) for s in shots) + spec.fewshot_separator
        if spec.shape == "partial":
            contexts = [prefix + c for c in row["context_options"]]
            conts = [spec.target_delimiter + row["continuation"]] * len(contexts)
            lengths = [len(c) for c in row["context_options"]]  # lm-eval's choices here are the contexts
        elif spec.shape == "loglikelihood":
            contexts, conts, lengths = [prefix + row["context"]], [row["continuation"]], [len(row["continuation"])]
        else:
            question = prefix + _render(spec, spec.prompt, row)
            contexts = [question] * len(row["choices"])
            conts = [spec.target_delimiter + c for c in row["choices"]]
            lengths = [len(c) for c in row["choices"]]
        items.append(Item(contexts=contexts, continuations=conts, gold=row.get("gold", 0), choice_lengths=lengths, group=group))
    return items
