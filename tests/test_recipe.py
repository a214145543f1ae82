"""Recipes: checked before anything runs (every problem names its line), run end to end on a tiny model through the
real stages, skipped when nothing changed, rerun from the step that changed; the shipped recipes parse and run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from slmkit.cli import app
from slmkit.recipe import spec
from slmkit.recipe.run import RECIPE_KEY, plan, run

ROOT = Path(__file__).resolve().parents[1]
TEXT = "\n\n".join(f"The quick brown fox jumps over the lazy dog number {i}. Small models run on laptops." for i in range(60))


def write(tmp_path: Path, body: str) -> Path:
    (tmp_path / "notes.txt").write_text(TEXT)
    f = tmp_path / "r.yaml"
    f.write_text(body)
    return f


@pytest.mark.parametrize("body, where, what", [
    ("name: x\nteacher: tiny\nsteps:\n  - prune: {method: magnitude, sparsity: 0.5, bogus: 1}\n", "line 4", "prune has no setting 'bogus'"),
    ("name: x\nteacher: tiny\ncolor: red\nsteps: []\n", "line 3", "unknown key 'color'"),
    ("name: x\nteacher: tiny\nsteps:\n  - polish: {}\n", "line 4", "a step has one kind"),
    ("name: x\nteacher: tiny\nsteps:\n  - quantize: {scheme: int8}\n    from: later\n  - id: later\n    prune: {sparsity: 0.5}\n", "line 5", "no earlier step makes it"),
    ("name: x\nteacher: tiny\ndata:\n  train: missing.txt\nsteps:\n  - quantize: {scheme: int8}\n", "line 4", "does not exist"),
    ("name: x\nteacher: tiny\ndata:\n  train: notes.txt\nsteps:\n  - distill: {data: dev}\n", "line 6", "'dev' is not a data key"),
    ("name: x\nteacher: tiny\nsteps:\n  - quantize: {method: rtn}\n", "line 4", "quantize needs 'scheme'"),
    ("name: x\nteacher: tiny\nsteps:\n  - eval: {models: [nothing]}\n", "line 4", "no earlier step makes it"),
    ("name: x\nteacher: tiny\nsteps:\n  - quantize: {scheme: int8\n", "line", "not valid YAML"),
    ("name: x\nteacher: tiny\nsteps:\n  - eval: {models: [teacher], ppl: wikitext2}\ngoal: {metric: arc_easy.acc, keep: 0.9}\n", "line 5",
     "no eval step measures 'arc_easy.acc'"),
    ("name: x\nteacher: tiny\nsteps:\n  - quantize: {scheme: int8}\ngoal: {metric: perplexity}\n", "line 5", "goal is"),
])
def test_a_recipe_is_checked_before_anything_runs(tmp_path, body, where, what):
    with pytest.raises(spec.RecipeError) as e:
        spec.read(write(tmp_path, body))
    assert where in e.value.message and what in e.value.message, e.value.message


RECIPE = """name: small
teacher: tiny
data:
  train: notes.txt
steps:
  - id: sparse
    prune: {method: magnitude, sparsity: 0.5}
  - id: tuned
    finetune: {data: train, method: full, steps: 2, seq_len: 16, batch_size: 2}
  - id: int8
    quantize: {scheme: int8}
  - eval: {models: [teacher, tuned, int8], ppl: wikitext2, limit: 2, context_length: 32, stride: 32}
