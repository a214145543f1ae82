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
    if as_json:
        import json
        from dataclasses import asdict

        typer.echo(json.dumps([asdict(c) for c in store.cards()], indent=2))
        return
    table = Table(title=f"Models in {store.root}", caption="* the default model")
    for col in ("NAME", "PARAMS", "SIZE", "DTYPE", "STAGE", "FROM"):
        table.add_column(col, justify="right" if col in ("PARAMS", "SIZE") else "left", no_wrap=col != "CREATED")
    for card in store.cards():
        origin = card.parent or card.source.get("package") or Path(str(card.source.get("path", "?"))).name
        marker = " *" if card.name == DEFAULT_MODEL else ""
        table.add_row(
            card.name + marker, human_count(card.parameters), human_bytes(card.size_bytes), card.dtype,
            card.stage, origin,
        )
    out_console().print(table)


@app.command("show")
@handle_errors
def show(
    name: Annotated[str, typer.Argument(help="Model name.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the card as JSON.")] = False,
) -> None:
    """Show a model's card: facts, lineage, settings and file hashes."""
    card = Store().card(name)
    if as_json:
        typer.echo(card.to_json(), nl=False)
    else:
        out_console().print(Markdown(card.to_markdown()))


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
