"""Run a recipe: each step calls its stage (the same typed functions as the commands), installs NAME-STEP in the store
with its lineage, and records in the card a hash of what made it (the step's settings, its data files' hashes, the
files of the model it started from). A step whose hash is unchanged is skipped, so a run killed halfway goes on
where it stopped and an edited recipe reruns only the steps it changed and those after them. A failed step stops
the run, naming the step and the line. Eval steps write result files, and the run ends with one HTML report over
them (the report `slmkit compare` writes)."""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmkit import progress
from slmkit.card import sha256_file
from slmkit.compress.lowrank_stage import lowrank_stage
from slmkit.compress.prune_stage import parse_count, prune_stage, shrink_stage
from slmkit.compress.quantize_stage import quantize_stage
from slmkit.config import DEFAULT_MODEL, settings
from slmkit.errors import SlmkitError
from slmkit.evaluate.report import rows_of, write_html
from slmkit.evaluate.run import evaluate
from slmkit.export.store_export import export_model
from slmkit.loading import load
from slmkit.recipe.spec import LOWER_IS_BETTER, TRAIN, Recipe, RecipeError, Step
from slmkit.route.calibrate import calibrate_stage
from slmkit.sources.importer import ensure_default
from slmkit.store import Store
from slmkit.train.distill import distill_stage
from slmkit.train.finetune import finetune_stage
from slmkit.train.loop import TrainConfig, find_checkpoint

RECIPE_KEY = "recipe"  # card.settings[RECIPE_KEY] = {"name", "step", "hash"}
READ_KEYS = ("text_column", "prompt_column", "response_column", "label_column")


@dataclass
class Planned:
    step: Step
    model: str | None  # the store name it makes (None: eval)
    state: str  # done, to run, changed (made with other settings or inputs: run again), or waits (on a step before)
    hash: str | None


_HASHED: dict[tuple[str, int, int], str] = {}  # (path, size, mtime) -> SHA-256: a data file is read once per version


def _data_hash(recipe: Recipe, value: Any) -> Any:
    path = recipe.data.get(value) if isinstance(value, str) else None
    if path is None or not path.is_file():
        return value
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _HASHED:
        _HASHED[key] = sha256_file(path)
    return _HASHED[key]


