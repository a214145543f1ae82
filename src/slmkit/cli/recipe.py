"""`slmkit recipe ...`: run a recipe file (a teacher, data, and steps from the stages), see what would run, or how far it is."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from slmkit.cli.common import JsonOpt, handle_errors, out_console, print_json
from slmkit.recipe import spec
from slmkit.recipe.run import plan, run

app = typer.Typer(help="Recipes: a teacher and your data through the stages, in one file (recipes/ has examples).", no_args_is_help=True)
FileArg = Annotated[Path, typer.Argument(help="The recipe (YAML).")]


def _show(file: Path, as_json: bool) -> None:
    recipe = spec.read(file)
    steps = plan(recipe)
    if as_json:
        print_json([{"step": p.step.id, "kind": p.step.kind, "model": p.model, "state": p.state, "line": p.step.line} for p in steps])
        return
    table = Table(title=f"recipe {recipe.name} (teacher {recipe.teacher})")
    for col in ("STEP", "KIND", "MAKES", "FROM", "STATE"):
        table.add_column(col)
    for p in steps:
        table.add_row(p.step.id, p.step.kind, p.model or "results", p.step.source, p.state)
    out_console().print(table)


@app.command("plan")
@handle_errors
def plan_cmd(file: FileArg, as_json: JsonOpt = False) -> None:
    """Check the recipe and show each step: done, to run, changed (run again), or waiting on a step before."""
    _show(file, as_json)


@app.command("status")
@handle_errors
def status_cmd(file: FileArg, as_json: JsonOpt = False) -> None:
    """How far the recipe is: the same table as plan (steps done are the models in the store it made)."""
    _show(file, as_json)


@app.command("run")
@handle_errors
def run_cmd(file: FileArg, as_json: JsonOpt = False) -> None:
    """Run every step not done yet (a step whose settings and inputs are unchanged is skipped; a killed run goes on
    where it stopped); eval steps end in one HTML report."""
    out = run(spec.read(file))
    if as_json:
        print_json(out)
        return
    for step, name in out["models"].items():
        typer.echo(f"{step}: {name}")
    if out["report"]:
        typer.echo(f"report: {out['report']}")
    if out["chosen"]:
        c = out["chosen"]
        typer.echo(f"chosen: {c['model']} ({c['why']})" if c["model"] else f"no model meets the goal: {c['why']}")
