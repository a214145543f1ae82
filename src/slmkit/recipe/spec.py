"""A recipe file, read and checked before anything runs (pure: text in, a Recipe or an error naming the line out).

    name: support-bot               # every model the recipe makes is NAME-STEP in the store
    teacher: smollm2-135m-instruct  # a store model (the big one; steps start from it unless they say)
    data:                           # files by name, paths relative to the recipe file
      train: data/train.jsonl
      heldout: data/heldout.jsonl
    steps:
      - id: half                    # optional; default: the step's kind
        prune: {structured: width, ratio: 0.5}
      - id: student
        distill: {data: train, steps: 200}
        from: half                  # optional; default: the model the step before made (or the teacher)
      - quantize: {scheme: int8}
      - eval: {models: [teacher, student, quantize], ppl: wikitext2, limit: 16}
    goal: {metric: perplexity, keep: 0.95}  # optional: the smallest model keeping 95% of the teacher's quality is chosen

A step's settings are its command's options (underscores for dashes); a setting that names a data key (`data: train`,
`calib: train`, `responses: heldout`) means that file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from slmkit.errors import SlmkitError
from slmkit.store import NAME_RE

TOP_KEYS = ("name", "teacher", "data", "steps", "goal")
LOWER_IS_BETTER = ("perplexity", "bits_per_byte", "responses.ppl")
TRAIN = {"steps", "epochs", "batch_size", "grad_accum", "lr", "weight_decay", "warmup", "bf16", "seed", "seq_len"}
# each kind of step: the settings it takes (its stage's keyword arguments, and TRAIN for the training stages)
KINDS: dict[str, set[str]] = {
    "prune": {"method", "sparsity", "pattern", "structured", "ratio", "target_params", "blocks", "rank", "calib", "samples", "window"},
    "lowrank": {"ratio", "energy", "calib", "samples", "window"},
    "distill": {"data", "teacher", "loss", "tau", "alpha", "top_k", "text_column", "prompt_column", "response_column"} | TRAIN,
    "finetune": {"data", "method", "r", "alpha", "dropout", "task", "prompt_format", "label_column", "text_column",
                 "prompt_column", "response_column", "qlora_scheme", "virtual_tokens"} | TRAIN,
    "quantize": {"scheme", "method", "group_size", "calib", "portable"},
    "export": {"type", "imatrix"},
    "route": {"large", "data", "task", "target", "max_escalation", "threshold", "policy", "signal", "metric", "limit",
              "prompt_column", "answer_column", "max_tokens"},
    "eval": {"models", "ppl", "tasks", "speed", "limit", "context_length", "stride", "responses", "metric", "label_column"},
}
MAKES_MODEL = ("prune", "lowrank", "distill", "finetune", "quantize", "export", "route")
DATA_SETTINGS = ("data", "calib", "responses", "imatrix")  # settings whose value may name a data key
REQUIRED = {"quantize": ("scheme",), "export": ("type",), "distill": ("data",), "finetune": ("data",), "route": ("data",)}


class RecipeError(SlmkitError):
    pass


@dataclass
class Step:
    id: str
    kind: str
    settings: dict[str, Any]
    source: str  # "teacher" or an earlier step's id: the model the step starts from
    line: int


@dataclass
class Recipe:
    name: str
    teacher: str
    data: dict[str, Path]
    steps: list[Step]
    path: Path
    goal: dict[str, Any] | None = None  # {"metric": a report column (perplexity, arc_easy.acc, responses.accuracy), "keep": 0.95}

    def where(self, line: int) -> str:
        return f"{self.path.name} line {line}"

    def model_name(self, step: Step) -> str:
        """The store name of the model a step makes."""
        return f"{self.name}-{step.id}"


def _lines(node: yaml.Node, path: tuple = ()) -> dict[tuple, int]:
    """Every key path of a YAML document -> its 1-based line."""
    out = {path: node.start_mark.line + 1}
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            out |= _lines(v, path + (k.value,))
            out[path + (k.value,)] = k.start_mark.line + 1
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            out |= _lines(v, path + (i,))
    return out


def parse(text: str, path: Path) -> Recipe:
    """Read and check a recipe: every problem names its line."""
    try:
        raw = yaml.safe_load(text)
        lines = _lines(yaml.compose(text)) if text.strip() else {}
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise RecipeError(f"{path.name}{f' line {mark.line + 1}' if mark else ''}: not valid YAML ({getattr(exc, 'problem', exc)})",
                          "Fix the YAML (indentation, colons, quotes).") from exc
    at = lambda *p: f"{path.name} line {lines.get(p, lines.get(p[:-1], 1))}"  # noqa: E731
    if not isinstance(raw, dict):
        raise RecipeError(f"{path.name}: a recipe is a mapping with {', '.join(TOP_KEYS)}", "See docs/recipes.md.")
    for k in raw:
        if k not in TOP_KEYS:
            raise RecipeError(f"{at(k)}: unknown key {k!r}", f"A recipe has {', '.join(TOP_KEYS)}.")
    for k in ("name", "teacher", "steps"):
        if not raw.get(k):
            raise RecipeError(f"{path.name}: no {k!r}", f"Add `{k}:` (see docs/recipes.md).")
    name = str(raw["name"])
    if not NAME_RE.match(name) or len(name) > 60:
        raise RecipeError(f"{at('name')}: name {name!r} is not a store name", "Use letters, digits, '.', '_' and '-' (at most 60).")
    data: dict[str, Path] = {}
    for k, v in (raw.get("data") or {}).items():
        p = (path.parent / str(v)).expanduser() if not Path(str(v)).is_absolute() else Path(str(v))
        if not p.exists():
            raise RecipeError(f"{at('data', k)}: data {k!r}: {p} does not exist", "Fix the path (relative to the recipe file).")
        data[str(k)] = p
    if not isinstance(raw["steps"], list):
        raise RecipeError(f"{at('steps')}: steps is a list", "Write each step as `- KIND: {settings}`.")
    steps: list[Step] = []
    made = ["teacher"]
    for i, s in enumerate(raw["steps"]):
        where = at("steps", i)
        if not isinstance(s, dict):
            raise RecipeError(f"{where}: a step is a mapping, `- KIND: {{settings}}`", f"Kinds: {', '.join(KINDS)}.")
        kinds = [k for k in s if k in KINDS]
        extra = [k for k in s if k not in KINDS and k not in ("id", "from")]
        if len(kinds) != 1 or extra:
            raise RecipeError(f"{where}: a step has one kind ({', '.join(KINDS)}) and optionally id and from; "
                              f"this one has {', '.join(map(str, s))}", "Split it into steps, or fix the key.")
        kind = kinds[0]
        settings = dict(s[kind] or {})
        for k in settings:
            if k not in KINDS[kind]:
                raise RecipeError(f"{at('steps', i, kind, k)}: {kind} has no setting {k!r}",
                                  f"Settings of {kind}: {', '.join(sorted(KINDS[kind]))}.")
        for k in REQUIRED.get(kind, ()):
            if k not in settings:
                raise RecipeError(f"{at('steps', i, kind)}: {kind} needs {k!r}", f"Add {k}: to the step.")
        for k in DATA_SETTINGS:
            v = settings.get(k)
            if v is not None and v not in data:
                raise RecipeError(f"{at('steps', i, kind, k)}: {k}: {v!r} is not a data key",
                                  f"Name one of the recipe's data: {', '.join(data) or '(none: add a data: section)'}.")
        sid = str(s.get("id") or kind)
        if not NAME_RE.match(sid) or any(x.id == sid for x in steps) or sid == "teacher":
            raise RecipeError(f"{at('steps', i, 'id') if 'id' in s else where}: step id {sid!r} is taken or not a name",
                              "Give each step its own id (letters, digits, '-', '_').")
        source = str(s.get("from") or made[-1])
        if source not in made:
            raise RecipeError(f"{at('steps', i, 'from')}: from {source!r}: no earlier step makes it",
                              f"Start from one of: {', '.join(made)}.")
        if kind == "eval":
            for m in settings.get("models") or []:
                if m not in made:
                    raise RecipeError(f"{at('steps', i, kind, 'models')}: models: {m!r}: no earlier step makes it",
                                      f"Evaluate one of: {', '.join(made)}.")
        if kind in MAKES_MODEL:
            made.append(sid)
        steps.append(Step(sid, kind, settings, source, lines.get(("steps", i), 1)))
    goal = raw.get("goal")
    if goal is not None:
        metric, keep = (goal.get("metric"), goal.get("keep")) if isinstance(goal, dict) else (None, None)
        if not isinstance(metric, str) or not isinstance(keep, (int, float)) or not 0 < keep <= 1.5 or set(goal) - {"metric", "keep"}:
            raise RecipeError(f"{at('goal')}: goal is {{metric: COLUMN, keep: SHARE}}", "For example goal: {metric: perplexity, keep: 0.95}.")
        evals = [x for x in steps if x.kind == "eval" and "teacher" in (x.settings.get("models") or ["teacher"])]
        measured = any(measures(x.settings, metric) for x in evals)
        if not measured:
            raise RecipeError(f"{at('goal', 'metric')}: no eval step measures {metric!r} on the teacher and the models it makes",
                              "Add an eval step with the teacher among its models that measures it (ppl: for perplexity, "
                              "tasks: [T] for T.acc, responses: for responses.accuracy / responses.rouge_l).")
    return Recipe(name, str(raw["teacher"]), data, steps, path, goal=goal)


def measures(settings: dict[str, Any], metric: str) -> bool:
    """Whether an eval step's settings measure a report column."""
    head, _, tail = metric.partition(".")
    if metric in ("perplexity", "bits_per_byte"):
        return bool(settings.get("ppl"))
    if head == "responses":
        return bool(settings.get("responses"))
    return head in (settings.get("tasks") or []) and tail in ("acc", "acc_norm")


def read(path: Path) -> Recipe:
    path = Path(path).expanduser()
    if not path.is_file():
        raise RecipeError(f"{path} does not exist", "Give a recipe file (recipes/ has examples).")
    return parse(path.read_text(encoding="utf-8"), path.resolve())