goal: {metric: perplexity, keep: 0.01}
"""


def test_a_recipe_runs_skips_what_is_done_and_reruns_what_changed(store, tmp_path):
    f = write(tmp_path, RECIPE)
    recipe = spec.read(f)
    assert [p.state for p in plan(recipe)] == ["to run", "waits", "waits", "waits"]
    out = run(recipe)
    assert out["models"] == {"sparse": "small-sparse", "tuned": "small-tuned", "int8": "small-int8"}
    assert store.card("small-tuned").parent == "small-sparse" and store.card("small-int8").parent == "small-tuned"
    assert store.card("small-int8").settings[RECIPE_KEY]["step"] == "int8"
    assert Path(out["report"]).is_file() and len(out["evals"]) == 3
    # the goal: the smallest model on disk among those keeping 1% of the teacher's perplexity (int8, a quarter the size)
    assert out["chosen"]["model"] == "small-int8" and set(out["chosen"]["shares"]) == {"small-tuned", "small-int8"}
    assert {json.loads(Path(p).read_text())["model"]["name"] for p in out["evals"]} == {"tiny", "small-tuned", "small-int8"}
    created = {n: store.card(n).created for n in out["models"].values()}
    # nothing changed: every step is done and nothing is made again
    assert [p.state for p in plan(recipe)] == ["done"] * 4
    run(recipe)
    assert {n: store.card(n).created for n in out["models"].values()} == created
    # a setting of the second step changes: it and the steps after it run again, the first does not
    f.write_text(RECIPE.replace("steps: 2,", "steps: 3,"))
    recipe = spec.read(f)
    assert [p.state for p in plan(recipe)] == ["done", "changed", "done", "done"]  # int8's inputs change once tuned is made
    run(recipe)
    after = {n: store.card(n).created for n in out["models"].values()}
    assert after["small-sparse"] == created["small-sparse"] and after["small-tuned"] != created["small-tuned"]
    assert after["small-int8"] != created["small-int8"]


def test_a_failed_step_names_itself_and_a_foreign_model_is_not_replaced(store, tmp_path):
    f = write(tmp_path, "name: bad\nteacher: tiny\nsteps:\n  - prune: {method: magnitude, sparsity: 1.5}\n")
    r = CliRunner().invoke(app, ["recipe", "run", str(f)])
    assert r.exit_code == 1 and "step prune (prune, r.yaml line 4) failed" in r.output
    from slmkit.sources.pull import derive_copy

    derive_copy("tiny", "mine-prune", store=store)
    f.write_text("name: mine\nteacher: tiny\nsteps:\n  - prune: {method: magnitude, sparsity: 0.5}\n")
    r = CliRunner().invoke(app, ["recipe", "run", str(f)])
    assert r.exit_code == 1 and "did not make" in r.output and store.card("mine-prune").stage == "copy"


def _stand_ins(tmp_path: Path) -> dict[str, Path]:
    """Tiny data for the shipped recipes' files."""
    rows = [{"text": f"{w} {i}", "label": lab} for i in range(12) for w, lab in (("great film", "positive"), ("awful plot", "negative"))]
    files = {"train.txt": TEXT, "train.jsonl": "".join(json.dumps(r) + "\n" for r in rows),
             "heldout.jsonl": "".join(json.dumps(r) + "\n" for r in rows[:6]),
             "dev.jsonl": "".join(json.dumps({"prompt": r["text"], "answer": r["label"]}) + "\n" for r in rows)}
    (tmp_path / "data").mkdir()
    for n, t in files.items():
        (tmp_path / "data" / n).write_text(t)
    return files


SMALLER = {"distill": {"steps": 2, "seq_len": 16, "batch_size": 2}, "finetune": {"epochs": 0.2, "batch_size": 2},
           "eval": {"limit": 2, "context_length": 32, "stride": 32, "speed": False}, "export": {"type": "F16"},
           "route": {"metric": "rouge", "max_tokens": 8}}


@pytest.mark.parametrize("name", ["compress", "specialize", "route"])
def test_the_shipped_recipes_run_end_to_end_on_a_tiny_model(name, store, tmp_path):
    """recipes/*.yaml as shipped, on the tiny model with stand-in data and fewer steps: every step runs through the
    real stages and leaves its model in the store with its lineage."""
    _stand_ins(tmp_path)
    text = (ROOT / "recipes" / f"{name}.yaml").read_text().replace("teacher: smollm2-135m-instruct", "teacher: tiny")
    recipe = spec.parse(text, tmp_path / f"{name}.yaml")
    for step in recipe.steps:
        step.settings.update(SMALLER.get(step.kind, {}))
        step.settings.pop("bf16", None)
        if step.kind == "prune":  # the tiny model is mostly embeddings: one of its two blocks instead of half its width
            step.settings = {"structured": "depth", "blocks": 1}
    if name == "route":  # a dev set where each model is right on half the prompts, so the router has something to learn
        import dataclasses

        from slmkit.loading import load

        run(dataclasses.replace(recipe, steps=recipe.steps[:2]))
        small, large = load("route-student"), load("tiny")
        rows = []
        for i in range(16):
            q = f"question {i}: why is the sky blue?"
            ref = (small if i % 2 else large).chat([{"role": "user", "content": q}], max_tokens=8, temperature=0, repetition_penalty=1.0)
            rows.append({"prompt": q, "answer": ref or "x"})
        (tmp_path / "data" / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = run(recipe)
    made = [s for s in recipe.steps if s.kind != "eval"]
    assert list(out["models"]) == [s.id for s in made]
    for s in made:
        card = store.card(out["models"][s.id])
        assert card.settings[RECIPE_KEY] == {"name": name, "step": s.id, "hash": card.settings[RECIPE_KEY]["hash"]}
        assert card.parent == (out["models"].get(s.source) or "tiny") or card.stage == "route"
    assert [p.state for p in plan(recipe)] == ["done"] * len(recipe.steps)
