"""`slmkit models ...`: list, show, remove and import models in the local store."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markdown import Markdown
from rich.table import Table

from slmkit.card import human_bytes, human_count
from slmkit.cli.common import JsonOpt, handle_errors, out_console, print_result
from slmkit.config import DEFAULT_MODEL
from slmkit.sources import integrity
from slmkit.sources.importer import ensure_default, import_path
from slmkit.sources.pull import create, derive_copy, pull
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
        if card.settings.get("top_contexts"):  # an n-gram model (slmkit ngram): what it learned, readable
            out_console().print(_top_contexts(card.settings["top_contexts"]))
    for problem in damaged:
        typer.echo(f"damaged: {problem}. Check every file: slmkit models verify {name}", err=True)
    if damaged:
        raise typer.Exit(1)


def _top_contexts(rows: list[dict]) -> Table:
    table = Table(title="Top contexts and their likeliest next tokens", title_justify="left")
    table.add_column("context")
    table.add_column("next tokens (probability)")
    for r in rows:
        table.add_row(repr(r["context"]), "  ".join(f"{t!r} {p:.3f}" for t, p in r["branches"]))
    return table


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
    as_json: JsonOpt = False,
) -> None:
    """Import a model into the store (atomically: a failed import leaves nothing behind)."""
    card = import_path(path, name, store=Store(), overwrite=force)
    print_result(card, as_json, f"imported {card.name}: {human_count(card.parameters)} parameters, {human_bytes(card.size_bytes)}")


def pull_report() -> tuple[Any, Any]:
    """Ollama-shaped progress lines (sources/pull.Report) as rich bars on stderr: one per blob with bytes, the other
    steps as notes; returns (report, close)."""
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    from slmkit.cli.common import err_console

    bars = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                    TimeRemainingColumn(), console=err_console(), transient=False)
    tasks: dict[str, Any] = {}
    said: set[str] = set()

    def report(line: dict[str, Any]) -> None:
        status = line.get("status", "")
        if line.get("digest") and line.get("total"):
            if line["digest"] not in tasks:
                bars.start()
                tasks[line["digest"]] = bars.add_task(status, total=line["total"])
            bars.update(tasks[line["digest"]], completed=line.get("completed") or 0)
        elif status not in said and status != "success":
            said.add(status)
            bars.console.print(status, highlight=False)

    return report, bars.stop


@handle_errors
def pull_cmd(
    source: Annotated[str, typer.Argument(help="A .gguf file or model folder; hf.co/ORG/REPO[:QUANT] (Hugging Face); or a name in "
                                               "Ollama's registry, [HOST/][NAMESPACE/]NAME[:TAG] (for example smollm2:135m).")],
    name: Annotated[str | None, typer.Option("--name", help="Name in the store (default: NAME, NAME-TAG or the repo's name, -QUANT).")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a model of the same name.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a model into the store, as `ollama pull` does: resumable, hash-checked, installed atomically with its source
    in the card. Hugging Face through huggingface_hub (HF_TOKEN, HF_ENDPOINT, HF_HUB_OFFLINE as it reads them)."""
    report, close = pull_report()
    try:
        card = pull(source, name, store=Store(), overwrite=force, report=report)
    finally:
        close()
    print_result(card, as_json, f"pulled {card.name}: {human_count(card.parameters)} parameters, {human_bytes(card.size_bytes)}")


@app.command("create")
@handle_errors
def create_cmd(
    name: Annotated[str, typer.Argument(help="Name of the new model.")],
    file: Annotated[Path | None, typer.Option("--file", "-f", help="An Ollama Modelfile (FROM, SYSTEM, PARAMETER, MESSAGE, LICENSE).")] = None,
    from_: Annotated[str | None, typer.Option("--from", help="The model to start from: a store model, a .gguf file or a folder.")] = None,
    system: Annotated[str | None, typer.Option("--system", help="Its system prompt (used when a conversation has none).")] = None,
    parameter: Annotated[list[str] | None, typer.Option("--parameter", "-p", help="A sampling default as Ollama names it, NAME=VALUE (temperature=0.2, stop=END). Repeatable.")] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace a model of the same name.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Make a model from another with a system prompt and sampling defaults, as `ollama create -f Modelfile` does
    (from a store model: its files are shared, no extra disk)."""
    from slmkit.errors import SlmkitError
    from slmkit.sources import modelfile

    spec: dict[str, Any] = modelfile.parse(file.read_text(encoding="utf-8")) if file else {"parameters": {}}
    if from_:
        spec["from"] = from_
    if system:
        spec["system"] = system
    for item in parameter or []:
        key, eq, value = item.partition("=")
        if not eq:
            raise SlmkitError(f"--parameter {item!r} is not NAME=VALUE", "For example: --parameter temperature=0.2")
        if key == "stop":
            spec["parameters"].setdefault("stop", []).append(value)
        else:
            spec["parameters"][key] = value
    card = create(name, spec, store=Store(), overwrite=force)
    print_result(card, as_json, f"created {card.name} from {spec.get('from')}")


@app.command("cp")
@handle_errors
def cp(
    source: Annotated[str, typer.Argument(help="The model to copy.")],
    destination: Annotated[str, typer.Argument(help="The new name.")],
    as_json: JsonOpt = False,
) -> None:
    """Copy a model under a new name (its files are shared: hard links, no extra disk)."""
    card = derive_copy(source, destination, store=Store())
    print_result(card, as_json, f"copied {source} to {card.name}")
