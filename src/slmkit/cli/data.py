"""`slmkit data ...`: the evaluation datasets slmkit knows, where each is found now, and filling the cache."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from slmkit.card import human_bytes
from slmkit.cli.common import handle_errors, out_console
from slmkit.config import settings
from slmkit.data.catalog import DATASETS
from slmkit.data.locate import fetch, where

app = typer.Typer(help="Evaluation data: list the known datasets and where each comes from; fetch them into the cache.",
                  no_args_is_help=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="A data folder to look in first (default: SLMKIT_DATA).")]


@app.command("list")
@handle_errors
def list_data(data_dir: DataDir = None) -> None:
    """Every known dataset: its Hub source, license, the file it is kept as, and where it is found now."""
    folder = data_dir or settings().data_dir
    table = Table(title=f"Evaluation data (cache: {settings().data_cache}" + (f"; data folder: {folder}" if folder else "") + ")")
    for col in ("NAME", "ROWS", "FILE (in a data folder)", "FOUND", "SIZE", "LICENSE"):
        table.add_column(col, justify="right" if col in ("ROWS", "SIZE") else "left", no_wrap=col != "LICENSE")
    for ds in DATASETS.values():
        for f, w in zip(ds.files, where(ds.name, data_dir=data_dir)):
            size = human_bytes(w.path.stat().st_size) if w.path and w.path.is_file() else "-"
            table.add_row(ds.name, f"{f.rows:,}", f.path, w.origin + (f" ({w.note})" if w.note else ""), size, ds.license)
    out_console().print(table)
    typer.echo("missing: `slmkit data fetch NAME` (online), or `slmkit data fetch NAME --from DATA` (a folder in the FILE layout)")


@app.command("fetch")
@handle_errors
def fetch_data(
    names: Annotated[list[str], typer.Argument(help="Dataset names (see `slmkit data list`), or 'all'.")],
    source: Annotated[Path | None, typer.Option("--from", help="Copy from this folder (laid out as FILE in `slmkit data list`) instead of the Hub.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace what the cache holds.")] = False,
) -> None:
    """Put datasets into slmkit's cache: from a folder, the copy shipped inside slmkit, or the Hugging Face Hub."""
    chosen = list(DATASETS) if names == ["all"] else names
    for name in chosen:
        for path in fetch(name, source=source, force=force):
            typer.echo(f"{name}: {path}")
