"""`slmkit data ...`: the evaluation datasets slmkit knows, where each is found now, and filling the cache."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from slmkit.card import human_bytes
from slmkit.cli.common import JsonOpt, handle_errors, out_console, print_json
from slmkit.config import settings
from slmkit.data.catalog import DATASETS
from slmkit.data.locate import fetch, where
from slmkit.train.data import DataError, label_of, read_examples, stratified_folds, stratified_split, to_jsonl

app = typer.Typer(help="Evaluation data: list the known datasets and where each comes from; fetch them into the cache.",
                  no_args_is_help=True)

DataDir = Annotated[Path | None, typer.Option("--data-dir", help="A data folder to look in first (default: SLMKIT_DATA).")]


@app.command("list")
@handle_errors
def list_data(data_dir: DataDir = None, as_json: JsonOpt = False) -> None:
    """Every known dataset: its Hub source, license, the file it is kept as, and where it is found now."""
    folder = data_dir or settings().data_dir
    if as_json:
        print_json([{"name": ds.name, "file": f.path, "rows": f.rows, "found": w.origin, "note": w.note,
                     "path": str(w.path) if w.path else None, "license": ds.license}
                    for ds in DATASETS.values() for f, w in zip(ds.files, where(ds.name, data_dir=data_dir))])
        return
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
    as_json: JsonOpt = False,
) -> None:
    """Put datasets into slmkit's cache: from a folder, the copy shipped inside slmkit, or the Hugging Face Hub."""
    chosen = list(DATASETS) if names == ["all"] else names
    got = {name: [str(p) for p in fetch(name, source=source, force=force)] for name in chosen}
    if as_json:
        print_json(got)
        return
    for name, paths in got.items():
        for path in paths:
            typer.echo(f"{name}: {path}")


@app.command("split")
@handle_errors
def split_data(
    path: Annotated[Path, typer.Argument(help="Rows to split: chat / Alpaca JSON lines, or CSV / TSV with a text and a label (or response) column.")],
    out: Annotated[Path, typer.Option("--out", help="Folder for train.jsonl and heldout.jsonl.")],
    held_out: Annotated[float, typer.Option("--held-out", help="Share of each label's rows held out.")] = 0.2,
    seed: Annotated[int, typer.Option("--seed", help="The same file and seed give the same split.")] = 0,
    text_column: Annotated[str | None, typer.Option("--text-column", help="CSV/TSV: the text (prompt) column.")] = None,
    label_column: Annotated[str | None, typer.Option("--label-column", help="The label column (CSV/TSV, JSON lines {text, label}, a saved Hugging Face dataset); the rows written are {text, label}.")] = None,
    folds: Annotated[int | None, typer.Option("--folds", help="k-fold cross-validation instead: OUT/fold-1 ... OUT/fold-K, each with train.jsonl and heldout.jsonl; every row held out once.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """A deterministic train / held-out split, stratified by label (a row's last answer), with no held-out text in
    training: `slmkit finetune --data OUT/train.jsonl --task classify --label-column label`, then `slmkit eval MODEL
    --responses OUT/heldout.jsonl --label-column label`."""
    if text_column and not label_column:
        raise DataError("--text-column needs --label-column", "For example: --text-column text --label-column label")
    examples = read_examples(path, text_column=text_column, label_column=label_column)
    splits = stratified_folds(examples, folds, seed) if folds else [stratified_split(examples, held_out, seed)]
    written = []
    for i, (train, held, dropped) in enumerate(splits, 1):
        where = out / f"fold-{i}" if folds else out
        where.mkdir(parents=True, exist_ok=True)
        for name, rows in (("train.jsonl", train), ("heldout.jsonl", held)):
            tmp = where / f".{name}.tmp-{os.getpid()}"
            tmp.write_text(to_jsonl(rows, labelled_rows=bool(label_column)), encoding="utf-8")
            os.replace(tmp, where / name)
        written.append({"folder": str(where), "train": len(train), "heldout": len(held), "dropped": dropped})
    labels = len({label_of(ex) for ex in examples})
    if as_json:
        print_json({"splits": written, "labels": labels})
        return
    for w in written:
        typer.echo(f"{w['train']} training rows, {w['heldout']} held out"
                   + (f"; {w['dropped']} training rows dropped (their text is also held out)" if w["dropped"] else "") + f": {w['folder']}")
    typer.echo(f"{labels} labels")