def step_hash(recipe: Recipe, step: Step, store: Store, made: dict[str, str]) -> str | None:
    """What a step's result depends on; None while a model it needs is not made yet."""
    needed = [made.get(step.source, recipe.teacher)]
    if step.kind in ("distill", "route"):
        needed.append(made.get(str(step.settings.get("teacher") or step.settings.get("large") or "teacher"), recipe.teacher))
    if step.kind == "eval":
        needed += [made.get(m, recipe.teacher) for m in step.settings.get("models") or []]
    if not all(store.exists(n) for n in needed):
        return None
    inputs = {n: store.card(n).files for n in needed}
    settings_ = {k: _data_hash(recipe, v) if k in ("data", "calib", "responses", "imatrix") else v for k, v in step.settings.items()}
    text = json.dumps({"kind": step.kind, "settings": settings_, "inputs": inputs}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan(recipe: Recipe, store: Store | None = None) -> list[Planned]:
    """Each step and whether it would run now."""
    store = store or Store()
    _teacher(recipe, store)
    made = {"teacher": recipe.teacher}
    out = []
    for step in recipe.steps:
        name = recipe.model_name(step) if step.kind != "eval" else None
        h = step_hash(recipe, step, store, made)
        if h is None:
            state = "waits"
        elif step.kind == "eval":
            state = "done" if _eval_dir(recipe, h).is_dir() else "to run"
        elif not store.exists(name):
            state = "to run"
        else:
            state = "done" if (store.card(name).settings.get(RECIPE_KEY) or {}).get("hash") == h else "changed"
        if name:
            made[step.id] = name
        out.append(Planned(step, name, state, h))
    return out


def _teacher(recipe: Recipe, store: Store) -> None:
    """The teacher must be in the store; the default model is imported from its package on first use, as every
    command does."""
    if recipe.teacher == DEFAULT_MODEL:
        ensure_default(store)
    store.require(recipe.teacher)


def _eval_dir(recipe: Recipe, h: str) -> Path:
    return settings().home / "recipes" / recipe.name / f"eval-{h}"


def _kw(s: dict[str, Any], keys: tuple[str, ...]) -> dict[str, Any]:
    return {k: s[k] for k in keys if k in s}


def _training_run(name: str, h: str | None) -> bool:
    """A training step's run folder: resumed when it holds a checkpoint of this very step (a killed run), else
    cleared (another step's, or settings since changed). Returns whether to resume."""
    run_dir = settings().home / "runs" / name
    marker = run_dir / ".recipe-hash"
    resume = marker.is_file() and marker.read_text() == str(h) and find_checkpoint(run_dir) is not None
    if run_dir.is_dir() and not resume:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(str(h))
    return resume


def _make(recipe: Recipe, step: Step, source: str, made: dict[str, str], store: Store, h: str | None) -> None:
    """Run one model-making step's stage, installing recipe.model_name(step)."""
    s, name = step.settings, recipe.model_name(step)
    resume = _training_run(name, h) if step.kind in ("distill", "finetune") else False
    data = lambda k: recipe.data[s[k]] if s.get(k) else None  # noqa: E731
    read = _kw(s, READ_KEYS) or None
    config = TrainConfig(**_kw(s, tuple(TRAIN - {"seq_len"})))
    calls: dict[str, Callable[[], Any]] = {
        "prune": lambda: shrink_stage(source, **_kw(s, ("structured", "ratio", "blocks", "rank", "samples", "window")), calib=data("calib"),
                                      target_params=parse_count(str(s["target_params"])) if "target_params" in s else None, name=name, store=store)
        if "structured" in s else prune_stage(source, **_kw(s, ("method", "sparsity", "pattern", "samples", "window")), calib=data("calib"),
                                              name=name, store=store),
        "lowrank": lambda: lowrank_stage(source, **_kw(s, ("ratio", "energy", "samples", "window")), calib=data("calib"), name=name, store=store),
        "distill": lambda: distill_stage(made.get(str(s.get("teacher") or "teacher"), recipe.teacher), source, [data("data")],
                                         **_kw(s, ("loss", "tau", "alpha", "top_k", "seq_len")), config=config, read=read, name=name, store=store,
                                         resume=resume),
        "finetune": lambda: finetune_stage(source, [data("data")], **_kw(s, ("method", "r", "alpha", "dropout", "task", "prompt_format", "seq_len",
                                                                          "qlora_scheme", "virtual_tokens")),
                                           config=config, read=read, name=name, store=store, resume=resume),
        "quantize": lambda: quantize_stage(source, s["scheme"], **_kw(s, ("method", "group_size", "portable")), calib=data("calib"),
                                           name=name, store=store),
        "export": lambda: export_model(source, s["type"], store_as=name, imatrix=data("imatrix"), store=store),
        "route": lambda: calibrate_stage(source, made.get(str(s.get("large") or "teacher"), recipe.teacher), data=data("data"),
                                         **_kw(s, ("task", "target", "max_escalation", "threshold", "policy", "signal", "metric", "limit",
                                                   "prompt_column", "answer_column", "max_tokens")), name=name, store=store),
    }
    calls[step.kind]()


def _eval(recipe: Recipe, step: Step, made: dict[str, str], h: str) -> list[Path]:
    s = step.settings
    folder = _eval_dir(recipe, h)
    staging = folder.with_name(folder.name + ".partial")
    staging.mkdir(parents=True, exist_ok=True)
    paths = []
    for ref in s.get("models") or ["teacher", *[x for x in made if x != "teacher"]]:
        model = load(made.get(ref, recipe.teacher), backend="torch")
        out = staging / f"{ref}.json"
        evaluate(model, ppl=s.get("ppl"), tasks=s.get("tasks"), speed=bool(s.get("speed")), limit=s.get("limit"),
                 **_kw(s, ("context_length", "stride")), out=out,
                 responses=recipe.data[s["responses"]] if s.get("responses") else None,
                 response_metric=s.get("metric", "rouge_l") if not s.get("label_column") else "accuracy",
                 response_read={"label_column": s["label_column"]} if s.get("label_column") else None)
        paths.append(out)
    staging.replace(folder)  # whole, or not there: a killed eval runs again
    return [folder / p.name for p in paths]


def run(recipe: Recipe, store: Store | None = None, say: Callable[[str], None] = progress.note) -> dict[str, Any]:
    """Run every step that is not done; returns {"models": {step id: store name}, "evals": [result files],
    "report": the HTML report or None}."""
    store = store or Store()
    _teacher(recipe, store)
    made = {"teacher": recipe.teacher}
    evals: list[Path] = []
    for step in recipe.steps:  # each step's hash once the steps before it ran
        h = step_hash(recipe, step, store, made)
        name = recipe.model_name(step) if step.kind != "eval" else None
        try:
            if step.kind == "eval":
                if h is not None and _eval_dir(recipe, h).is_dir():
                    say(f"{step.id}: done (results kept)")
                    evals += sorted(_eval_dir(recipe, h).glob("*.json"))
                else:
                    say(f"{step.id}: evaluating")
                    evals += _eval(recipe, step, made, h or "x")
                continue
            current = (store.card(name).settings.get(RECIPE_KEY) or {}) if store.exists(name) else None
            if current is not None and current.get("hash") == h:
                say(f"{step.id}: done ({name})")
            else:
                if current is not None:
                    if current.get("name") != recipe.name:
                        raise SlmkitError(f"the store already has a model {name!r} that this recipe did not make",
                                          f"Rename the recipe (name:) or remove the model (slmkit models rm {name}).")
                    say(f"{step.id}: its settings or inputs changed: making {name} again")
                    store.remove(name)
                else:
                    say(f"{step.id}: making {name} ({step.kind})")
                _make(recipe, step, made.get(step.source, recipe.teacher), made, store, h)
                store.annotate(name, RECIPE_KEY, {"name": recipe.name, "step": step.id, "hash": step_hash(recipe, step, store, made)})
            made[step.id] = name
        except SlmkitError as exc:
            raise RecipeError(f"step {step.id} ({step.kind}, {recipe.where(step.line)}) failed: {exc.message}", exc.hint) from exc
    report, chosen = None, None
    if evals and recipe.goal:
        chosen = choose([json.loads(p.read_text()) for p in evals], recipe.teacher, recipe.goal)
        say(f"chosen: {chosen['model']} ({chosen['why']})" if chosen["model"] else f"no model meets the goal ({chosen['why']})")
    if evals:
        report = settings().home / "recipes" / recipe.name / "report.html"
        results = [json.loads(p.read_text()) for p in evals]
        teacher_row = recipe.teacher if any(r["model"]["name"] == recipe.teacher for r in results) else None
        write_html(results, report, [str(p) for p in evals], teacher_row)
    return {"models": {k: v for k, v in made.items() if k != "teacher"}, "evals": [str(p) for p in evals],
            "report": str(report) if report else None, "chosen": chosen}


def choose(results: list[dict[str, Any]], teacher: str, goal: dict[str, Any]) -> dict[str, Any]:
    """The smallest model (weights on disk) whose `goal["metric"]` keeps `goal["keep"]` of the teacher's (for a
    lower-is-better metric such as perplexity: the teacher's value over the model's); every model's share too."""
    rows = {r["model"].split(" (")[0]: r for r in rows_of(results)}
    metric, keep = goal["metric"], float(goal["keep"])
    base = rows.get(teacher, {}).get(metric)
    if base is None:
        return {"model": None, "why": f"the teacher's {metric} was not measured", "shares": {}}
    shares = {}
    for name, r in rows.items():
        v = r.get(metric)
        if v is not None and name != teacher:
            shares[name] = (base / v if metric in LOWER_IS_BETTER else v / base) if v and base else 0.0
    ok = [n for n, share in shares.items() if share >= keep]
    if not ok:
        return {"model": None, "why": f"none keeps {keep:.0%} of the teacher's {metric}", "shares": shares}
    best = min(ok, key=lambda n: rows[n].get("size_mb") or float("inf"))
    return {"model": best, "why": f"{shares[best]:.1%} of the teacher's {metric} at {rows[best].get('size_mb') or 0:.1f} MB",
            "shares": shares}
