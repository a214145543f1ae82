"""`slmkit models ...`: list, show, remove and import models in the local store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markdown import Markdown
from rich.table import Table

from slmkit.card import human_bytes, human_count
from slmkit.cli.common import handle_errors, out_console
from slmkit.config import DEFAULT_MODEL
from slmkit.sources import integrity
from slmkit.sources.importer import ensure_default, import_path
from slmkit.store import Store

app = typer.Typer(help="Manage the local model store (SLMKIT_HOME, default ~/.cache/slmkit).", no_args_is_help=True)


@app.command("list")
@handle_errors
def list_models(as_json: Annotated[bool, typer.Option("--json", help="Every model's card, as a JSON list.")] = False) -> None:
    """List stored models with their size, parameter count and lineage."""
    store = Store()
    store.sweep()  # staging folders of killed imports and stages, whenever the store is listed
    store.sweep_exports()
    ensure_default(store)
    cards, broken = store.scan()
    if as_json:
        import json
        from dataclasses import asdict

        typer.echo(json.dumps([asdict(c) for c in cards] + [{"name": n, "broken": why} for n, why in broken.items()], indent=2))
        return
    table = Table(title=f"Models in {store.root}", caption="* the default model" + ("; BROKEN: see below" if broken else ""))
    for col in ("NAME", "PARAMS", "SIZE", "DTYPE", "STAGE", "FROM"):
        table.add_column(col, justify="right" if col in ("PARAMS", "SIZE") else "left", no_wrap=col != "CREATED")
    for name in broken:
        table.add_row(name, "-", "-", "-", "[red]BROKEN[/]", "-")
    for card in cards:
        origin = card.parent or card.source.get("package") or Path(str(card.source.get("path", "?"))).name
        marker = " *" if card.name == DEFAULT_MODEL else ""
        table.add_row(
            card.name + marker, human_count(card.parameters), human_bytes(card.size_bytes), card.dtype,
            card.stage, origin,
        )
    out_console().print(table)
    for name, why in broken.items():
        typer.echo(f"{name}: {why}. Remove it: slmkit models rm {name}", err=True)


@app.command("show")
@handle_errors
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON.")] = False,
) -> None:
    """Show a model's card: facts, lineage, settings and file hashes."""
    store = Store()
    card = store.card(name)
    damaged = integrity.problems(store.path(name), card)
    if as_json:
        typer.echo(card.to_json(), nl=False)
    else:
        out_console().print(Markdown(card.to_markdown()))
    for problem in damaged:
        typer.echo(f"damaged: {problem}. Check every file: slmkit models verify {name}", err=True)
    if damaged:
        raise typer.Exit(1)


@app.command("verify")
@handle_errors
def verify(
    names: Annotated[list[str] | None, typer.Argument(help="Model name(s) (default: every model in the store).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="file -> ok / missing / changed / not in the card, per model.")] = False,
) -> None:
    """Hash every file of a model against its card (SHA-256); exit 1 when any file is missing or changed."""
    store = Store()
    cards, broken = store.scan()
    chosen = names or [c.name for c in cards] + list(broken)
    report: dict[str, dict[str, str]] = {}
    for name in chosen:
        store.require(name)
        if name in broken:
            report[name] = {"card.json": broken[name]}
            continue
        report[name] = integrity.verify(store.path(name), store.card(name))
    wrong = lambda files: {f: v for f, v in files.items() if v not in ("ok", "not in the card")}  # noqa: E731
    bad = {n: wrong(files) for n, files in report.items() if wrong(files)}
    if as_json:
        import json

        typer.echo(json.dumps(report, indent=2))
    else:
        for name, files in report.items():
            status = "[red]damaged[/]" if name in bad else "[green]ok[/]"
            out_console().print(f"{name}: {status} ({sum(v == 'ok' for v in files.values())}/{len(files)} files match the card)")
            for f, v in bad.get(name, {}).items():
                out_console().print(f"  {f}: {v}")
    if bad:
        typer.echo("Remove a damaged model (slmkit models rm NAME) and make it again; `slmkit models show NAME` says how.", err=True)
        raise typer.Exit(1)


@app.command("rm")
@handle_errors
def rm(names: Annotated[list[str], typer.Argument(help="Model name(s) to delete.")]) -> None:
    """Delete models from the store."""
    store = Store()
    for name in names:
        store.require(name)  # all names checked before anything is deleted
    for name in names:
        store.remove(name)
        typer.echo(f"deleted {name}")


@app.command("import")
@handle_errors
def import_cmd(
    path: Annotated[Path, typer.Argument(help="A .gguf file or a Hugging Face model folder (safetensors).")],
    name: Annotated[str | None, typer.Option("--name", help="Name in the store (default: from the path).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a model of the same name.")] = False,
) -> None:
    """Import a model into the store (atomically: a failed import leaves nothing behind)."""
    card = import_path(path, name, store=Store(), overwrite=force)
    typer.echo(f"imported {card.name}: {human_count(card.parameters)} parameters, {human_bytes(card.size_bytes)}")
